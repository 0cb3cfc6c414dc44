"""Service discovery: backends deliver endpoint-set updates per service as a watch."""

from sidecar.discovery.base import Discovery, Endpoint, EndpointsListener, Instance

__all__ = ["Discovery", "Endpoint", "EndpointsListener", "Instance"]
