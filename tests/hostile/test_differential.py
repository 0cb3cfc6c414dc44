"""Differential properties of the mesh's trust boundaries, on real sidecars (issue 15).

Downgrade (HTTP/2 in, HTTP/1.1 out): a raw h2c client (the h2 library with its
validation and normalisation switched off) sends arbitrary requests: header names and
values drawn from all 256 byte values, pseudo-headers included, mixed with valid ones,
and trailers. The app (tests/hostile/diff_app.py, mode `record`) keeps every byte it
received, per connection. Property: those bytes parse, with httptools and with h11 alike,
into exactly the one request that was sent, with the same fields (see `_expected`), or
the app received nothing (the stream was refused). Driven through the mesh (a caller's
outbound listener, h2c, the inbound, the app) and straight at an inbound (the default
inbound has no filters).

Upgrade (HTTP/1.1 app, HTTP/1.1 or HTTP/2 callers): the app (mode `reply`) sends
arbitrary response heads, bodies (content-length or chunked) and trailers; callers read
them through two sidecars with h11 on a raw socket and with the h2 library. Property:
one response per request, and the next caller on the same pooled connection gets its own
reply (its token, in its body) and none of the previous reply's headers.

Examples: 100 per property by default, derandomized (the same examples every run, so a
failure reproduces; hypothesis prints the falsifying example). For a longer run:
`OPUS_DIFF_EXAMPLES=5000 pytest tests/hostile/test_differential.py` (random, a new set
each run; `OPUS_DIFF_SEED=N` fixes it). See docs/reliability.md, "Differential tests".
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import h11
import pytest
from hypothesis import HealthCheck, event, example, given, seed, settings
from hypothesis import strategies as st

from sidecar.messages import HOP_BY_HOP as MESH_HOP_BY_HOP
from tests.hostile.h1parse import Fields, with_h11, with_httptools
from tests.integration.conftest import Mesh, Proc, Sidecar

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("OPUS_DIFF_EXAMPLES", "100"))
LONG_RUN = "OPUS_DIFF_EXAMPLES" in os.environ
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    report_multiple_bugs=False,
)
# A passing CI run takes well under 60 s per property; shrinking a failure takes longer.
TIMEOUT = pytest.mark.timeout(max(300, EXAMPLES))
SEED = seed(int(os.environ["OPUS_DIFF_SEED"])) if "OPUS_DIFF_SEED" in os.environ else lambda f: f
ANSWER_TIMEOUT = 10.0
T = TypeVar("T")
SERVICE = "diff"

# What the mesh may drop or rewrite (sidecar/messages.py HOP_BY_HOP, framing, the
# headers the mesh sets itself): left out when fields are compared.
HOP_BY_HOP = MESH_HOP_BY_HOP | {
    b"te",  # `te: trailers` may survive the downgrade or not (hop-by-hop in HTTP/1.1)
    b"content-length",  # framing: the body is compared instead
}
MESH_SET = frozenset({b"x-forwarded-for", b"traceparent", b"tracestate"})


def _compared(fields: Fields) -> Fields:
    return [
        (n, v)
        for n, v in fields
        if n not in HOP_BY_HOP and n not in MESH_SET and not n.startswith(b"x-opus-")
    ]


# -- strategies -------------------------------------------------------------------------

# Bytes an HTTP/1.1 parser would split on, over-weighted, and anything else at all.
_DANGEROUS = [b"\r", b"\n", b"\r\n", b"\0", b":", b" ", b"\t", b"A", b"\x7f", b"\xff", b"\x01"]
HOSTILE = st.lists(st.sampled_from(_DANGEROUS) | st.binary(max_size=4), max_size=6).map(b"".join)
SMUGGLE = st.sampled_from(
    [
        b"a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nx-pad: z",
        b"a\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        b"x\nx-injected: 1",
        b"chunked",
        b"0\r\n\r\n",
    ]
)
TOKEN_NAME = st.from_regex(rb"\A[a-z][a-z0-9-]{0,8}\Z", fullmatch=True)
VALUE = st.from_regex(rb"\A([!-~]([ !-~]{0,8}[!-~])?)?\Z", fullmatch=True)
SPECIAL_NAME = st.sampled_from(
    [b"host", b"te", b"connection", b"transfer-encoding", b"content-length", b"upgrade",
     b"x-forwarded-for", b"Content-Length", b"Host", b"x-opus-error"]
)  # fmt: skip
PSEUDO = st.sampled_from([b":method", b":path", b":authority", b":scheme", b":status", b":x"])
VALID_FIELD = st.tuples(TOKEN_NAME, VALUE)
FIELD = st.one_of(
    VALID_FIELD,
    VALID_FIELD,
    VALID_FIELD,
    st.tuples(HOSTILE, VALUE),
    st.tuples(TOKEN_NAME, HOSTILE | SMUGGLE),
    st.tuples(HOSTILE, HOSTILE),
    st.tuples(SPECIAL_NAME, VALUE | HOSTILE),
)


@dataclass
class H2Request:
    method: bytes
    path_suffix: bytes
    authority: bytes
    headers: Fields
    pseudo_extra: list[tuple[int, tuple[bytes, bytes]]]
    body: bytes
    trailers: Fields = field(default_factory=list)

    def fields(self, path: bytes) -> Fields:
        out: Fields = [
            (b":method", self.method),
            (b":scheme", b"http"),
            (b":authority", self.authority),
            (b":path", path + self.path_suffix),
            *self.headers,
        ]
        for index, pair in self.pseudo_extra:
            out.insert(index % (len(out) + 1), pair)
        return out


def _mostly(valid: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Valid three times in four: one hostile part at a time, so many examples get through."""
    # (st.one_of does not weigh a branch given twice more.)
    return st.sampled_from([valid, valid, valid, hostile]).flatmap(lambda chosen: chosen)


