"""OpenTelemetry tracing: one span per hop, parented across sidecars through W3C
`traceparent` (B3 accepted on input), configured by the standard `OTEL_*` variables.

Tracing is on when a trace exporter is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=console`) and
`OTEL_SDK_DISABLED` is not true. When off, a call pays one attribute check: headers
travel untouched and the access log still shows the caller's trace id.
Sampling follows `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (e.g.
`parentbased_traceidratio` and `0.1`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sidecar.messages import FIELD_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from sidecar.call import Call
    from sidecar.messages import Headers, Request, Response

log = logging.getLogger("sidecar.tracing")

_B3_HEADERS = frozenset(
    {b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled", b"x-b3-parentspanid", b"x-b3-flags"}
)


def trace_id_from(traceparent: bytes) -> str:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), or "-"."""
    parts = traceparent.split(b"-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1].decode("ascii", "replace")
    return "-"


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter == "console"
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def provider_from_env(service_name: str, environ: Mapping[str, str]) -> TracerProvider | None:
    """A tracer provider exporting as the OTEL_* variables say, or None when tracing is off."""
    if not tracing_enabled(environ):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from env
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing on: exporting spans (%s)", environ.get("OTEL_TRACES_EXPORTER") or "otlp")
    return provider


class Tracing:
    """Starts and ends the per-hop span of each call."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer: Tracer | None = None
        if provider is not None:
            from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
            from opentelemetry.propagators.composite import CompositePropagator
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._tracer = provider.get_tracer("opus-mesh.sidecar")
            # W3C last, so it wins when a caller sends both.
            self._extract = CompositePropagator(
                [B3SingleFormat(), B3MultiFormat(), TraceContextTextMapPropagator()]
            )
            self._inject = TraceContextTextMapPropagator()

    def start(self, call: Call) -> Span | None:
        """The hop's span (CLIENT outbound, SERVER inbound), its context injected into the
        request as `traceparent` so the next hop parents on it."""
        if self._tracer is None:
            return None
        from opentelemetry import trace

        request = call.request
        carrier = {n.decode("latin-1"): v.decode("latin-1") for n, v in request.headers}
        parent = self._extract.extract(carrier)
        outbound = call.direction == "outbound"
        method = request.method.decode("latin-1")
        path = call.path.decode("latin-1")
        host, _, port = request.authority.decode("latin-1").partition(":")
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path.split("?", 1)[0],
            "url.scheme": request.scheme.decode("latin-1") or "http",
            "network.protocol.name": "http",
            "network.protocol.version": "2" if request.protocol == "h2c" else "1.1",
            "server.address": call.service if outbound else (host or call.service),
            "opus.direction": call.direction,
            "opus.service": call.service,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        if request.peer:
            attributes["client.address"] = request.peer.rsplit(":", 1)[0]
        if request.is_grpc:
            service, _, rpc_method = path.lstrip("/").partition("/")
            attributes.update(
                {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_method}
            )
        span = self._tracer.start_span(
            f"{method} {call.service}",
            context=parent,
            kind=trace.SpanKind.CLIENT if outbound else trace.SpanKind.SERVER,
            attributes=attributes,
        )
        injected: dict[str, str] = {}
        self._inject.inject(injected, context=trace.set_span_in_context(span))
        headers = [
            (n, v)
            for n, v in request.headers
            if n not in _B3_HEADERS and n != b"traceparent" and n != b"tracestate"
        ]
        headers += [(k.encode(), v.encode()) for k, v in injected.items()]
        request.headers[:] = headers
        return span

    @staticmethod
    def finish(span: Span, call: Call, response: Response | None, grpc_status: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        status = response.status if response is not None else 0
        if status:
            span.set_attribute("http.response.status_code", status)
        if grpc_status:
            span.set_attribute("rpc.grpc.status_code", int(grpc_status))
        if call._endpoint is not None:
            span.set_attribute("opus.upstream", call._endpoint.address)
        if call._route != "-":  # outbound: the route rule's name, or how it was routed
            span.set_attribute("opus.route", call._route)
        if call._flags != "-":
            span.set_attribute("opus.flags", call._flags)
        if call._error is not None or status >= 500 or status == 0:
            error_type = call._error.flag if call._error is not None else str(status or "aborted")
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def from_env(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing:
    return Tracing(provider_from_env(service_name, os.environ if environ is None else environ))


def grpc_status_of(response: Response) -> str:
    """grpc-status from the response's trailers (or headers, for trailers-only replies)."""
    trailers = response.body.trailers
    if trailers and b"grpc-status" in map(FIELD_NAME, trailers):
        return _first(trailers, b"grpc-status")
    headers = response.headers
    if b"grpc-status" in map(FIELD_NAME, headers):  # no loop for a reply without one
        return _first(headers, b"grpc-status")
    return ""


def _first(fields: Headers, wanted: bytes) -> str:
    for name, value in fields:
        if name == wanted:
            return value.decode("latin-1")
    return ""


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def incoming_trace_id(request: Request) -> str:
    value = header_value(request.headers, b"traceparent")
    return trace_id_from(value) if value is not None else "-"
