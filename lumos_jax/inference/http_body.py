"""Reading an HTTP request body under a size cap, before and while reading.

`Content-Length` is checked before a byte is read; a chunked body is counted chunk by
chunk and refused as soon as it passes the cap, so a client never makes the server hold
more than the cap (plus one chunk-size line) in memory.
"""

from __future__ import annotations

_MAX_LINE = 1024  # a chunk-size line or trailer line


class BodyError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_body(rfile, headers, max_bytes: int) -> bytes:
    """The request body as bytes; BodyError (status 400/411/413/501) when it can't be had."""
    encoding = (headers.get("Transfer-Encoding") or "").strip().lower()
    length = headers.get("Content-Length")
    if encoding:
        if length is not None:
            raise BodyError("send either Content-Length or Transfer-Encoding, not both")
        if encoding != "chunked":
            raise BodyError(f"Transfer-Encoding {encoding[:40]!r} is not supported (only chunked)", 501)
        return _read_chunked(rfile, max_bytes)
    if length is None:
        raise BodyError("a request body needs a Content-Length header (or chunked encoding)", 411)
    length = length.strip()
    if not (length.isascii() and length.isdigit()):
        raise BodyError(f"Content-Length {length[:40]!r} is not a non-negative integer")
    n = int(length)
    if n > max_bytes:
        raise BodyError(f"request body of {n} bytes is over the limit of {max_bytes} bytes", 413)
    data = rfile.read(n)
    if len(data) < n:
        raise BodyError(f"request body ended after {len(data)} of {n} bytes")
    return data


def _read_chunked(rfile, max_bytes: int) -> bytes:
    parts, total = [], 0
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise BodyError("malformed chunked body (chunk-size line missing or too long)")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16) if size_text and size_text.isalnum() else -1
        except ValueError:
            size = -1
        if size < 0:
            raise BodyError(f"malformed chunked body (chunk size {size_text[:40]!r})")
        if size == 0:
            break
        total += size
        if total > max_bytes:
            raise BodyError(f"chunked request body is over the limit of {max_bytes} bytes", 413)
        data = rfile.read(size)
        if len(data) < size or rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BodyError("malformed chunked body (chunk shorter than its size)")
        parts.append(data)
    for _ in range(64):  # trailer lines, up to the blank line
        line = rfile.readline(_MAX_LINE + 1)
        if line in (b"\r\n", b"\n", b""):
            return b"".join(parts)
        if len(line) > _MAX_LINE:
            break
    raise BodyError("malformed chunked body (trailer too long)")
