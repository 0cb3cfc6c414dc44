"""A raw HTTP/2 client for flood tests: frames built with hyperframe and hpack, written
to a plain socket, and the server's frames read back, so a test can send what no
well-behaved client library would and see exactly how the server answered."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1
COMPRESSION_ERROR = 0x9
REFUSED_STREAM = 0x7


class RawH2:
    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder = Encoder()
        self.buffer = b""
        self.closed = False
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def close(self) -> None:
        self.sock.close()

    def send(self, *frames: Frame | bytes) -> bool:
        """Write frames; False once the server has closed the connection."""
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False
        return True

    def headers_block(
        self, stream_id: int, path: str = "/", extra: list[tuple[str, str]] | None = None
    ) -> bytes:
        return self.encoder.encode(
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                *(extra or []),
            ]
        )

    def request(self, stream_id: int, path: str = "/", end_stream: bool = True) -> HeadersFrame:
        frame = HeadersFrame(stream_id)
        frame.data = self.headers_block(stream_id, path)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    @staticmethod
    def reset(stream_id: int, code: int = 8) -> RstStreamFrame:
        frame = RstStreamFrame(stream_id)
        frame.error_code = code
        return frame

    @staticmethod
    def continuation(stream_id: int, data: bytes, end: bool = False) -> ContinuationFrame:
        frame = ContinuationFrame(stream_id)
        frame.data = data
        if end:
            frame.flags.add("END_HEADERS")
        return frame

    def frames(self, timeout: float = 5.0) -> list[Frame]:
        """Read what the server sent until it closes or stays quiet for `timeout`."""
        out: list[Frame] = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                if out and not self.buffer:
                    continue
                continue
            except ConnectionResetError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self.buffer = split_frames(self.buffer + chunk, out)
        return out

    def goaway(self, timeout: float = 5.0) -> GoAwayFrame | None:
        """The server's GOAWAY, reading until one comes, the server closes or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            for frame in self.frames(timeout=min(0.5, deadline - time.monotonic())):
                if isinstance(frame, GoAwayFrame):
                    return frame
        return None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def split_frames(buffer: bytes, out: list[Frame]) -> bytes:
    """Parse the whole frames at the start of `buffer` into `out`; returns the rest."""
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(buffer[9 : 9 + length]))
        buffer = buffer[9 + length :]
        out.append(frame)
    return buffer
