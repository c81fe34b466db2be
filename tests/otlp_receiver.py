"""A real OTLP/HTTP receiver for tests: decodes the protobuf the exporters put on the wire."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

T = TypeVar("T")


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    links: list[tuple[str, str]]
    events: list[str]
    service: str | None


@dataclass
class Receiver:
    spans: list[Span] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    histograms: list[tuple[str, str, dict[str, Any], int]] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, body: bytes) -> bytes:
        with self.lock:
            self.requests += 1
        if path.endswith("/v1/traces"):
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self._add_span(s, resource.get("service.name"))
            return ExportTraceServiceResponse().SerializeToString()
        if path.endswith("/v1/metrics"):
            mreq = ExportMetricsServiceRequest.FromString(body)
            for rm in mreq.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        with self.lock:
                            self.metric_names.add(m.name)
                            if m.WhichOneof("data") == "histogram":
                                for dp in m.histogram.data_points:
                                    attrs = {a.key: _value(a.value) for a in dp.attributes}
                                    self.histograms.append((m.name, m.unit, attrs, dp.count))
            return ExportMetricsServiceResponse().SerializeToString()
        return b""

    def _add_span(self, s: Any, service: str | None) -> None:
        span = Span(
            name=s.name,
            trace_id=s.trace_id.hex(),
            span_id=s.span_id.hex(),
            parent_id=s.parent_span_id.hex(),
            kind=s.kind,
            start_ns=s.start_time_unix_nano,
            end_ns=s.end_time_unix_nano,
            attributes={a.key: _value(a.value) for a in s.attributes},
            status_code=s.status.code,
            status_message=s.status.message,
            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
            events=[e.name for e in s.events],
            service=service,
        )
        with self.lock:
            self.spans.append(span)

    def find(self, predicate: Callable[[Span], bool]) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if predicate(s)]


def wait_for(probe: Callable[[], T | None], timeout: float = 30.0, what: str = "") -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        time.sleep(delay)  # polling interval, not synchronisation: the deadline decides
        delay = min(delay * 1.5, 0.25)


def serve(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            out = receiver.handle(self.path, body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
