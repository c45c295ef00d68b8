"""A fake OpenAI-compatible completions server on 127.0.0.1 for the tests (stdlib, in a thread).

`serve(reply)` calls `reply(body)` for every POSTed request body and answers with what it returns:
a dict (sent as JSON, status 200) or `(status, raw bytes)`. Returns (base_url, requests seen, the
server); stop it with `.shutdown()`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve(reply: Callable[[dict], Any], seen: list | None = None, record=None):
    seen = [] if seen is None else seen

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(record(body, self.headers) if record else body)
            answer = reply(body)
            status, data = (
                answer if isinstance(answer, tuple) else (200, json.dumps(answer).encode())
            )
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen, httpd
