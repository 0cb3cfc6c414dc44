"""The HTTP/2 state machine the data path runs on: `jh2` when installed (h2's API and
behaviour, with a compiled HPACK codec; about 1.3x faster per exchange here), else `h2`.

Modules import `from sidecar.proto import h2lib as h2` and use `h2.events`, `h2.config`
and so on, so the choice is made here once. Type checking always sees h2's API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from h2 import config, connection, errors, events, exceptions, settings
else:
    try:
        from jh2 import config, connection, errors, events, exceptions, settings

        IMPLEMENTATION = "jh2"
    except ImportError:  # pragma: no cover - jh2 is a dependency; h2 is the fallback
        from h2 import config, connection, errors, events, exceptions, settings

        IMPLEMENTATION = "h2"

__all__ = ["config", "connection", "errors", "events", "exceptions", "settings"]
