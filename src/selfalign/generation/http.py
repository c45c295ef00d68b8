"""One JSON request to an OpenAI-compatible server, with retries: what the openai backend and the
evaluation judge both send through. Reads and writes no files.

HTTP 429, 5xx, a lost connection or no reply within `timeout` seconds are retried `retries` times
with exponential backoff (or the server's Retry-After, capped at MAX_RETRY_WAIT), one WARNING line
per retry; any other HTTP error fails at once. The last failure is a `RequestFailed`, a one-line
`UserError` naming the URL. The API key travels only in the Authorization header: it is scrubbed
from every message, should a server echo it.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from selfalign.errors import UserError

log = logging.getLogger(__name__)

MAX_RETRY_WAIT = 60.0  # seconds: the longest backoff or Retry-After honoured


class RequestFailed(UserError):
    """A request that failed: `status` is the HTTP status (None when there was no reply),
    `detail` the server's message or why there was no reply."""

    def __init__(self, url: str, status: int | None, detail: str, attempts: int = 1):
        self.url, self.status, self.detail = url, status, detail
        what = f"HTTP {status} from the server" if status else "no reply from the server"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{url}: {what}{tries}: {detail}")


def server_message(raw: bytes) -> str:
    """The message in an error reply (OpenAI's {"error": {"message": ...}}, vLLM's {"message":
    ...}, or plain text) on one line, at most 300 characters."""
    text = raw.decode(errors="replace")
    try:
        reply = json.loads(text)
        error = reply.get("error", reply) if isinstance(reply, dict) else reply
        text = error.get("message", text) if isinstance(error, dict) else str(error)
    except json.JSONDecodeError:
        pass
    return " ".join(str(text).split())[:300]


def retry_wait(attempt: int, backoff: float, retry_after: str | None) -> float:
    """Seconds before retry `attempt` (1, 2, ...): the server's Retry-After when it gives a number
    of seconds, else `backoff` doubling per attempt; at most MAX_RETRY_WAIT either way."""
    try:
        wait = float(retry_after) if retry_after is not None else backoff * 2 ** (attempt - 1)
    except ValueError:  # an HTTP date: not worth parsing, use our own backoff
        wait = backoff * 2 ** (attempt - 1)
    return min(max(wait, 0.0), MAX_RETRY_WAIT)


def wait(cancel: threading.Event | None, seconds: float) -> bool:
    """Sleep `seconds`, or less when `cancel` is set; whether it was set."""
    if cancel is None:
        cancel = threading.Event()
    return cancel.wait(seconds)


@dataclass(frozen=True)
class Client:
    """Where requests go and how hard to try. `timeout_setting` is the setting a timeout message
    names (the user's knob for it)."""

    base_url: str
    api_key: str = field(default="", repr=False)
    timeout: float = 600.0
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubling (tests use 0)
    timeout_setting: str = "model.timeout"

    def send(
        self,
        path: str,
        body: dict | None = None,
        cancel: threading.Event | None = None,
        pause: Callable[[threading.Event | None, float], bool] = wait,
    ) -> bytes:
        """GET `path` (POST `body` when given) and return the reply. Retries as the module doc
        says, each after `pause(cancel, seconds)`, until that returns True (cancelled)."""
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(1, self.retries + 2):
            retry_after = None
            try:
                request = urllib.request.Request(url, data=data, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                failure = RequestFailed(url, e.code, self.scrub(server_message(e.read())))
                if e.code != 429 and e.code < 500:
                    raise failure from None
                retry_after = e.headers.get("Retry-After")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                if isinstance(reason, TimeoutError):
                    reason = f"timed out after {self.timeout:g} s ({self.timeout_setting})"
                failure = RequestFailed(url, None, self.scrub(str(reason)))
            if attempt > self.retries:
                raise RequestFailed(url, failure.status, failure.detail, attempt) from None
            seconds = retry_wait(attempt, self.backoff, retry_after)
            what = (
                f"HTTP {failure.status} from {url}"
                if failure.status
                else f"no reply from {url}: {failure.detail}"
            )
            log.warning("%s; retry %d/%d in %g s", what, attempt, self.retries, seconds)
            if pause(cancel, seconds):
                raise failure from None
        raise AssertionError("unreachable")

    def scrub(self, text: str) -> str:
        """`text` without the API key, should a server echo it."""
        return text.replace(self.api_key, "***") if self.api_key else text
