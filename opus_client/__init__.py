"""opus_client: call services in the Opus Mesh through the local sidecar.

    from opus_client import OpusClient
    client = OpusClient(base_url="http://localhost:8080", max_retries=3, retry_delay=0.5)
    response = client.call_service(service="payment", method="create",
                                   body={"amount": 100, "currency": "USD"}, timeout=2.0)
    print(response.json())

`AsyncOpusClient` is the asyncio twin. Errors: `opus_client.exceptions`. How the
client's retries combine with the mesh's: docs/client.md.
"""

from __future__ import annotations

from opus_client.aio import AsyncOpusClient
from opus_client.client import OpusClient
from opus_client.exceptions import (
    CallTimeout,
    ClientClosedError,
    DecodeError,
    NonRetryableError,
    OpusError,
    RetryableError,
    TokenError,
)
from opus_client.response import Response
from opus_client.retry import RetryPolicy

__all__ = [
    "AsyncOpusClient",
    "CallTimeout",
    "ClientClosedError",
    "DecodeError",
    "NonRetryableError",
    "OpusClient",
    "OpusError",
    "Response",
    "RetryPolicy",
    "RetryableError",
    "TokenError",
]
