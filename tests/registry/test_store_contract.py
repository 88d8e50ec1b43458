"""One contract every registry store passes (SQLite and PostgreSQL)."""

from __future__ import annotations

from framework.registry.model import Health, Instance
from framework.registry.store import RegistryStore
from tests.registry.fleet import wait_until


def _instance(
    address: str,
    lease: str,
    *,
    service: str = "orders",
    expires_at: float = 100.0,
    version: str = "v1",
) -> Instance:
    return Instance(
        service=service,
        address=address,
        lease_id=lease,
        expires_at=expires_at,
        ttl_s=10.0,
        version=version,
        zone="z1",
        weight=50,
        metadata={"team": "a"},
    )


async def test_put_then_view_round_trips_every_field(store: RegistryStore) -> None:
    """What is stored comes back field for field, with the service's revision."""
    revision = await store.put(_instance("10.0.0.1:5000", "l1"))
    view = await store.view("orders")
    assert view.revision == revision > 0
    assert view.instances == (_instance("10.0.0.1:5000", "l1"),)
    assert await store.get("l1") == _instance("10.0.0.1:5000", "l1")


async def test_unknown_service_has_an_empty_view_at_revision_zero(store: RegistryStore) -> None:
    """A service nobody registered is empty, not an error."""
    view = await store.view("nobody")
    assert (view.revision, view.instances, dict(view.version_weights)) == (0, (), {})


async def test_same_address_replaces_the_old_registration(store: RegistryStore) -> None:
    """Registering the same service and address again keeps one instance, the new lease."""
    await store.put(_instance("10.0.0.1:5000", "old"))
    await store.put(_instance("10.0.0.1:5000", "new"))
    view = await store.view("orders")
    assert [i.lease_id for i in view.instances] == ["new"]
    assert await store.get("old") is None


async def test_every_change_bumps_the_revision(store: RegistryStore) -> None:
    """put, delete, health and weights each move the revision forward."""
    r1 = await store.put(_instance("10.0.0.1:5000", "l1"))
    assert await store.set_health("l1", Health.NOT_SERVING)
    r2 = (await store.view("orders")).revision
    r3 = await store.set_version_weights("orders", {"v1": 90, "v2": 10})
    await store.delete("l1")
    r4 = (await store.view("orders")).revision
    assert r1 < r2 < r3 < r4 == await store.revision()


async def test_unchanged_health_is_not_a_change(store: RegistryStore) -> None:
    """Writing the same health twice changes nothing the second time."""
    await store.put(_instance("10.0.0.1:5000", "l1"))
    assert await store.set_health("l1", Health.SERVING)
    before = await store.revision()
    assert not await store.set_health("l1", Health.SERVING)
    assert await store.revision() == before


async def test_renew_moves_expiry_without_a_view_change(store: RegistryStore) -> None:
    """A heartbeat extends the lease to now + its TTL but is not a view change."""
    await store.put(_instance("10.0.0.1:5000", "l1"))
    before = await store.revision()
    renewed = await store.renew("l1", 90.0)
    assert renewed is not None and renewed.expires_at == 100.0  # 90 + ttl 10
    assert await store.revision() == before
    assert await store.renew("missing", 90.0) is None


async def test_a_lease_that_has_ended_is_not_renewed(store: RegistryStore) -> None:
    """Renewing at or after the lease's end changes nothing and returns None."""
    await store.put(_instance("10.0.0.1:5000", "l1", expires_at=100.0))
    assert await store.renew("l1", 100.0) is None
    assert (await store.get("l1")).expires_at == 100.0  # type: ignore[union-attr]


async def test_store_clock_times_leases_when_no_time_is_given(store: RegistryStore) -> None:
    """now=None means the store's clock: a lease ending in the past is swept, one renewed
    by the store's clock lasts its TTL from it."""
    now = await store.now()
    await store.put(_instance("10.0.0.1:5000", "old", expires_at=now - 1))
    await store.put(_instance("10.0.0.2:5000", "young", expires_at=now + 60))
    assert [i.lease_id for i in await store.expire(None)] == ["old"]
    renewed = await store.renew("young", None)
    assert renewed is not None and now + 10 <= renewed.expires_at <= await store.now() + 10


