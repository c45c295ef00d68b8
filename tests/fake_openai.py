"""A fake OpenAI-compatible completions server on 127.0.0.1 for the tests (stdlib, in a thread).

`serve(reply)` calls `reply(body)` for every POSTed request body and answers with what it returns:
a dict (sent as JSON, status 200), `(status, raw bytes)` or `(status, raw bytes, headers)`.
`reply` runs in the request's own thread, so it may block (a slow request).
GET /models answers from `models`: a list of model names (OpenAI's model list), a `(status, raw
bytes)` reply, or None (default) for HTTP 404, as a server without the endpoint.
Returns (base_url, requests seen, the server); `server.gets` lists the paths of GET requests.
Stop it with `.shutdown()`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve(reply: Callable[[dict], Any], seen: list | None = None, record=None, models=None):
    seen = [] if seen is None else seen
    gets: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(record(body, self.headers) if record else body)
            self.answer(reply(body))

        def do_GET(self):  # noqa: N802
            gets.append(self.path)
            if not self.path.endswith("/models") or models is None:
                self.answer((404, b'{"detail": "Not Found"}'))
            elif isinstance(models, tuple):
                self.answer(models)
            else:
                self.answer({"object": "list", "data": [{"id": m} for m in models]})

        def answer(self, answer):
            if not isinstance(answer, tuple):
                answer = (200, json.dumps(answer).encode())
            status, data, headers = (*answer, {})[:3]
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.gets = gets
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen, httpd
