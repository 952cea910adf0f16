import sys

from gateway.cli import main

# Guarded: `chatgw serve --workers N` spawns processes that import this module again.
if __name__ == "__main__":
    sys.exit(main())
