"""Service discovery: where each service's endpoints come from, and where the local app is
registered.

`base.Discovery` is what every backend offers (endpoints answered from memory, a watch per
service, register/deregister); the backends are `file`, `static`, `consul`, `nacos` and
`kubernetes` (DNS), and `factory` builds the one the config names.
"""

from sidecar.discovery.base import Discovery, Endpoint, EndpointsListener, Instance

__all__ = ["Discovery", "Endpoint", "EndpointsListener", "Instance"]
