"""The gateway's own exception root, for failures that belong to the edge (credentials)."""

from __future__ import annotations


class GatewayError(Exception):
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(GatewayError):
    """Missing, malformed, forged or expired credentials."""

    code = "unauthorized"
