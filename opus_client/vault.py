"""Tokens read from HashiCorp Vault (`pip install 'opus-mesh[vault]'`, which brings hvac).

The seed's form, a token read once:

    vault = Vault()                                  # $VAULT_ADDR, $VAULT_TOKEN
    secret = vault.read("opus/creds/prod")
    client = OpusClient(auth_token=secret["token"], token_ttl=3600)

and the renewed form, re-read before `token_ttl` runs out:

    client = OpusClient(auth_token=vault.token_provider("opus/creds/prod"), token_ttl=3600)

`read(path)` is hvac's `Client.read`, i.e. Vault's `GET /v1/{path}`, unwrapped to the
secret's fields; KV version 2 replies (`{"data": {"data": {...}, "metadata": {...}}}`)
are unwrapped one level further.
"""

from __future__ import annotations

import importlib
from typing import Any

from opus_client.exceptions import TokenError


class Vault:
    """A Vault reader. `client`: an `hvac.Client`; when None, one is made from `url` and
    `token` (hvac falls back to $VAULT_ADDR and $VAULT_TOKEN)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, client: Any = None):
        if client is None:
            try:
                hvac = importlib.import_module("hvac")
            except ImportError as exc:
                raise ImportError(
                    "opus_client.vault needs hvac: pip install 'opus-mesh[vault]'"
                ) from exc
            client = hvac.Client(url=url, token=token)
        self.client = client

    def read(self, path: str) -> dict[str, Any]:
        """The fields of the secret at `path`."""
        path = path.strip("/")
        reply = self.client.read(path)
        if not isinstance(reply, dict) or not isinstance(reply.get("data"), dict):
            raise TokenError(f"vault: no secret at {path!r}")
        data: dict[str, Any] = reply["data"]
        nested = data.get("data")
        if isinstance(nested, dict) and isinstance(data.get("metadata"), dict):
            return nested
        return data

    def token_provider(self, path: str, field: str = "token") -> VaultToken:
        return VaultToken(self, path, field)


class VaultToken:
    """A token provider for `auth_token`: each call re-reads `field` of the secret."""

    def __init__(self, vault: Vault, path: str, field: str = "token") -> None:
        self.vault = vault
        self.path = path
        self.field = field

    def __call__(self) -> str:
        value = self.vault.read(self.path).get(self.field)
        if not isinstance(value, str) or not value:
            raise TokenError(f"vault: secret {self.path!r} has no string field {self.field!r}")
        return value