REQUESTS = st.builds(
    H2Request,
    method=_mostly(st.sampled_from([b"GET", b"POST", b"PUT"]), HOSTILE),
    path_suffix=_mostly(st.sampled_from([b"", b"/a?b=c"]), HOSTILE | SMUGGLE),
    authority=_mostly(st.sampled_from([b"localhost", b"x:80"]), HOSTILE),
    headers=st.lists(VALID_FIELD, max_size=6) | st.lists(FIELD, max_size=6),
    pseudo_extra=_mostly(
        st.just([]),
        st.lists(
            st.tuples(st.integers(0, 12), st.tuples(PSEUDO, VALUE | HOSTILE)),
            min_size=1,
            max_size=1,
        ),
    ),
    body=st.just(b"") | st.binary(min_size=1, max_size=20),
    trailers=st.just([])
    | st.lists(VALID_FIELD, min_size=1, max_size=3)
    | st.lists(FIELD | st.tuples(PSEUDO, VALUE), min_size=1, max_size=3),
)


# Issue 15 finding 1, as the review sent it.
SMUGGLING = H2Request(
    b"GET", b"", b"localhost",
    [(b"x-a", b"a\r\ncontent-length: 0\r\n\r\nGET /smuggled HTTP/1.1\r\nx-pad: z")], [], b"",
)  # fmt: skip

# -- the raw h2c client -----------------------------------------------------------------

RAW_H2 = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
)


@dataclass
class Answer:
    status: bytes | None = None
    reset: int | None = None
    goaway: int | None = None
    closed: bool = False
    headers: Fields = field(default_factory=list)
    body: bytes = b""

    @property
    def any(self) -> bool:
        return (
            self.reset is not None
            or self.goaway is not None
            or self.closed
            or (self.status is not None)
        )


def _h2_exchange(
    port: int, streams: list[tuple[Fields, bytes, Fields]], config: h2.config.H2Configuration
) -> list[Answer]:
    """Send each (fields, body, trailers) on its own stream of one connection, one after
    the other, and return how each was answered."""
    answers: list[Answer] = []
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        for fields, body, trailers in streams:
            answer = Answer()
            answers.append(answer)
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, fields, end_stream=not body and not trailers)
            if body:
                conn.send_data(stream_id, body, end_stream=not trailers)
            if trailers:
                conn.send_headers(stream_id, trailers, end_stream=True)
            sock.sendall(conn.data_to_send())
            deadline = time.monotonic() + ANSWER_TIMEOUT
            ended = False
            while not ended and time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    data = b""
                if not data:
                    answer.closed = True
                    return answers
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    answer.closed = True
                    return answers
                for event in events:
                    if getattr(event, "stream_id", stream_id) != stream_id:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                        answer.status = dict(headers).get(b":status")
                        answer.headers = [(n, v) for n, v in headers if n[:1] != b":"]
                    elif isinstance(event, h2.events.DataReceived):
                        answer.body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(event, h2.events.StreamReset):
                        answer.reset = event.error_code
                        ended = True
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        answer.goaway = event.error_code
                        return answers
                sock.sendall(conn.data_to_send())
            assert ended, f"no answer within {ANSWER_TIMEOUT}s to stream {stream_id}"
    return answers


# -- the mesh ---------------------------------------------------------------------------


