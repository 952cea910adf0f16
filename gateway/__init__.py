"""The gateway: ASGI app, sessions, wire protocol, fan-out, HTTP API and CLI."""
