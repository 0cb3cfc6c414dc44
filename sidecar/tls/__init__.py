"""Mutual TLS between sidecars: SPIFFE workload identities, the certificate material a
source keeps current, and the SSLContexts built from it (docs/security.md).

- `spiffe`: SPIFFE IDs, parsed and checked (Istio's, the plain service form, Consul's);
- `material`: a certificate chain, its key and a trust bundle, read and checked together;
- `devca`: the built-in CA of `opus-sidecar ca init` and the leaves it issues;
- `sources`: where material comes from (`file`, `dev`) and how it is kept current;
- `contexts`: `TlsState`, the current server and client SSLContexts, and the peer checks.
"""