class Recorder:
    """The record-mode app's per-connection files: what arrived since the last look."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: set[str] = set()

    def _new(self) -> list[Path]:
        return sorted(
            (p for p in self.directory.glob("conn-*.bin") if p.name not in self.seen),
            key=lambda p: int(p.stem.split("-")[1]),
        )

    def settle(self) -> list[bytes]:
        """The bytes of every connection opened since the last call, once each is over."""
        new = self._new()
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while not all(p.with_suffix(".done").exists() for p in new):
            assert time.monotonic() < deadline, f"app connections still open: {new}"
            time.sleep(0.01)
            new = self._new()
        self.seen.update(p.name for p in new)
        return [p.read_bytes() for p in new]


@dataclass
class DowngradeMesh:
    caller: Sidecar
    target: Sidecar
    recorder: Recorder
    count: int = 0


def _app(mesh: Mesh, mode: str) -> tuple[Proc, Path]:
    directory = mesh.workdir / f"app-{mode}"
    directory.mkdir()
    argv = [sys.executable, "-m", "tests.hostile.diff_app", "--mode", mode, "--dir", str(directory)]
    proc = Proc(f"diffapp-{mode}", argv, mesh.workdir, None)
    mesh.procs.append(proc)
    return proc, directory


@pytest.fixture(scope="module")
def downgrade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DowngradeMesh]:
    mesh = Mesh(tmp_path_factory.mktemp("downgrade"))
    try:
        app, directory = _app(mesh, "record")
        target = mesh.sidecar(SERVICE, app.ports["port"])
        _, caller = mesh.service("caller")
        mesh.wait_endpoints(caller, SERVICE, 1)
        recorder = Recorder(directory)
        recorder.settle()
        yield DowngradeMesh(caller, target, recorder)
    finally:
        mesh.stop()


def _expected_path(sent: bytes, through_outbound: bool) -> bytes | None:
    """The target the app should see for `sent`, None when no call should reach it."""
    if not through_outbound:
        return sent
    prefix = b"/v1/invoke/"
    if not sent.startswith(prefix):
        return None
    rest = sent[len(prefix) :]
    query = b""
    if b"?" in rest:
        rest, query = rest.split(b"?", 1)
        query = b"?" + query
    service, _, method = rest.partition(b"/")
    return b"/" + method + query if service.lower() == SERVICE.encode() else None


def _last(fields: Fields, name: bytes) -> bytes | None:
    values = [v for n, v in fields if n == name]
    return values[-1] if values else None


def _check_request(
    data: list[bytes], request: H2Request, fields: Fields, through_outbound: bool
) -> None:
    """The downgrade property for one example (see the module docstring)."""
    got = [d for d in data if d]
    if not got:
        return  # refused, or answered by the mesh: nothing reached the app
    assert len(got) == 1, f"the request reached the app on {len(got)} connections: {got!r}"
    stream = got[0]
    by_httptools, by_h11 = with_httptools(stream), with_h11(stream)
    assert not isinstance(by_h11, str), f"{by_h11} in what the app got: {stream!r}"
    if by_httptools == "httptools: Invalid method encountered" and _TOKEN.fullmatch(
        _last(fields, b":method") or b""
    ):
        # llhttp knows only registered methods; any RFC 9110 token is a valid method
        # (h11 takes it), and one cannot split a request line.
        by_httptools = by_h11
    assert not isinstance(by_httptools, str), f"{by_httptools} in what the app got: {stream!r}"
    assert by_httptools == by_h11, f"the parsers disagree on {stream!r}"
    assert len(by_h11) == 1, f"the app got {len(by_h11)} requests: {stream!r}"
    seen = by_h11[0]
    regular = [(n.lower(), v) for n, v in fields if n[:1] != b":"]
    assert seen.method == _last(fields, b":method"), stream
    path = _last(fields, b":path") or b""
    assert seen.target == _expected_path(path, through_outbound), stream
    hosts = [v for n, v in seen.headers if n == b"host"]
    allowed = {SERVICE.encode(), *(v for n, v in fields if n in (b":authority", b"host"))}
    assert len(hosts) == 1 and hosts[0] in allowed, f"host {hosts!r} in {stream!r}"
    assert _compared(seen.headers) == _compared(regular), f"headers changed: {stream!r}"
    assert seen.body == request.body, stream
    sent_trailers = _compared([(n.lower(), v) for n, v in request.trailers])
    assert seen.trailers in ([], sent_trailers), f"trailers changed: {stream!r}"


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALID_NAME = re.compile(rb"[a-z][a-z0-9-]*")
_VALID_VALUE = re.compile(rb"([!-~]([ !-~]*[!-~])?)?")
_SPECIAL = frozenset({*HOP_BY_HOP, *MESH_SET, b"x-opus-error"})


def _valid(fields: Fields) -> bool:
    return all(
        _VALID_NAME.fullmatch(n) and _VALID_VALUE.fullmatch(v) and n not in _SPECIAL
        for n, v in fields
    )


def _plainly_valid(request: H2Request) -> bool:
    """A request any HTTP/2 server must accept: the property is vacuous if these never
    reach the app."""
    return (
        request.method in (b"GET", b"POST", b"PUT")
        and request.path_suffix in (b"", b"/a?b=c")
        and request.authority in (b"localhost", b"x:80")
        and not request.pseudo_extra
        and _valid(request.headers)
        and _valid(request.trailers)
    )


def _downgrade(mesh: DowngradeMesh, request: H2Request, port: int, path: bytes) -> None:
    mesh.count += 1
    fields = request.fields(path + b"%d" % mesh.count)
    answers = _h2_exchange(port, [(fields, request.body, request.trailers)], RAW_H2)
    assert answers[0].any
    received = mesh.recorder.settle()
    event("reached the app" if any(received) else "refused")
    if _plainly_valid(request):
        assert any(received), f"a valid request never reached the app: {answers[0]!r}"
    _check_request(received, request, fields, port == mesh.caller.ports["outbound"])


@TIMEOUT
@SETTINGS
@SEED
@given(request=REQUESTS)
@example(request=SMUGGLING)
def test_h2_requests_reach_the_app_as_sent_or_not_at_all_through_the_mesh(
    downgrade: DowngradeMesh, request: H2Request
) -> None:
    _downgrade(downgrade, request, downgrade.caller.ports["outbound"], b"/v1/invoke/diff/e")


@TIMEOUT
@SETTINGS
@SEED
@given(request=REQUESTS)
@example(request=SMUGGLING)
def test_h2_requests_reach_the_app_as_sent_or_not_at_all_at_an_inbound(
    downgrade: DowngradeMesh, request: H2Request
) -> None:
    _downgrade(downgrade, request, downgrade.target.ports["inbound"], b"/e")


# -- responses --------------------------------------------------------------------------

STATUS = st.sampled_from([b"200", b"201", b"204", b"301", b"304", b"404", b"500", b"299"])
REASON = st.sampled_from([b"OK", b"", b"Fine Thanks"]) | HOSTILE | SMUGGLE


@dataclass
class H1Response:
    status: bytes
    reason: bytes
    headers: Fields
    chunked: bool
    trailers: Fields

    def wire(self, body: bytes) -> bytes:
        head = b"HTTP/1.1 %s %s\r\n" % (self.status, self.reason)
        head += b"".join(b"%s: %s\r\n" % pair for pair in self.headers)
        if not self.chunked:
            return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)
        block = b"".join(b"%s: %s\r\n" % pair for pair in self.trailers)
        chunk = b"%x\r\n%s\r\n" % (len(body), body)
        return head + b"transfer-encoding: chunked\r\n\r\n" + chunk + b"0\r\n" + block + b"\r\n"


RESPONSES = st.builds(
    H1Response,
    status=STATUS,
    reason=REASON,
    headers=st.lists(VALID_FIELD, max_size=6) | st.lists(FIELD, max_size=6),
    chunked=st.booleans(),
    trailers=st.lists(VALID_FIELD, max_size=3) | st.lists(FIELD, max_size=3),
)

# Issue 15 finding 3: a reply's trailers became the next reply's headers.
TRAILER_LEAK = H1Response(b"200", b"OK", [], True, [(b"set-cookie", b"session=1")])


@dataclass
class UpgradeMesh:
    caller: Sidecar
    directory: Path
    count: int = 0


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpgradeMesh]:
    mesh = Mesh(tmp_path_factory.mktemp("upgrade"))
    try:
        app, directory = _app(mesh, "reply")
        mesh.sidecar(SERVICE, app.ports["port"])
        _, caller = mesh.service("caller")
        mesh.wait_endpoints(caller, SERVICE, 1)
        yield UpgradeMesh(caller, directory)
    finally:
        mesh.stop()


def _h1_exchange(port: int, targets: list[bytes]) -> list[tuple[int, Fields, bytes] | str]:
    """GET each target in turn on one keep-alive connection, read with h11; a reply h11
    cannot read ends the list with the error."""
    out: list[tuple[int, Fields, bytes] | str] = []
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        for target in targets:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            elif out:
                return out
            sock.sendall(
                conn.send(h11.Request(method="GET", target=target, headers=[("host", "x")]))
            )
            sock.sendall(conn.send(h11.EndOfMessage()))
            status, headers, body = 0, [], b""
            deadline = time.monotonic() + ANSWER_TIMEOUT
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        assert time.monotonic() < deadline, f"no reply to {target!r}"
                        try:
                            conn.receive_data(sock.recv(65536))
                        except (TimeoutError, ConnectionResetError):
                            conn.receive_data(b"")
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            except h11.RemoteProtocolError as exc:
                if not out and status and "without sending complete message" in str(exc):
                    # Cut short, the one way HTTP/1.1 can say a reply failed once its
                    # head went out: the call failed, nothing was forged.
                    out.append((0, [], b""))
                    return out
                out.append(f"h11 cannot read the reply to {target!r}: {exc}")
                return out
            out.append((status, headers, body))
    return out


_REPLY_FRAMING = frozenset({b"content-length", b"x-opus-upstream", b"x-opus-upstream-protocol"})


def _check_replies(
    hostile: H1Response, token: bytes, innocent: bytes, first: object, second: object
) -> None:
    assert not isinstance(first, str), first
    assert not isinstance(second, str), second
    assert isinstance(first, tuple) and isinstance(second, tuple)
    assert innocent not in first[2], f"the next caller's reply leaked into this one: {first!r}"
    status, headers, body = second
    assert (status, body) == (200, innocent), (
        f"the next caller got {status} {body!r}, not its own reply"
    )
    previous = {(n.lower(), v) for n, v in [*hostile.headers, *hostile.trailers]}
    leaked = [p for p in headers if p in previous and p[0] not in _REPLY_FRAMING]
    assert not leaked, f"the previous reply's headers reached the next caller: {leaked!r}"


def _tokens(mesh: UpgradeMesh, response: H1Response) -> tuple[bytes, bytes, bytes, bytes]:
    mesh.count += 1
    # As long as the "{TOKEN}" they replace, so the reply's framing still holds.
    token, innocent = b"T%06d" % mesh.count, b"I%06d" % mesh.count
    reply_id = b"%d" % mesh.count
    (mesh.directory / f"reply-{mesh.count}.bin").write_bytes(response.wire(b"{TOKEN}"))
    hostile_target = b"/v1/invoke/diff/r/%s/%s" % (token, reply_id)
    innocent_target = b"/v1/invoke/diff/r/%s/none" % innocent
    return token, innocent, hostile_target, innocent_target


@TIMEOUT
@SETTINGS
@SEED
@given(response=RESPONSES)
@example(response=TRAILER_LEAK)
def test_http1_callers_get_one_reply_each_and_only_their_own(
    upgrade: UpgradeMesh, response: H1Response
) -> None:
    token, innocent, hostile_target, innocent_target = _tokens(upgrade, response)
    replies = _h1_exchange(upgrade.caller.ports["outbound"], [hostile_target, innocent_target])
    if len(replies) == 1 and not isinstance(replies[0], str):
        # The mesh closed the caller's connection after the hostile reply: the next
        # caller comes on a new one (the app's pooled connection is what is tested).
        replies += _h1_exchange(upgrade.caller.ports["outbound"], [innocent_target])
    assert len(replies) == 2, replies
    _check_replies(response, token, innocent, replies[0], replies[1])


H2_CLIENT = h2.config.H2Configuration(client_side=True, header_encoding=None)


@TIMEOUT
@SETTINGS
@SEED
@given(response=RESPONSES)
@example(response=TRAILER_LEAK)
def test_http2_callers_get_one_reply_each_and_only_their_own(
    upgrade: UpgradeMesh, response: H1Response
) -> None:
    token, innocent, hostile_target, innocent_target = _tokens(upgrade, response)
    head: Fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")]
    streams: list[tuple[Fields, bytes, Fields]] = [
        ([*head, (b":path", t)], b"", []) for t in (hostile_target, innocent_target)
    ]
    answers = _h2_exchange(upgrade.caller.ports["outbound"], streams, H2_CLIENT)
    if len(answers) == 1 or answers[1].closed or answers[1].goaway is not None:
        answers = answers[:1] + _h2_exchange(
            upgrade.caller.ports["outbound"], streams[1:], H2_CLIENT
        )
    first, second = answers
    as_tuple = [
        (int(a.status or 0), a.headers, a.body) if a.status is not None else (0, [], b"")
        for a in (first, second)
    ]
    _check_replies(response, token, innocent, as_tuple[0], as_tuple[1])
