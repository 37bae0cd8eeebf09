"""`lumos-jax serve`: an OpenAI-compatible HTTP server over the engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (Lumos chat template, see
`inference.chat`), GET /v1/models, GET /health. Both POSTs stream with `"stream": true`
(server-sent events). HTTP handler threads parse and validate requests and hand them to
one engine thread, which batches every request in flight through the engine's slots
(continuous batching) and streams tokens back per request. A bad request gets a 4xx JSON
error naming the problem; the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

from lumos_jax.inference.openai_api import (RequestError, chunk, cut_at_stop, error_body, new_id,
                                            parse_request, response)

_POLL_S = 0.05


class _Job:
    def __init__(self, ids, parsed):
        self.ids, self.parsed = ids, parsed
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False


class EngineWorker(threading.Thread):
    """The only thread that touches the engine: admits jobs, steps, reports progress."""

    def __init__(self, engine):
        super().__init__(daemon=True, name="engine-worker")
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self._stop_event = threading.Event()

    def submit(self, job: _Job) -> None:
        self.inbox.put(job)

    def cancel(self, job: _Job) -> None:
        """Free the request's slot (the client went away); done on the engine thread."""
        job.cancelled = True
        self.inbox.put(job)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        engine = self.engine
        while not self._stop_event.is_set():
            try:
                job = self.inbox.get(timeout=_POLL_S) if not engine.busy else self.inbox.get_nowait()
            except queue.Empty:
                job = None
            while job is not None:
                try:
                    if job.cancelled:
                        engine.cancel(job)
                    else:
                        engine.submit(job.ids, job.parsed.sampling, request_id=job)
                except ValueError as e:
                    job.events.put(("error", (400, str(e))))
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    job = None
            if not engine.busy:
                continue
            try:
                finished = engine.step()
            except Exception as e:  # report to every waiting request, keep serving
                for rid in list(engine.progress()):
                    rid.events.put(("error", (500, f"engine failure: {e}")))
                raise
            for rid, tokens in engine.progress().items():
                rid.events.put(("tokens", tokens))
            for r in finished:
                r.request_id.events.put(("done", r))


class OpenAIServer(ThreadingHTTPServer):
    # Handler threads are joined on shutdown, never left as daemons: a daemon thread woken
    # during interpreter exit aborts the process ("FATAL: exception not rethrown").
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, engine, tokenizer, model_name: str, chat_format: str,
                 default_max_tokens: int = 256):
        super().__init__(address, _Handler)
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.chat_format = model_name, chat_format
        self.default_max_tokens = default_max_tokens
        self.worker = EngineWorker(engine)
        self.worker.start()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def shutdown(self) -> None:
        """Stop accepting, end kept-alive connections, then join every thread we started."""
        super().shutdown()
        with self._connections_lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()  # joins the handler threads (block_on_close)
        self.worker.stop()
        self.worker.join()


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default
        pass

    # -- plumbing -----------------------------------------------------------------------
    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param=None) -> None:
        self._send_json(status, error_body(message, param,
                                           "invalid_request_error" if status < 500 else "server_error"))

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "lumos-jax"}]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"unknown path {self.path}")

    def do_POST(self):
        kind = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}.get(self.path.rstrip("/"))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if kind is None:
            return self._error(404, f"unknown path {self.path}")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"request body is not valid JSON ({e})")
        srv = self.server
        tok = srv.tokenizer
        try:
            parsed = parse_request(body, kind, srv.default_max_tokens, tok.eos_id)
            if parsed.kind == "chat":
                from lumos_jax.inference.chat import chat_prompt_ids

                ids = chat_prompt_ids(parsed.messages, tok, srv.chat_format)
            else:
                ids = tok.encode(parsed.prompt_text, add_bos=True)
            need = len(ids) + parsed.sampling.max_new_tokens
            if need > srv.engine.max_len:
                raise RequestError(f"this model's maximum context length is {srv.engine.max_len} "
                                   f"tokens; the prompt has {len(ids)} and max_tokens asks for "
                                   f"{parsed.sampling.max_new_tokens}", "max_tokens")
        except RequestError as e:
            return self._error(e.status, str(e), e.param)
        except ValueError as e:
            return self._error(400, str(e))
        job = _Job(ids, parsed)
        srv.worker.submit(job)
        rid = new_id(kind)
        if parsed.stream:
            self._stream(job, rid, len(ids))
        else:
            self._respond(job, rid, len(ids))

    def _wait(self, job):
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.server.worker.is_alive():
                    return ("error", (500, "the engine thread stopped"))

    def _respond(self, job, rid, n_prompt):
        while True:
            event, payload = self._wait(job)
            if event == "error":
                return self._error(*payload)
            if event == "done":
                text, cut = cut_at_stop(payload.text or "", job.parsed.stops)
                finish = "stop" if cut or payload.finish_reason == "stop" else payload.finish_reason
                return self._send_json(200, response(job.parsed.kind, rid, self.server.model_name,
                                                     text, finish, n_prompt, len(payload.tokens)))

    def _stream(self, job, rid, n_prompt):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        kind, model, tok = job.parsed.kind, self.server.model_name, self.server.tokenizer
        hold = max((len(s) for s in job.parsed.stops), default=1) - 1
        sent = 0
        first = True

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            while True:
                event, payload = self._wait(job)
                if event == "error":
                    send(error_body(payload[1], None, "server_error"))
                    break
                tokens = payload if event == "tokens" else payload.tokens
                text, cut = cut_at_stop(tok.decode(tokens), job.parsed.stops)
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
        except (BrokenPipeError, ConnectionResetError):
            self.server.worker.cancel(job)  # the client left: free its slot


def make_server(engine, tokenizer, host: str = "127.0.0.1", port: int = 8000,
                model_name: str = "lumos", chat_format: str = "training",
                default_max_tokens: int = 256) -> OpenAIServer:
    if engine.tokenizer is None:
        engine.tokenizer = tokenizer
    return OpenAIServer((host, port), engine, tokenizer, model_name, chat_format, default_max_tokens)


def main(argv: Sequence[str]) -> int:
    from lumos_jax.config import parse_args
    from lumos_jax.inference import Engine
    from lumos_jax.inference.chat import chat_format
    from lumos_jax.inference.settings import engine_settings
    from lumos_jax.sharding import make_mesh
    from lumos_jax.tokenization import Tokenizer

    parser = argparse.ArgumentParser(prog="lumos-jax serve", description=__doc__)
    parser.add_argument("--model", required=True, help="HF directory or lumos-jax checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory or tokenizer.model (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default="lumos", help="the name /v1/models reports")
    parser.add_argument("--default_max_tokens", type=int, default=256)
    args = parse_args(parser, argv)
    tok = Tokenizer(args.tokenizer or args.model)
    engine = Engine.from_path(args.model, mesh=make_mesh(), tokenizer=tok, **engine_settings())
    server = make_server(engine, tok, args.host, args.port, args.model_name, chat_format(),
                         args.default_max_tokens)
    print(f"lumos-jax serve: http://{args.host}:{server.server_address[1]}/v1 "
          f"({engine.num_slots} slots, max_len {engine.max_len})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
