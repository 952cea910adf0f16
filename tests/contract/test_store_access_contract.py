"""The Store contract for a business's access settings: allowed origins, the identity secret and
verified end users, and admin key rotation with an overlap; run against every Store."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import NotFound
from core.models import AuditEntry
from core.store import Store
from core.types import BusinessId, new_id
from gateway.auth import hash_api_key
from tests.contract.test_store_contract import a_business


def audit(action: str) -> AuditEntry:
    return AuditEntry("admin", action, {"test": True})


async def actions(store: Store, business_id: BusinessId) -> list[str]:
    return [r.entry.action_type for r in await store.list_audit(business_id, limit=50)]


async def test_access_settings_change_only_what_is_given_and_are_audited(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    assert (business.allowed_origins, business.require_origin, business.identity_secret) == ((), False, None)

    changed = await store.update_business(
        bid, allowed_origins=("https://shop.example.com", "self"), audit=audit("business.update")
    )
    assert changed.allowed_origins == ("https://shop.example.com", "self")
    assert changed.require_origin is False
    strict = await store.update_business(bid, require_origin=True, audit=audit("business.update"))
    assert strict.allowed_origins == ("https://shop.example.com", "self")
    assert strict.require_origin is True
    with_secret = await store.set_identity_secret(bid, "s3cret", audit=audit("identity_secret.create"))
    assert with_secret.identity_secret == "s3cret"
    assert with_secret.allowed_origins == strict.allowed_origins  # untouched by the secret

    # Every read of the business sees the same.
    for read in (
        await store.get_business(bid),
        await store.get_business_by_public_id(business.public_id),
    ):
        assert read == with_secret
    assert "s3cret" not in repr(with_secret)
    cleared = await store.set_identity_secret(bid, None, audit=audit("identity_secret.delete"))
    assert cleared.identity_secret is None
    assert (await store.get_business(bid)).identity_secret is None
    assert await actions(store, bid) == [
        "identity_secret.delete",
        "identity_secret.create",
        "business.update",
        "business.update",
    ]
    # Another business is untouched; an unknown one is NotFound.
    other = await store.ensure_business(a_business())
    assert (await store.get_business(other.business_id)).allowed_origins == ()
    with pytest.raises(NotFound):
        await store.update_business(BusinessId(new_id()), require_origin=True, audit=audit("business.update"))


async def test_a_verified_end_user_is_one_per_external_id_and_business(store: Store) -> None:
    one = await store.ensure_business(a_business())
    two = await store.ensure_business(a_business())
    first = await store.ensure_end_user(one.business_id, "customer-7")
    assert await store.ensure_end_user(one.business_id, "customer-7") == first
    racing = await asyncio.gather(*(store.ensure_end_user(one.business_id, "customer-8") for _ in range(8)))
    assert len(set(racing)) == 1
    assert racing[0] != first
    # The same external id in another business is another person.
    assert await store.ensure_end_user(two.business_id, "customer-7") != first
    conversation = await store.create_conversation(one.business_id, first, "default")  # type: ignore[arg-type]
    assert conversation.end_user_id == first


async def test_a_rotated_key_keeps_working_until_its_deadline_or_a_revoke(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    old, new, newer = (hash_api_key(secrets.token_urlsafe(16)) for _ in range(3))
    await store.set_api_key(bid, old)
    later = datetime.now(UTC) + timedelta(hours=1)

    rotated = await store.rotate_api_key(bid, new, previous_until=later, audit=audit("api_key.rotate"))
    assert rotated.previous_key_until == later
    for key in (old, new):
        assert (await store.get_business_by_api_key(key)).business_id == bid
    # A retry of the same rotation changes nothing (the old key is still the one in overlap).
    again = await store.rotate_api_key(bid, new, previous_until=later, audit=audit("api_key.rotate"))
    assert again.previous_key_until == later
    assert (await store.get_business_by_api_key(old)).business_id == bid
    assert await actions(store, bid) == ["api_key.rotate"]

    # Rotating again: the key before is out at once, the one just replaced is in its overlap.
    await store.rotate_api_key(bid, newer, previous_until=later, audit=audit("api_key.rotate"))
    with pytest.raises(NotFound):
        await store.get_business_by_api_key(old)
    assert (await store.get_business_by_api_key(new)).business_id == bid

    assert await store.revoke_previous_api_key(bid, audit=audit("api_key.revoke_previous")) is True
    with pytest.raises(NotFound):
        await store.get_business_by_api_key(new)
    assert (await store.get_business_by_api_key(newer)).previous_key_until is None
    assert await store.revoke_previous_api_key(bid, audit=audit("api_key.revoke_previous")) is False
    assert (await actions(store, bid)).count("api_key.revoke_previous") == 1


async def test_a_replaced_key_past_its_deadline_is_refused(store: Store) -> None:
    business = await store.ensure_business(a_business())
    bid = business.business_id
    old, new = hash_api_key(secrets.token_urlsafe(16)), hash_api_key(secrets.token_urlsafe(16))
    await store.set_api_key(bid, old)
    past = datetime.now(UTC) - timedelta(seconds=1)
    await store.rotate_api_key(bid, new, previous_until=past, audit=audit("api_key.rotate"))
    with pytest.raises(NotFound):
        await store.get_business_by_api_key(old)
    assert (await store.get_business_by_api_key(new)).business_id == bid
    # Nothing was still valid, so a revoke revokes nothing.
    assert await store.revoke_previous_api_key(bid, audit=audit("api_key.revoke_previous")) is False
    # Setting a key outright ends any overlap too.
    await store.rotate_api_key(
        bid, old, previous_until=datetime.now(UTC) + timedelta(hours=1), audit=audit("r")
    )
    await store.set_api_key(bid, hash_api_key(secrets.token_urlsafe(16)))
    for gone in (old, new):
        with pytest.raises(NotFound):
            await store.get_business_by_api_key(gone)