async def test_extend_leases_gives_every_lease_at_least_its_ttl(store: RegistryStore) -> None:
    """A new leader's extension: short leases move to now + TTL, longer ones stay; no
    revision change."""
    await store.put(_instance("10.0.0.1:5000", "short", expires_at=101.0))
    await store.put(_instance("10.0.0.2:5000", "long", expires_at=500.0))
    before = await store.revision()
    assert await store.extend_leases(100.0) == 1
    assert (await store.get("short")).expires_at == 110.0  # type: ignore[union-attr]
    assert (await store.get("long")).expires_at == 500.0  # type: ignore[union-attr]
    assert await store.revision() == before


async def test_one_open_store_may_lead(store: RegistryStore) -> None:
    """try_lead is True for the only store on this state, and stays so until it resigns."""
    assert await store.try_lead()
    assert await store.try_lead()
    await store.resign()


async def test_expire_removes_only_ended_leases(store: RegistryStore) -> None:
    """Leases ending at or before `now` go; the others stay."""
    await store.put(_instance("10.0.0.1:5000", "old", expires_at=100.0))
    await store.put(_instance("10.0.0.2:5000", "young", expires_at=200.0))
    removed = await store.expire(150.0)
    assert [i.lease_id for i in removed] == ["old"]
    assert [i.lease_id for i in (await store.view("orders")).instances] == ["young"]
    assert await store.expire(150.0) == []


async def test_delete_unknown_lease_changes_nothing(store: RegistryStore) -> None:
    """Deleting a lease that does not exist returns None and keeps the revision."""
    await store.put(_instance("10.0.0.1:5000", "l1"))
    before = await store.revision()
    assert await store.delete("nope") is None
    assert await store.revision() == before


async def test_version_weights_are_kept_per_service(store: RegistryStore) -> None:
    """Weights set on one service show in its view only, and can be cleared."""
    await store.put(_instance("10.0.0.1:5000", "l1"))
    await store.put(_instance("10.0.0.9:5000", "l9", service="billing"))
    await store.set_version_weights("orders", {"v1": 90, "v2": 10})
    assert dict((await store.view("orders")).version_weights) == {"v1": 90, "v2": 10}
    assert dict((await store.view("billing")).version_weights) == {}
    await store.set_version_weights("orders", {})
    assert dict((await store.view("orders")).version_weights) == {}


async def test_views_and_instances_list_every_service(store: RegistryStore) -> None:
    """views() lists services by name; instances() every instance."""
    await store.put(_instance("10.0.0.1:5000", "l1"))
    await store.put(_instance("10.0.0.9:5000", "l9", service="billing"))
    assert [v.service for v in await store.views()] == ["billing", "orders"]
    assert sorted(i.lease_id for i in await store.instances()) == ["l1", "l9"]


async def test_every_change_reaches_the_change_feed_with_its_service(
    store: RegistryStore,
) -> None:
    """put, health, weights, delete and expiry each announce (revision, service) to the
    feed; a renewal and an unchanged health announce nothing."""
    seen: list[tuple[int, str | None]] = []
    store.on_change(lambda revision, service: seen.append((revision, service)))
    r1 = await store.put(_instance("10.0.0.1:5000", "l1"))
    await store.put(_instance("10.0.0.9:5000", "l9", service="billing", expires_at=50.0))
    await store.renew("l1", 60.0)
    await store.set_health("l1", Health.SERVING)
    await store.set_health("l1", Health.SERVING)
    await store.set_version_weights("orders", {"v1": 1})
    await store.expire(60.0)
    await store.delete("l1")
    await wait_until(lambda: len([s for s in seen if s[1] is not None]) >= 6)
    local = [s for s in seen if s[1] is not None]
    services = [service for _, service in local]
    revisions = [revision for revision, _ in local]
    # PostgreSQL hears its own NOTIFYs too: each change is announced once or twice
    assert list(dict.fromkeys(zip(revisions, services, strict=True))) == [
        (r1, "orders"),
        (r1 + 1, "billing"),
        (r1 + 2, "orders"),
        (r1 + 3, "orders"),
        (r1 + 4, "billing"),
        (r1 + 5, "orders"),
    ]
    assert store.listening


async def test_service_revisions_name_each_service_last_change(store: RegistryStore) -> None:
    """One query gives the revision of each named service; unknown names are left out."""
    r1 = await store.put(_instance("10.0.0.1:5000", "l1"))
    r2 = await store.put(_instance("10.0.0.9:5000", "l9", service="billing"))
    assert await store.service_revisions(["orders", "billing", "nobody"]) == {
        "orders": r1,
        "billing": r2,
    }
    assert await store.service_revisions([]) == {}
