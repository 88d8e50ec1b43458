"""The model in its wire form: registry.v1 messages to and from model objects."""

from __future__ import annotations

from framework.registry.model import Health, Instance, Selector, ServiceView
from gen.registry.v1 import registry_pb2 as pb


def selector_from_proto(message: pb.Selector) -> Selector:
    return Selector(message.version, message.zone, dict(message.metadata))


def selector_to_proto(selector: Selector) -> pb.Selector:
    return pb.Selector(
        version=selector.version, zone=selector.zone, metadata=dict(selector.metadata)
    )


def instance_to_proto(instance: Instance, now: float) -> pb.Instance:
    """The discovery form: no lease id (its owner's secret) and no owner."""
    return pb.Instance(
        service=instance.service,
        address=instance.address,
        version=instance.version,
        zone=instance.zone,
        weight=instance.weight,
        metadata=dict(instance.metadata),
        health=pb.Health.ValueType(instance.health.value),
        lease_remaining_s=max(0.0, instance.expires_at - now),
    )


def instance_from_proto(message: pb.Instance, now: float) -> Instance:
    return Instance(
        service=message.service,
        address=message.address,
        lease_id="",  # discovery views carry no lease ids
        expires_at=now + message.lease_remaining_s,
        ttl_s=message.lease_remaining_s,
        version=message.version,
        zone=message.zone,
        weight=message.weight,
        metadata=dict(message.metadata),
        health=Health(int(message.health)),
    )


def view_to_proto(view: ServiceView, now: float) -> pb.ServiceView:
    return pb.ServiceView(
        service=view.service,
        revision=view.revision,
        instances=[instance_to_proto(i, now) for i in view.instances],
        version_weights=dict(view.version_weights),
    )


def view_from_proto(message: pb.ServiceView, now: float) -> ServiceView:
    return ServiceView(
        service=message.service,
        revision=message.revision,
        instances=tuple(instance_from_proto(i, now) for i in message.instances),
        version_weights=dict(message.version_weights),
    )


def _listing(i: Instance) -> tuple[object, ...]:
    """What a watcher sees of an instance (a renewal moves only expires_at: no change)."""
    return (
        i.address,
        i.version,
        i.zone,
        i.weight,
        sorted(i.metadata.items()),
        i.health,
        i.lease_id,
        i.ttl_s,
    )


def delta_to_proto(base: ServiceView, view: ServiceView, now: float) -> pb.ServiceView:
    """The change from `base` to `view`: added or changed instances, removed addresses."""
    old = {i.address: i for i in base.instances}
    changed = [
        instance_to_proto(i, now)
        for i in view.instances
        if i.address not in old or _listing(old[i.address]) != _listing(i)
    ]
    current = {i.address for i in view.instances}
    return pb.ServiceView(
        service=view.service,
        revision=view.revision,
        instances=changed,
        version_weights=dict(view.version_weights),
        delta=True,
        base_revision=base.revision,
        removed=sorted(a for a in old if a not in current),
    )


def view_from_delta(base: ServiceView, message: pb.ServiceView, now: float) -> ServiceView:
    """Apply a delta message to the view it was made against."""
    gone = set(message.removed)
    by_address = {i.address: i for i in base.instances if i.address not in gone}
    for changed in message.instances:
        by_address[changed.address] = instance_from_proto(changed, now)
    return ServiceView(
        service=base.service,
        revision=message.revision,
        instances=tuple(by_address[a] for a in sorted(by_address)),
        version_weights=dict(message.version_weights),
    )
