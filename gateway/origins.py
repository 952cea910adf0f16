"""Which web pages may use a business's chat: the `Origin` check, and the text the edge refuses.

A business lists its allowed origins (`allowed_origins`, set over the admin API): exact origins
such as `https://shop.example.com` or `http://localhost:3000`, and the word `self`, meaning the
origin the gateway itself is served at (an `Origin` whose host and port equal the request's `Host`
header: the gateway's own demo page and console, whatever host and port it runs on).

- An empty list allows any origin (a business that has not set one up yet).
- A request without an `Origin` header is not from a browser page (browsers always send it on
  WebSocket handshakes and cross-origin requests): it is allowed, unless the business sets
  `require_origin`, which refuses widget sessions and sockets without one.
- Agent sockets (and agent or admin reads of history) are allowed from the business's origins and
  always from the gateway's own (its agent console); `require_origin` does not apply to them.

The check stops other web sites from embedding a business's widget in their pages; it is no
authentication (a client outside a browser can send any `Origin`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from core.models import Business

SELF = "self"
MAX_ORIGINS = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DEFAULT_PORT_SUFFIX = re.compile(r":(?:80|443)$")


def normalize_origin(value: str) -> str:
    """An origin in its canonical form (`scheme://host[:port]`, lower case, no default port), or
    `ValueError` naming what is wrong. `self` stays `self`."""
    text = value.strip()
    if text.lower() == SELF:
        return SELF
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} is not an origin such as https://shop.example.com") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{value!r}: the scheme must be http or https")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r}: an origin needs a host and no user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"{value!r}: an origin has no path, query or fragment (just scheme://host[:port])")
    host = parts.hostname.lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _host_of(origin: str) -> str | None:
    """`host[:port]` of an origin as a `Host` header writes it (default ports left out)."""
    try:
        canonical = normalize_origin(origin)
    except ValueError:
        return None
    return canonical.partition("://")[2] if canonical != SELF else None


def _canonical_host(host: str) -> str:
    """A `Host` header without a default port (a client may write `example.com:443`)."""
    return _DEFAULT_PORT_SUFFIX.sub("", host)


def is_own_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` is the gateway's own: its host and port are the request's `Host`."""
    if not host:
        return False
    own = _host_of(origin)
    return own is not None and own == _canonical_host(host.strip().lower())


def origin_problem(
    business: Business, origin: str | None, host: str | None, *, agent: bool = False
) -> str | None:
    """Why a request from `origin` (None: no `Origin` header) may not use `business`'s chat, or
    None when it may. `host` is the request's `Host` header (for `self`); `agent` applies the rule
    for agent sockets and agent or admin reads (see the module's docstring)."""
    if origin is None:
        if business.require_origin and not agent:
            return f"business {business.public_id!r} accepts only browser pages of its allowed origins: no Origin"
        return None
    allowed = business.allowed_origins
    if not allowed or (agent and is_own_origin(origin, host)):
        return None
    try:
        canonical = normalize_origin(origin)
    except ValueError:
        canonical = origin
    for entry in allowed:
        if entry == SELF and is_own_origin(origin, host):
            return None
        if entry == canonical != SELF:  # `self` is the list's word, never a page's origin
            return None
    return f"origin {origin!r} is not allowed for business {business.public_id!r}"
