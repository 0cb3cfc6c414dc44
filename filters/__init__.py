"""The built-in filters, one module per filter: its config dataclass, the filter and the
`factory` that `sidecar.chain.BUILTIN_FILTERS` names as `"filters.<module>:factory"`
(imported when a config first uses the filter).

`hmac_sign` and `hmac_verify` (with `keyring`, their keys, and `hmac_replay`, the
verifier's replay caches), `retry`, `timeout`, `rate_limit`, `circuit_breaker` and
`headers`; `wasm/` is the proxy-wasm host, a package for its size. Each imports only the
filter SDK (`sidecar.sdk`) from the sidecar, as a third-party filter would
(docs/filters/sdk.md); the HMAC filters take the wire format they share with opus_client
from it too (`sidecar.sdk.signing`).
"""
