"""`lumos-jax serve`: an OpenAI-compatible HTTP server over the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (Lumos chat template, see
`inference.chat`), GET /v1/models, GET /health. Both POSTs stream with `"stream": true`
(server-sent events). HTTP handler threads parse and validate requests and hand them to
one engine thread, which batches every request in flight through the engine's slots
(continuous batching) and streams tokens back per request.

Requests are hostile input (docs/security.md): a bad one gets a 4xx JSON reply naming the
problem and fails only itself. Limits: a body cap checked from Content-Length before
reading (and while reading a chunked body), one deadline for reading a whole request (a
slow client is cut off, its thread freed), a socket timeout on every read and write, a
connection cap, and an optional API key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

from lumos_jax.config import parse_args
from lumos_jax.inference.chat import chat_prompt_ids
from lumos_jax.inference.chat import chat_format
from lumos_jax.inference.http_body import BodyError, read_body
from lumos_jax.inference.openai_api import (RequestError, chunk, completion_text, cut_at_stop,
                                            decode_json, error_body, new_id, parse_request,
                                            response)
from lumos_jax.inference.serve_worker import EngineWorker, _Job
from lumos_jax.inference.settings import load_engines
from lumos_jax.tokenization import Tokenizer

logger = logging.getLogger(__name__)  # `lumos-jax serve` shows INFO on stderr (lumos_jax/cli.py)

_LINGER_S, _LINGER_BYTES = 3.0, 8 << 20  # draining a refused request's unread body (at most)
_LINGER_IDLE_S = 0.25  # ... and it ends once the client pauses this long


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may cost the server."""
    max_body_bytes: int = 1 << 20       # request body cap (413 past it, never read)
    request_timeout_s: float = 30.0     # to send a whole request (headers + body), idle included
    io_timeout_s: float = 60.0          # one socket read/write with no progress (slow readers)
    max_connections: int = 256          # open connections; more get 503 at once


class OpenAIServer(ThreadingHTTPServer):
    # Handler threads are joined on shutdown, never left as daemons: a daemon thread woken
    # during interpreter exit aborts the process ("FATAL: exception not rethrown").
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, engine, tokenizer, model_name: str, chat_format: str,
                 default_max_tokens: int = 256, limits: Limits = Limits(),
                 api_key: str | None = None):
        super().__init__(address, _Handler)
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.chat_format = model_name, chat_format
        self.default_max_tokens = default_max_tokens
        self.limits, self.api_key = limits, api_key
        positions = getattr(getattr(engine, "config", None), "max_position_embeddings", None)
        self.context_len = min(engine.max_len, positions or engine.max_len)
        self._connections: dict[socket.socket, float | None] = {}  # -> read deadline
        self._connections_lock = threading.Lock()
        self._closing = threading.Event()
        self.worker = EngineWorker(engine)
        self.worker.start()
        self._reaper = threading.Thread(target=self._reap, name="server-reaper", daemon=True)
        self._reaper.start()

    # -- connections ------------------------------------------------------------------
    def process_request(self, request, client_address):
        with self._connections_lock:
            full = len(self._connections) >= self.limits.max_connections
            if not full:
                self._connections[request] = time.monotonic() + self.limits.request_timeout_s
        if full:
            _refuse(request, 503, "too many open connections; retry later")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def set_deadline(self, conn, deadline: float | None) -> None:
        with self._connections_lock:
            if conn in self._connections:
                self._connections[conn] = deadline

    def open_connections(self) -> int:
        with self._connections_lock:
            return len(self._connections)

    def _reap(self) -> None:
        """Cut off connections that take longer than the request deadline to send a request."""
        while not self._closing.wait(0.2):
            now = time.monotonic()
            with self._connections_lock:
                late = [c for c, d in self._connections.items() if d is not None and d < now]
                for c in late:
                    self._connections[c] = None
            for conn in late:
                _shut(conn)

    def shutdown(self) -> None:
        """Stop accepting, end kept-alive connections, then join every thread we started."""
        super().shutdown()
        self._closing.set()
        with self._connections_lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            _shut(conn)
        self.server_close()  # joins the handler threads (block_on_close)
        self.worker.stop()
        self.worker.join()
        self._reaper.join()


