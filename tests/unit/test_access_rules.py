"""The rules of access at the edge, without I/O: origins, verified identity, text that cannot be
stored, and the metrics token setting."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from core.errors import Forbidden, InvalidInput
from core.models import Business
from core.types import BusinessId
from gateway.http_api import verified_user
from gateway.origins import normalize_origin, origin_problem
from gateway.protocol import FrameError, parse_frame, unstorable, unstorable_in
from gateway.settings import Settings, SettingsError


def shop(*origins: str, strict: bool = False, secret: str | None = None) -> Business:
    return Business(
        BusinessId("b-1"),
        "shop",
        "Shop",
        allowed_origins=origins,
        require_origin=strict,
        identity_secret=secret,
    )


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("https://Shop.Example.com", "https://shop.example.com"),
        ("https://shop.example.com:443/", "https://shop.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        (" SELF ", "self"),
    ],
)
def test_origins_are_stored_in_canonical_form(given: str, canonical: str) -> None:
    assert normalize_origin(given) == canonical


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("shop.example.com", "scheme must be http or https"),
        ("ftp://shop.example.com", "scheme must be http or https"),
        ("https://", "needs a host"),
        ("https://user:pw@shop.example.com", "no user name"),
        ("https://shop.example.com/path", "no path"),
        ("https://shop.example.com?q=1", "no path"),
        ("https://shop.example.com:99999", "not an origin"),
        ("*", "scheme must be http or https"),
    ],
)
def test_what_is_not_an_origin_is_refused_by_name(given: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        normalize_origin(given)


def test_an_empty_list_allows_any_origin_and_a_missing_one_unless_strict() -> None:
    assert origin_problem(shop(), "https://anything.example", "gw.example") is None
    assert origin_problem(shop(), None, "gw.example") is None
    refused = origin_problem(shop(strict=True), None, "gw.example")
    assert refused is not None
    assert "no Origin" in refused
    # Agents (console, tools) are not held to require_origin.
    assert origin_problem(shop(strict=True), None, "gw.example", agent=True) is None


def test_listed_origins_and_self_are_allowed_and_nothing_else() -> None:
    business = shop("https://shop.example.com", "self")
    allowed = [
        ("https://shop.example.com", "gw.example"),
        ("https://SHOP.example.com:443", "gw.example"),
        ("http://gw.example:8000", "gw.example:8000"),  # self: the gateway's own host and port
        ("https://gw.example", "gw.example:443"),
    ]
    for origin, host in allowed:
        assert origin_problem(business, origin, host) is None, origin
    refused = [
        ("https://evil.example", "gw.example"),
        ("http://shop.example.com", "gw.example"),  # another scheme is another origin
        ("https://shop.example.com.evil.example", "gw.example"),
        ("http://gw.example:8001", "gw.example:8000"),  # another port is another origin
        ("null", "gw.example"),  # a sandboxed frame or a file
        ("self", "gw.example"),  # the list's word, not an origin
    ]
    for origin, host in refused:
        problem = origin_problem(business, origin, host)
        assert problem is not None, origin
        assert "is not allowed for business 'shop'" in problem


def test_self_is_only_what_is_listed_for_widgets_but_always_for_agents() -> None:
    business = shop("https://shop.example.com")
    assert origin_problem(business, "http://gw.example:8000", "gw.example:8000") is not None
    assert origin_problem(business, "http://gw.example:8000", "gw.example:8000", agent=True) is None
    assert origin_problem(business, "https://evil.example", "gw.example", agent=True) is not None
    assert origin_problem(business, "https://shop.example.com", "gw.example", agent=True) is None


def sign(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def test_a_verified_user_is_the_hmac_of_its_id_under_the_business_secret() -> None:
    business = shop(secret="identity-secret")
    assert (
        verified_user(business, {"id": "customer-7", "hash": sign("identity-secret", "customer-7")})
        == "customer-7"
    )
    upper = sign("identity-secret", "customer-7").upper()
    assert verified_user(business, {"id": "customer-7", "hash": upper}) == "customer-7"
    for forged in (
        sign("identity-secret", "customer-8"),  # the hash of another user
        sign("another-secret", "customer-7"),  # made with another key
        "",
        "0" * 64,
    ):
        with pytest.raises(Forbidden, match=r"user\.hash"):
            verified_user(business, {"id": "customer-7", "hash": forged})


def test_identity_claims_a_business_cannot_verify_are_refused() -> None:
    with pytest.raises(InvalidInput, match="no identity secret"):
        verified_user(shop(), {"id": "customer-7", "hash": sign("x", "customer-7")})
    for malformed in ("customer-7", {"id": "customer-7"}, {"id": 7, "hash": "x"}, {"id": "", "hash": "x"}):
        with pytest.raises(InvalidInput, match="user"):
            verified_user(shop(secret="s"), malformed)
    with pytest.raises(InvalidInput, match="1 to 255"):
        verified_user(shop(secret="s"), {"id": "u" * 256, "hash": "x"})


def test_text_that_cannot_be_stored_is_found_anywhere_in_a_body() -> None:
    assert unstorable("plain text, émoji 🙂, \u2028") is None
    assert unstorable("a\x00b") == "a NUL character"
    assert unstorable("a\ud800b") == "a lone surrogate (not valid Unicode)"
    assert unstorable_in({"a": [1, {"b": "x\x00"}]}) == "field 'a[1].b' holds a NUL character"
    assert unstorable_in({"k\x00": 1}) == "a field name in 'the body' holds a NUL character"
    assert unstorable_in({"a": ["fine", True, None, 3.5]}) is None


@pytest.mark.parametrize(
    ("raw", "fragment", "client_msg_id"),
    [
        (
            '{"type":"message","client_msg_id":"c-1","text":"a\\u0000b"}',
            "message: field 'text' holds a NUL",
            "c-1",
        ),
        (
            '{"type":"message","client_msg_id":"c\\u0000","text":"hi"}',
            "field 'client_msg_id' holds a NUL",
            None,
        ),
        ('{"type":"subscribe","conversation_id":"\\u0000"}', "subscribe: field 'conversation_id'", None),
        ('{"type":"hello","token":"t\\u0000"}', "hello: field 'token' holds a NUL", None),
        ('{"type":"x\\u0000"}', "frame: field 'type' holds a NUL", None),
    ],
)
def test_frames_with_text_that_cannot_be_stored_are_bad_frames(
    raw: str, fragment: str, client_msg_id: str | None
) -> None:
    with pytest.raises(FrameError) as caught:
        parse_frame(raw)
    assert caught.value.code.value == "bad_frame"
    assert fragment in caught.value.message
    assert caught.value.client_msg_id == client_msg_id


def test_the_metrics_token_is_read_and_checked() -> None:
    assert Settings.from_env({}).metrics_token is None
    token = "operator-token-0123456789"
    settings = Settings.from_env({"CHATGW_METRICS_TOKEN": token})
    assert settings.metrics_token == token
    assert token not in repr(settings)
    for bad in ("short", "with a space inside it"):
        with pytest.raises(SettingsError, match="CHATGW_METRICS_TOKEN"):
            Settings.from_env({"CHATGW_METRICS_TOKEN": bad})
