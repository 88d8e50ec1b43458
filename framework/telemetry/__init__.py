"""Observability: traces, metrics and logs for every RPC, at low cost.

`sdk` (set-up from the standard `OTEL_*` variables: providers and exporters, never
installed as globals), `tracing` and `spans` (a span per RPC per side, W3C context in
metadata and in event metadata), `metrics` (RPC histograms, in-flight, errors by reason,
breaker state), `prometheus` (the `/metrics` endpoint), `logs` (JSON lines with trace ids).

Built on the core only; never imports `framework.server` or `framework.client`.
"""