def _shut(conn) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _refuse(conn, status: int, message: str) -> None:
    """A minimal reply written from the accept thread (never blocks: short timeout)."""
    data = json.dumps(error_body(message, None, "server_error")).encode()
    head = (f"HTTP/1.1 {status} {'Service Unavailable' if status == 503 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        conn.settimeout(0.5)
        conn.sendall(head + data)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default
        pass

    def setup(self):
        self.timeout = self.server.limits.io_timeout_s  # every read and write on the socket
        super().setup()

    def handle_one_request(self):
        # The deadline covers waiting for the next request on a kept-alive connection too.
        self.server.set_deadline(self.connection, time.monotonic() + self.server.limits.request_timeout_s)
        self._replied = False
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    # -- plumbing -----------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self._replied = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param=None, code=None, close=False) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            kind = "authentication_error"
        self._send_json(status, error_body(message, param, kind, code), close)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (bad request line, header too long...) as JSON too."""
        self.close_connection = True
        try:
            self._error(code, message or "bad request", close=True)
        except OSError:
            pass

    def _refuse_unread(self, status: int, message: str) -> None:
        """Reply, then drain (and drop) what the client is still sending for a moment before
        closing: closing on unread data resets the connection, and the client would lose
        the reply. Bounded in time and bytes; nothing is kept."""
        self._error(status, message, close=True)
        self.wfile.flush()
        # The drain has its own bound: the request deadline would cut it off mid-body on a
        # loaded machine, and the reset would lose the reply (seen in CI, 2 MB at 64 KB).
        end, left = time.monotonic() + _LINGER_S, _LINGER_BYTES
        self.server.set_deadline(self.connection, end + 0.5)
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_IDLE_S)
            while left > 0 and time.monotonic() < end:
                data = self.connection.recv(min(left, 65536))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(token.strip().encode("latin-1", "replace"), key.encode())

    def do_GET(self):
        self.server.set_deadline(self.connection, None)
        path = self.path.rstrip("/")
        if path == "/health":
            worker = self.server.worker
            if worker.healthy:
                return self._send_json(200, {"status": "ok", "step_failures": worker.step_failures})
            return self._send_json(503, {"status": "error", "error": worker.fatal or "engine thread not running"})
        if path == "/v1/models":
            if not self._authorized():
                return self._error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "lumos-jax",
                 "max_model_len": self.server.context_len}]})
        self._error(404, f"unknown path {self.path[:200]}")

    def do_POST(self):
        kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(self.path.rstrip("/"))
        # Refusals before the body is read end the connection: the unread body can't be skipped.
        if kind is None:
            return self._refuse_unread(404, f"unknown path {self.path[:200]}")
        if not self._authorized():
            return self._refuse_unread(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
        try:
            raw = read_body(self.rfile, self.headers, self.server.limits.max_body_bytes)
        except BodyError as e:
            return self._refuse_unread(e.status, str(e))
        self.server.set_deadline(self.connection, None)
        try:
            job = self._job(kind, raw)
        except RequestError as e:
            return self._error(e.status, str(e), e.param, e.code)
        except ValueError as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 - a bug must still answer this request only
            return self._error(500, f"internal error ({type(e).__name__}: {e})")
        if not self.server.worker.healthy:
            return self._error(503, "the engine thread stopped; restart the server")
        self.server.worker.submit(job)
        rid = new_id(kind)
        try:
            if job.parsed.stream:
                self._stream(job, rid)
            else:
                self._respond(job, rid)
        except (ConnectionError, TimeoutError, OSError):
            self.server.worker.cancel(job)  # the client left or stopped reading: free its slot
            self.close_connection = True
        except Exception as e:  # noqa: BLE001
            self.server.worker.cancel(job)
            if not self._replied:
                self._error(500, f"internal error ({type(e).__name__}: {e})")
            self.close_connection = True

    def _job(self, kind: str, raw: bytes) -> _Job:
        srv, tok = self.server, self.server.tokenizer
        parsed = parse_request(decode_json(raw), kind, srv.default_max_tokens, tok.eos_id, srv.model_name)
        if parsed.kind == "chat":
            ids = chat_prompt_ids(parsed.messages, tok, srv.chat_format)
        else:
            ids = tok.encode(parsed.prompt_text, add_bos=True)
        room = srv.context_len - len(ids)
        want = parsed.sampling.max_new_tokens
        if want > room and not parsed.explicit_max_tokens and room >= 1:
            parsed.sampling = dataclasses.replace(parsed.sampling, max_new_tokens=room)
        elif want > room:
            raise RequestError(f"this model's maximum context length is {srv.context_len} "
                               f"tokens; the prompt has {len(ids)} and max_tokens asks for {want}",
                               "max_tokens" if room >= 1 else "prompt")
        return _Job(ids, parsed)

    def _wait(self, job):
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.server.worker.is_alive():
                    return ("error", (503, "the engine thread stopped"))

    def _text(self, job, tokens) -> str:
        tok = self.server.tokenizer
        if job.parsed.kind == "completion":
            return completion_text(tok, job.ids, tokens)
        return tok.decode(tokens)

    def _respond(self, job, rid):
        while True:
            event, payload = self._wait(job)
            if event == "error":
                return self._error(*payload)
            if event == "done":
                text, cut = cut_at_stop(self._text(job, payload.tokens), job.parsed.stops)
                finish = "stop" if cut or payload.finish_reason == "stop" else payload.finish_reason
                return self._send_json(200, response(job.parsed.kind, rid, self.server.model_name,
                                                     text, finish, len(job.ids), len(payload.tokens)))

    def _stream(self, job, rid):
        self._replied = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        kind, model = job.parsed.kind, self.server.model_name
        hold = max((len(s) for s in job.parsed.stops), default=1) - 1
        sent = 0
        first = True

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        while True:
            event, payload = self._wait(job)
            if event == "error":
                send(error_body(payload[1], None, "server_error"))
                break
            tokens = payload if event == "tokens" else payload.tokens
            text, cut = cut_at_stop(self._text(job, tokens), job.parsed.stops)
            done = event == "done"
            # hold back a possible partial stop string (and a partial UTF-8 character)
            upto = len(text) if done else max(sent, len(text) - hold)
            if not done and text.endswith("\ufffd"):
                upto = min(upto, len(text) - 1)
            if upto > sent or first:
                send(chunk(kind, rid, model, text[sent:upto], None, first))
                sent, first = max(sent, upto), False
            if done:
                finish = "stop" if cut or payload.finish_reason == "stop" else payload.finish_reason
                send(chunk(kind, rid, model, None, finish))
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(engine, tokenizer, host: str = "127.0.0.1", port: int = 8000,
                model_name: str = "lumos", chat_format: str = "train",
                default_max_tokens: int = 256, limits: Limits = Limits(),
                api_key: str | None = None) -> OpenAIServer:
    """A bound server (not yet serving). A port in use -> ValueError with one line."""
    if engine.tokenizer is None:
        engine.tokenizer = tokenizer
    try:
        return OpenAIServer((host, port), engine, tokenizer, model_name, chat_format,
                            default_max_tokens, limits, api_key)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def api_key_from_env(name: str | None) -> str | None:
    if not name:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise ValueError(f"--api_key_env {name}: the environment variable {name} is not set or empty")
    return key.strip()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax serve", description=__doc__)
    parser.add_argument("--model", required=True, help="HF directory or lumos-jax checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default="lumos", help="the name /v1/models reports")
    parser.add_argument("--default_max_tokens", type=int, default=256)
    parser.add_argument("--api_key_env", help="require 'Authorization: Bearer KEY', KEY read from "
                        "this environment variable")
    parser.add_argument("--max_body_bytes", type=int, default=Limits.max_body_bytes)
    parser.add_argument("--request_timeout_s", type=float, default=Limits.request_timeout_s)
    parser.add_argument("--io_timeout_s", type=float, default=Limits.io_timeout_s)
    parser.add_argument("--max_connections", type=int, default=Limits.max_connections)
    args = parse_args(parser, argv)
    api_key = api_key_from_env(args.api_key_env)
    limits = Limits(args.max_body_bytes, args.request_timeout_s, args.io_timeout_s, args.max_connections)
    tok = Tokenizer(args.tokenizer or args.model)
    (engine,) = load_engines([args.model], tokenizer=tok).values()
    server = make_server(engine, tok, args.host, args.port, args.model_name, chat_format(),
                         args.default_max_tokens, limits, api_key)
    if server.context_len < engine.max_len:
        logger.warning("lumos-jax serve: the model has %d positions; requests are limited to %d tokens "
                       "(engine max_len %d)", server.context_len, server.context_len, engine.max_len)
    logger.info("lumos-jax serve: http://%s:%d/v1 (%d slots, context %d tokens%s)", args.host,
                server.server_address[1], engine.num_slots, server.context_len,
                ", API key required" if api_key else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
