"""Service registry: leases, discovery, watch, per-request balancing, deployments.

Server side: `Registry` (use cases) over a `RegistryStore` (`SqliteStore`;
`framework.registry.postgres.PostgresStore` for shared replicas), served by
`framework.registry.service.RegistryServicer`.  Instances register themselves
with `RegistrationAgent` (a server hook).  Clients call a service by name
through `balanced_channel(...)`.  See README.md.
"""

from framework.registry.agent import AgentConfig, RegistrationAgent
from framework.registry.balancer import Balancer, LeastOutstanding, RoundRobin, WeightedRandom
from framework.registry.budget import RetryBudget
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from framework.registry.discovery import Discovery, DiscoveryConfig
from framework.registry.health_probe import ProbeConfig
from framework.registry.model import Health, Instance, Selector, ServiceView
from framework.registry.outlier import OutlierConfig
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.sqlite import SqliteStore
from framework.registry.store import RegistryStore

__all__ = [
    "AgentConfig",
    "BalancedChannel",
    "Balancer",
    "BalancerConfig",
    "Discovery",
    "DiscoveryConfig",
    "Health",
    "Instance",
    "LeastOutstanding",
    "OutlierConfig",
    "ProbeConfig",
    "RegistrationAgent",
    "Registry",
    "RegistryConfig",
    "RegistryStore",
    "RetryBudget",
    "RoundRobin",
    "Selector",
    "ServiceView",
    "SqliteStore",
    "WeightedRandom",
    "balanced_channel",
]
