"""The send-time marker of `chatgw model-server`'s tokens, shared with `chatgw loadtest`.

Every token the model server writes is the text ``" ⟦<µs>⟧"``: a space, U+27E6, the Unix time
in whole microseconds at which the server wrote that token (decimal digits), and U+27E7. The
gateway only concatenates tokens into `delta` frames, so markers reach clients whole; a client on
the same clock takes a token's lag as its arrival time minus its marker.
"""

from __future__ import annotations

import re

MARKER_RE = re.compile("⟦([0-9]+)⟧")
"""Finds the markers in text made of the server's tokens; group 1 is the send time (µs)."""


def token(stamp_us: int) -> str:
    """The text of one token written at `stamp_us` (Unix time in microseconds)."""
    return f" ⟦{stamp_us}⟧"


def markers(text: str) -> list[int]:
    """The send times (Unix µs) of the tokens in `text`, in order."""
    return [int(m) for m in MARKER_RE.findall(text)]
