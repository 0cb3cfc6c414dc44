"""The listeners' wire protocols and the message types both sides of the proxy share.

- `messages`: the protocol-neutral call (Request, Response, a streamed Body), which the
  proxy core sees instead of any framing.
- HTTP/1.1: `h1server`, the listener's server protocol on httptools (llhttp); `h1head`,
  the check every HTTP/1.1 head and trailer block passes before it is written, which the
  client side (sidecar/upstream/h1client.py) uses too.
- HTTP/2: `h2engine`, the project's own Sans-IO connection state (h2 supplies only its
  error and setting codes, jh2 the HPACK codec); `h2fields`, the RFC 9113 field checks the
  engine runs; `h2common`, the asyncio driver of an engine that `h2server` (the listener's
  h2c side) and sidecar/upstream/h2client.py build on.

The client connections and pools live in `sidecar.upstream`.
"""
