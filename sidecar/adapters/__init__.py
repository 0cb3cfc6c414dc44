"""The asyncio adapters of the listener side: `h1server` (HTTP/1.1 on httptools),
`h2server` (h2c) and `h2common` (the asyncio driver of an HTTP/2 engine, which
sidecar/upstream/h2client.py builds on too). The protocol logic they drive is Sans-IO in
`sidecar.proto`."""
