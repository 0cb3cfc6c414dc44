"""The asyncio adapters of the listener side: `h1server` (HTTP/1.1 on httptools),
`h2server` (h2c; a stream's record and reply side in `h2stream`, the limits on what a
client may make it do in `h2guard`) and `h2common` (the asyncio driver of an HTTP/2
engine, which sidecar/upstream/h2client.py builds on too). The protocol logic they drive
is Sans-IO in `sidecar.proto`."""
