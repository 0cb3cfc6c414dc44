"""proxy_http_call's transport: one real HTTP request with aiohttp."""

from __future__ import annotations

import logging

import aiohttp

from .context import CalloutResponse

log = logging.getLogger("sidecar.wasm")


async def fetch(
    base: str | None, headers: list[tuple[bytes, bytes]], body: bytes, timeout_ms: int
) -> CalloutResponse | None:
    """Send the callout; None when it failed (the guest then sees num_headers == 0)."""
    if base is None:
        return None
    pseudo = {k: v.decode("latin-1") for k, v in headers if k.startswith(b":")}
    plain = [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if not k.startswith(b":")
    ]
    plain.append(("host", pseudo[b":authority"]))
    timeout = aiohttp.ClientTimeout(total=(timeout_ms or 5000) / 1000)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
            session.request(
                pseudo[b":method"], base + pseudo[b":path"], headers=plain, data=body or None
            ) as resp,
        ):
            data = await resp.read()
            out = [(b":status", str(resp.status).encode())]
            out += [(k.lower(), v) for k, v in resp.raw_headers]
            return CalloutResponse(out, data, [])
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        log.info("wasm http callout to %s failed: %s", base, exc)
        return None
