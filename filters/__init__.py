"""Built-in filters, one module per filter (a package once it grows, as wasm/), found by
name through sidecar.chain.BUILTIN_FILTERS. Each imports only the filter SDK (sidecar.sdk)
from the sidecar, as a third-party filter would (docs/filters/sdk.md); the HMAC filters
also the wire format they share with opus_client (sidecar.signing)."""
