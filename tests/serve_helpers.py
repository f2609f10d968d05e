"""Starting the HTTP server for tests: a tiny random checkpoint, uvicorn in a background
thread (most tests) or `python serve_api.py` in a subprocess (signals, start-up errors)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

import httpx
import torch
import uvicorn

import serve_api
from model import GPT, GPTConfig, model_checkpoint, save_checkpoint
from tokenizer import TOKENIZER_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_SCRIPT = os.path.join(REPO, "serve_api.py")


def write_tiny_checkpoint(path, block_size: int = 128, seed: int = 0) -> str:
    """A random 2x64 model in the training script's checkpoint layout."""
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=block_size)
    save_checkpoint(str(path), model_checkpoint(GPT(config), TOKENIZER_NAME))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(base_url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout} s")


@dataclass
class ThreadServer:
    app: object
    url: str
    loop: asyncio.AbstractEventLoop | None = None  # the server's, to run app coroutines on

    @property
    def runtime(self) -> serve_api.Runtime:
        return self.app.state.runtime


@contextlib.contextmanager
def thread_server(model_path: str, **overrides):
    """create_app + uvicorn.Server on a free port in a daemon thread (no signal handlers
    there); stopped through should_exit, which runs the app's lifespan shutdown."""
    settings = replace(serve_api.Settings(), model_path=model_path, port=free_port(), **overrides)
    app = serve_api.create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    handle = ThreadServer(app, f"http://127.0.0.1:{settings.port}")

    async def serve():
        handle.loop = asyncio.get_running_loop()
        await server.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_until_ready(handle.url)
        yield handle
    finally:
        server.should_exit = True
        thread.join(30)


def start_server_process(args: list[str], env: dict | None = None, log_path=None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, SERVER_SCRIPT, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing clients rely on: every
    event is exactly one `data: ...` line followed by a blank line, and no comments."""
    assert raw.endswith("\n\n"), f"stream does not end with a blank line: {raw[-40:]!r}"
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"bad SSE event {event!r}"
    return [event[len("data: "):] for event in events]


def parse_stream(raw: str) -> tuple[list[dict], bool]:
    """(JSON chunks, whether the stream ended with [DONE]); [DONE] must be the last event."""
    payloads = sse_events(raw)
    done = payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in (payloads[:-1] if done else payloads)], done
