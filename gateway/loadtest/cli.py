"""`chatgw loadtest`: parse the options, run, print the report, and exit with a status that
automation can use (see the epilog of `chatgw loadtest --help`)."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from gateway.loadtest import report
from gateway.loadtest.config import ConfigError, parse
from gateway.loadtest.runner import RunError, run

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv: list[str]) -> int:
    try:
        config = parse(argv)
    except ConfigError as exc:
        print(f"chatgw loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run(config)
    except RunError as exc:
        print(f"chatgw loadtest: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:  # a second Ctrl-C: no report
        print("chatgw loadtest: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    document = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if config.json_out:
        try:
            Path(config.json_out).write_bytes(document + b"\n")
        except OSError as exc:
            print(f"chatgw loadtest: --json-out {config.json_out}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
    if config.json_stdout:
        sys.stdout.write(document.decode() + "\n")
    else:
        print(report.table(result))
    if not result["connections"]["sockets_opened"]:
        print("chatgw loadtest: no socket could be opened", file=sys.stderr)
        return EXIT_CANNOT_RUN
    found = report.problems(result)
    for problem in found:
        print(f"chatgw loadtest: {problem}", file=sys.stderr)
    return EXIT_PROBLEMS if found or result["failed_client_processes"] else EXIT_OK
