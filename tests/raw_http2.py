"""A raw HTTP/2 client for the tests that must send what no gRPC library sends.

grpcio (and ``h2``, which validates header values) will not put bytes that are not
UTF-8 in a header, and answer the server's PINGs without ever opening a call;
hostile clients do both. This speaks just enough HTTP/2 over a plain socket for
that: the connection preface, SETTINGS and their ACKs, PING ACKs, HEADERS encoded
as HPACK literals (no Huffman, no dynamic table: RFC 7541 6.2.2) and DATA.

    conn = RawConnection(port)                # preface and SETTINGS sent
    conn.send_call(1, "/pkg.Service/Method", [(b"x-bad", b"\\xff")])
    conn.serve_pings(until=deadline)          # answers PINGs; returns what closed it
"""

from __future__ import annotations

import socket
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
END_STREAM = ACK = 0x1
END_HEADERS = 0x4


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a prefix of prefix_bits bits of a byte starting as first."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = bytearray([first | top]), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal without indexing, new name, raw (not Huffman) strings."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class RawConnection:
    """One HTTP/2 connection to 127.0.0.1:port, preface and empty SETTINGS sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._buffer = b""

    def send_call(self, stream: int, path: str, extra: list[tuple[bytes, bytes]]) -> None:
        """A unary gRPC call on stream (odd, increasing): headers (with extra), an empty message."""
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ]
        block = b"".join(hpack_literal(n, v) for n, v in headers)
        self.sock.sendall(
            frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, b"\x00" * 5)
        )

    def read_frame(self, timeout: float) -> tuple[int, int, bytes] | None:
        """The next frame (kind, flags, payload), None at EOF; socket.timeout if none came."""
        self.sock.settimeout(timeout)
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    kind, flags = self._buffer[3], self._buffer[4]
                    payload = self._buffer[9 : 9 + length]
                    self._buffer = self._buffer[9 + length :]
                    return kind, flags, payload
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def serve_pings(self, until: float) -> str:
        """Answer SETTINGS and PINGs, open no call, until the server closes the connection
        ("goaway" or "eof") or time.monotonic() passes until ("open"). pings: PINGs answered."""
        self.pings = 0
        while (left := until - time.monotonic()) > 0:
            try:
                got = self.read_frame(min(left, 1.0))
            except TimeoutError:
                continue
            if got is None:
                return "eof"
            kind, flags, payload = got
            if kind == GOAWAY:
                return "goaway"
            if kind == SETTINGS and not flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))
                self.pings += 1
        return "open"

    def close(self) -> None:
        self.sock.close()
