"""Authentication and authorization: who is calling, and may they.

`policy` (the server `AuthPolicy`: JWT and mTLS identities, scopes from the contract,
`current_principal()`), `verifier` (JWT verification with pinned algorithms and a
verified-token cache), `keyset` (keys by `kid`, rotated from JWKS/PEM files), `bearer`
(the client `BearerToken`), `tls` (TLS/mTLS credentials, peer identity), `devca`
(a development CA for tests and demos).

Built on the core only; never imports `framework.server` or `framework.client`.
"""
