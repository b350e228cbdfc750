"""`ftune serve`: an OpenAI-compatible HTTP server (GET /v1/models, POST /v1/chat/completions with
optional streaming) over one base and many adapters.

Non-streaming requests that arrive within `batch_window_ms` of each other are answered together in
one batched generate, whatever adapters they name (AdapterPool.generate). Streaming requests are
answered one at a time, token by token, as server-sent events. Standard library HTTP only.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ftune.errors import FtuneError
from ftune.serve.engine import AdapterPool, Request


class Batcher:
    """Collects requests for a short window, then generates them as one batch."""

    def __init__(self, pool: AdapterPool, window_ms: int = 20, max_batch: int = 16):
        self.pool, self.window, self.max_batch = pool, window_ms / 1000, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # batch sizes served, for tests and logs
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, request: Request) -> Any:
        slot: queue.Queue = queue.Queue(maxsize=1)
        self.queue.put((request, slot))
        result = slot.get()
        if isinstance(result, Exception):
            raise result
        return result

    def _loop(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.batches.append(len(items))
            try:
                results = self.pool.generate([r for r, _ in items])
            except Exception as exc:  # noqa: BLE001  (each waiting request gets the error)
                results = [exc] * len(items)
            for (_, slot), result in zip(items, results):
                slot.put(result)


def parse_request(body: dict, pool: AdapterPool) -> Request:
    model = body.get("model") or pool.names[1 if len(pool.names) > 1 else 0]
    if model not in pool.names:
        raise FtuneError(f"unknown model '{model}'", [f"served: {', '.join(pool.names)}"])
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
        raise FtuneError("messages must be a non-empty list ending with a user message")
    return Request(model=model, messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                   max_tokens=int(body.get("max_tokens") or 128), temperature=float(body.get("temperature") or 0.0))


def usage(prompt: int, completion: int) -> dict:
    """Token counts as the OpenAI API reports them."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_handler(pool: AdapterPool, batcher: Batcher) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the CLI prints its own lines
            return

        def _json(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "ftune"}
                                                             for n in pool.names]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                request = parse_request(body, pool)
            except (FtuneError, ValueError, KeyError, TypeError) as exc:
                self._json(400, {"error": {"message": str(exc)}})
                return
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
            if body.get("stream"):
                self._stream(request, rid, created, body)
                return
            try:
                result = batcher.submit(request)
            except FtuneError as exc:
                self._json(400, {"error": {"message": str(exc)}})
                return
            self._json(200, {"id": rid, "object": "chat.completion", "created": created, "model": request.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                          "finish_reason": result["finish"]}],
                             "usage": usage(result["prompt_tokens"], len(result["ids"]))})

        def _stream(self, request: Request, rid: str, created: int, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(delta: dict, reason: str | None = None) -> None:
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": request.model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant"})
            counts: dict = {}
            for piece in pool.stream(request, counts):
                if piece:
                    event({"content": piece})
            event({}, counts.get("finish", "stop"))
            if (body.get("stream_options") or {}).get("include_usage") and counts:
                # As the OpenAI API does: one last chunk with no choices and the request's usage.
                last = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": request.model,
                        "choices": [], "usage": usage(counts["prompt_tokens"], counts["completion_tokens"])}
                self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def serve(pool: AdapterPool, host: str = "127.0.0.1", port: int = 8000, window_ms: int = 20) -> ThreadingHTTPServer:
    """A started server (in a background thread); call .shutdown() to stop it."""
    batcher = Batcher(pool, window_ms)
    server = ThreadingHTTPServer((host, port), make_handler(pool, batcher))
    server.batcher = batcher  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
