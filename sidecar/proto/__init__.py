"""The wire protocols, Sans-IO: bytes in, events and bytes out, no sockets and no event
loop (a unit test asserts that importing this package loads no asyncio).

- `fields`: header fields as every layer holds them, and the helpers the writers share.
- HTTP/1.1 (httptools, llhttp, parses): `h1server`, the server side of a connection
  (bytes and `now` in; requests, refusals and deadlines out; an explicit reading state),
  on `h1request`'s request fields; `h1client`, the client side (response bytes in; head,
  body and end out), on `h1response`'s response fields; `h1write`, the request and
  response heads as bytes; `h1head`, the check every HTTP/1.1 head and trailer block
  passes before it is written, in both directions.
- HTTP/2: `h2engine`, the project's own connection state machine (h2 supplies only its
  error and setting codes, jh2 the HPACK codec), and its face: one class in parts, its
  state (`h2state`), SETTINGS and flow control (`h2flow`), header blocks (`h2headers`),
  with the wire's vocabulary (`h2frames`) and the events (`h2events`); `h2fields`, the
  RFC 9113 field checks the engine runs.

The asyncio adapters around them live in `sidecar.adapters` (the listener's HTTP/1.1 and
h2c server protocols, the HTTP/2 driver) and `sidecar.upstream` (client connections and
pools); the protocol-neutral messages in `sidecar.messages`.
"""
