"""The policies: one pattern per module, each built on the core (`framework.policy`,
`framework.errors`, `framework.clock`, `framework.config`) and nothing else of the framework.

Resilience: `ratelimit` (token buckets in memory), `ratelimit_redis` (shared in Redis),
`breaker`, `bulkhead`, `shedding` (adaptive concurrency limit), `throttle` (client
adaptive throttling), `retry` (compiled to gRPC service config), `deadline` (applied
first on clients, when a call is created), `faults` (fault injection and its admin servicer).
Contracts: `validation` (protovalidate), `idempotency`.
Edges: `error_mapping` (pinned outermost on servers), `accesslog`.

No module here touches grpc's server or channel APIs, nor imports `framework.server`
or `framework.client`.
"""
