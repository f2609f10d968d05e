"""Load benchmark of the completion server: throughput, latency, time to first token, rejections
and cost per 1K tokens at rising concurrency, against a one-at-a-time baseline in the same run.

    python bench_serve.py --ckpt out-code-assistant/best.pt          (make bench)
    python bench_serve.py --url http://127.0.0.1:8000 [--baseline-url URL]

With --ckpt it starts serve_api.py itself on a free loopback port (and again as the baseline:
with --max-batch 1, or with --compare prefix-cache the same settings and --no-prefix-cache),
waits for /ready, and stops it with SIGTERM at the end. With a baseline, a few fixed prompts
are first sent to both servers at temperature 0, one at a time, and their completions compared
("greedy_identity" in the JSON). Each level reports the server's prefix-cache figures (hit rate,
prompt tokens prefilled per request) from /metrics. Every virtual user is
an asyncio task on one aiohttp.ClientSession, so 256 users cost 256 sockets, not 256 threads.

Workloads:
  independent  closed loop: each user sends a streamed completion of a prompt cut from a
               held-out file, waits for it, sends the next.
  typing       an editor plugin: the cursor advances a few characters at a time, a FIM request
               (prompt + suffix) goes out after a debounce pause, and the user's previous
               in-flight request is cancelled by closing its stream. The plugin cuts the text
               before the cursor on a grid of --typing-window-step tokens, as the server's own
               truncation does (1: exactly the last N tokens, so the start moves at every
               keystroke and no prompt can reuse the previous one's KV).

Prints a table, writes bench/results-<timestamp>.json and a .png plot beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import aiohttp

from tokenizer import FIM_LAYOUTS

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
COMPARISONS = {  # --compare: the baseline's extra serve_api.py arguments, and its max-batch (None: the engine's)
    "max-batch-1": ((), 1),  # the seed's one-request-at-a-time design
    "prefix-cache": (("--no-prefix-cache",), None),  # the same server without prefix caching
    "engine-thread": (("--no-engine-process",), None),  # the engine in the HTTP process (a thread), sharing its GIL
}
GREEDY_PROBES = 12  # prompts sent to both servers at temperature 0 to compare their completions
PREFIX_METRICS = {  # level field: regex of the server's counter
    "queries": r"\w*prefix_cache_queries_total", "hits": r"\w*prefix_cache_hits_total",
    "query_tokens": r"\w*prefix_cache_query_tokens_total", "hit_tokens": r"\w*prefix_cache_hit_tokens_total",
    "prefilled_tokens": r"\w*prefill_tokens_total", "evictions": r"\w*prefix_cache_evictions_total",
}
# Distinct prompts, handed out in turn (never twice until all are used): repeating a prompt
# would let the prefix cache serve it, which an "independent" workload must not allow.
PROMPT_POOL_SIZE = 8192
MAX_BACKOFF_S = 2.0  # cap on a rejected user's Retry-After pause
LEVEL_GRACE_S = 5.0  # a level's hard deadline: duration + request timeout + this
FIM_OVERHEAD_TOKENS = 4  # the FIM special tokens a server adds around prefix and suffix
OUTCOMES = ("ok", "error", "rejected_429", "rejected_503", "cancelled")
SUPERSEDED = "superseded"  # the message a typing user cancels its stale request with
WORKER_LEAD_S = 0.3  # load-generator processes start a level together, this long after it is handed out
CLIENT_BOUND_SHARE = 0.8  # a level whose client processes were this busy measured the client, not the server
MAX_HELD_OUT_CHARS = 4_000_000  # plenty of distinct prompts; tokenizing more only delays the start


class BenchError(Exception):
    """Why the benchmark cannot go on; one line, printed as is."""


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    url: str | None = None
    ckpt: str | None = None
    baseline: bool | None = None  # None: on with --ckpt, off with --url
    baseline_url: str | None = None
    workload: str = "independent"
    levels: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 256])
    waves: int = 1  # the sweep of levels, this many times in a row against the same servers
    duration: float = 20.0
    requests: int = 0  # per level; 0 = bounded by duration only
    data_dir: str = "data/python_code"
    prompt_min: int = 128
    prompt_max: int = 512
    max_tokens: int = 48
    stop: list[str] = field(default_factory=list)  # e.g. ["\n"]: single-line completions, as editors ask
    temperature: float = 0.0
    stream: bool = True
    typing_cps: tuple[float, float] = (5.0, 10.0)
    typing_window_step: int = 64
    debounce_ms: tuple[float, float] = (150.0, 300.0)
    request_timeout: float = 60.0
    ready_timeout: float = 300.0
    max_batch: int | None = None
    max_waiting: int | None = None
    max_queue_wait: float | None = None
    prefill_chunk: int | None = None
    fim_layout: str | None = None
    compare: str = "max-batch-1"  # what the baseline server is: see COMPARISONS
    server_args: list[str] = field(default_factory=list)
    model_id: str | None = None
    api_key: str | None = None
    price_per_hour: float = 1.00
    p95_target_ms: float = 200.0
    target_metric: str = "latency"
    cancel_metric: str = r"\w*cancellations_total"
    seed: int = 0
    out_dir: str = "bench"
    progress: bool = True
    client_procs: int = 0  # load-generator processes; 0: 1 on a machine of <= 4 CPUs, else 4


def pair(text: str) -> tuple[float, float]:
    """'5,10' or '5-10' -> (5.0, 10.0); a single number -> (x, x)."""
    parts = [p for p in re.split(r"[,\-]", text) if p.strip()]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    low, high = float(parts[0]), float(parts[-1])
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def escaped(text: str) -> str:
    r"""'\n' on a command line -> a newline."""
    value = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    if not value:
        raise argparse.ArgumentTypeError("a stop sequence cannot be empty")
    return value


def level_list(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated user counts, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"user counts must be >= 1, got {text!r}")
    return levels


def parse_args(argv: list[str] | None = None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--ckpt", help="a checkpoint: start serve_api.py on loopback for the run")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also bench the same checkpoint as a baseline (see --compare; default: on with --ckpt)")
    p.add_argument("--compare", choices=tuple(COMPARISONS), default=d.compare,
                   help="the baseline: max-batch-1 (one request at a time) or prefix-cache (--no-prefix-cache)")
    p.add_argument("--baseline-url", help="with --url: a running one-at-a-time server to compare against")
    p.add_argument("--workload", choices=("independent", "typing"), default=d.workload)
    p.add_argument("--levels", type=level_list, default=d.levels, help="concurrent users, e.g. 1,8,32,128,256")
    p.add_argument("--waves", type=int, default=d.waves,
                   help="run the levels this many times against the same servers; a server's memory "
                        "(server_rss_mb, after every level) should stay flat from wave to wave")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load per level")
    p.add_argument("--requests", type=int, default=d.requests, help="stop a level after this many requests (0: no cap)")
    p.add_argument("--data-dir", default=d.data_dir, help="holds val_docs.jsonl (held-out files)")
    p.add_argument("--prompt-tokens", type=pair, default=(d.prompt_min, d.prompt_max), metavar="MIN,MAX",
                   help="prompt length range in tokens (typing: MAX bounds prefix + suffix)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--stop", action="append", type=escaped, default=[],
                   help=r"stop sequence of every request (repeatable; escapes allowed: --stop '\n')")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=d.stream)
    p.add_argument("--typing-cps", type=pair, default=d.typing_cps, metavar="LOW,HIGH", help="typing speed, chars/s")
    p.add_argument("--typing-window-step", type=int, default=d.typing_window_step, metavar="TOKENS",
                   help="typing: the plugin moves the start of its prompt in steps of this many tokens")
    p.add_argument("--debounce-ms", type=pair, default=d.debounce_ms, metavar="LOW,HIGH")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds, whole request")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds to wait for /ready")
    p.add_argument("--max-batch", type=int, help="passed to serve_api.py (default: its own)")
    p.add_argument("--max-waiting", type=int, help="passed to serve_api.py")
    p.add_argument("--max-queue-wait", type=float,
                   help="passed to serve_api.py; default: --request-timeout, so that neither server turns "
                        "a request away for waiting (the seed's server queued every request), which would "
                        "drop the baseline's slowest requests from its latency percentiles")
    p.add_argument("--prefill-chunk", type=int, help="passed to serve_api.py")
    p.add_argument("--fim-layout", choices=FIM_LAYOUTS, help="passed to serve_api.py (default: its own, spm)")
    p.add_argument("--server-arg", action="append", default=[], dest="server_args",
                   help="extra serve_api.py argument (repeatable), e.g. --server-arg=--device=cuda")
    p.add_argument("--model-id", help="model field of requests (default: the server's first /v1/models id)")
    p.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"), help="Bearer key (env BENCH_API_KEY)")
    p.add_argument("--price-per-hour", type=float, default=d.price_per_hour, help="$ per machine hour (A10G: 1.00)")
    p.add_argument("--p95-target-ms", type=float, default=d.p95_target_ms)
    p.add_argument("--target-metric", choices=("latency", "ttft"), default=d.target_metric,
                   help="which p95 the target applies to")
    p.add_argument("--cancel-metric", default=d.cancel_metric, help="regex of the server's cancellation counter")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    p.add_argument("--client-procs", type=int, default=d.client_procs,
                   help="load-generator processes, users split among them (0: 1 on <= 4 CPUs, else 4)")
    a = p.parse_args(argv)
    settings = Settings(**{k: v for k, v in vars(a).items() if k != "prompt_tokens"},
                        prompt_min=int(a.prompt_tokens[0]), prompt_max=int(a.prompt_tokens[1]))
    settings.url = settings.url.rstrip("/") if settings.url else None
    settings.baseline_url = settings.baseline_url.rstrip("/") if settings.baseline_url else None
    if settings.baseline is None:
        settings.baseline = bool(settings.ckpt or settings.baseline_url)
    if settings.baseline and settings.url and not settings.baseline_url:
        p.error("--baseline with --url needs --baseline-url (or use --ckpt)")
    if settings.duration <= 0 or settings.request_timeout <= 0 or settings.max_tokens < 1 or settings.waves < 1:
        p.error("--duration, --request-timeout, --max-tokens and --waves must be positive")
    if settings.typing_window_step < 1:
        p.error("--typing-window-step must be >= 1")
    if settings.client_procs < 0:
        p.error("--client-procs must be >= 0")
    return settings


# ----------------------------------------------------------------------------- workload data


@dataclass
class HeldOutFile:
    text: str
    token_starts: list[int]  # character offset where each token begins
    line_starts: list[int]


def load_held_out(data_dir: str, tokenizer) -> list[HeldOutFile]:
    path = os.path.join(data_dir, "val_docs.jsonl")
    if not os.path.isfile(path):
        raise BenchError(f"held-out files not found: {path} (run `make data`, or pass --data-dir)")
    files, chars = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if chars > MAX_HELD_OUT_CHARS:
                break
            text = json.loads(line)["text"]
            ids = tokenizer.encode_ordinary(text)
            _, starts = tokenizer.decode_with_offsets(ids)
            line_starts = [0] + [m.end() for m in re.finditer("\n", text) if m.end() < len(text)]
            files.append(HeldOutFile(text, starts, line_starts))
            chars += len(text)
    if not files:
        raise BenchError(f"{path} holds no files")
    return files


def cut_prompt(doc: HeldOutFile, rng: random.Random, n_tokens: int, tokenizer) -> str | None:
    """Exactly n_tokens (as the server will count them) of text from a random line start;
    None if the file is too short there."""
    start = rng.choice(doc.line_starts)
    # The file's own token offsets find the slice cheaply; re-encoding it makes the count exact
    # (a token of the whole file may straddle the line start).
    end_token = bisect.bisect_left(doc.token_starts, start) + n_tokens + 2
    if end_token >= len(doc.token_starts):
        return None
    ids = tokenizer.encode_ordinary(doc.text[start:doc.token_starts[end_token]])[:n_tokens]
    return tokenizer.decode(ids) if len(ids) == n_tokens else None


def prompt_pool(files: list[HeldOutFile], settings: Settings, tokenizer) -> list[str]:
    """A fixed pool, drawn with the run's seed, so the engine and the baseline see the same prompts."""
    rng = random.Random(settings.seed)
    pool: list[str] = []
    seen: set[str] = set()
    for _ in range(PROMPT_POOL_SIZE * 20):
        prompt = cut_prompt(rng.choice(files), rng, rng.randint(settings.prompt_min, settings.prompt_max), tokenizer)
        if prompt and prompt.strip() and prompt not in seen:
            seen.add(prompt)
            pool.append(prompt)
            if len(pool) == PROMPT_POOL_SIZE:
                return pool
    if not pool:
        raise BenchError(f"no held-out file has {settings.prompt_min} tokens after a line start "
                         f"(lower --prompt-tokens)")
    return pool


class Editor:
    """One user's editor: they retype a region of a held-out file; the text after the region
    is the suffix, the text before the cursor the prefix (both cut to token budgets, as plugins do)."""

    def __init__(self, files: list[HeldOutFile], rng: random.Random, prefix_tokens: int, suffix_tokens: int,
                 window_step: int = 1):
        self.files, self.rng = files, rng
        self.prefix_tokens, self.suffix_tokens = prefix_tokens, suffix_tokens
        self.window_step = max(1, min(window_step, prefix_tokens // 4))  # never give up over 1/4 of the prefix
        self.jump()

    def jump(self) -> None:
        """Start typing a few lines somewhere else."""
        self.doc = self.rng.choice(self.files)
        starts = self.doc.line_starts
        i = self.rng.randrange(len(starts))
        j = min(len(starts) - 1, i + self.rng.randint(2, 8))
        self.cursor = starts[i]
        self.region_end = starts[j] if j > i else len(self.doc.text)

    def type(self, n_chars: int) -> None:
        self.cursor += n_chars
        if self.cursor >= self.region_end:
            self.jump()

    def context(self) -> tuple[str, str]:
        starts, text = self.doc.token_starts, self.doc.text
        at = max(0, bisect.bisect_right(starts, self.cursor) - 1)
        # The first token kept is on a grid of the file's tokens, so it stays put while typing.
        first = -(-max(0, at - self.prefix_tokens) // self.window_step) * self.window_step
        prefix_start = starts[min(first, at)] if starts else 0
        after = bisect.bisect_left(starts, self.region_end) + self.suffix_tokens
        suffix_end = starts[after] if after < len(starts) else len(text)
        return text[prefix_start:self.cursor], text[self.region_end:suffix_end]


# ----------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    outcome: str  # one of OUTCOMES
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    detail: str = ""  # why it was not ok, for the report
    retry_after: float | None = None


@dataclass
class Recorder:
    """What one level's requests did. Every request that starts adds exactly one result,
    whatever happens to it, so sent == len(results) always."""

    request_timeout: float
    sent: int = 0
    closing: bool = False  # set at the hard deadline: requests cut then are errors, not user cancels
    results: list[RequestResult] = field(default_factory=list)


def retry_after_of(headers) -> float | None:
    try:
        return float(headers["retry-after"])
    except (KeyError, ValueError):
        return None


def error_message(body: bytes) -> str:
    """The first line of an OpenAI-shaped error's message, else of the body itself."""
    try:
        text = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError, IndexError):
        text = body.decode("utf-8", "replace")
    lines = text.strip().splitlines()
    return lines[0][:120] if lines else ""


def not_ok_result(code: int, headers, body: bytes, latency: float) -> RequestResult:
    outcome = {429: "rejected_429", 503: "rejected_503"}.get(code, "error")
    message = error_message(body)
    return RequestResult(outcome, latency, detail=f"HTTP {code}" + (f": {message}" if message else ""),
                         retry_after=retry_after_of(headers))


async def read_stream(response: aiohttp.ClientResponse, start: float) -> RequestResult:
    """Consume server-sent events to the end; tokens from the usage chunk when the server sends
    one, else one per non-empty text chunk (a lower bound when chunks carry several tokens)."""
    ttft, chunks, usage_tokens, done = None, 0, None, False
    async for raw in response.content:  # line by line
        if not raw.startswith(b"data:"):
            continue
        data = raw[5:].strip().decode()
        if data == "[DONE]":
            done = True  # read on to the end of the body so the connection can be reused
            continue
        event = json.loads(data)
        if "error" in event:  # an in-band failure after the 200 headers
            error = event["error"]
            message = str(error.get("message", error) if isinstance(error, dict) else error)[:120]
            return RequestResult("error", time.perf_counter() - start, detail=f"stream error: {message}")
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or ():
            if choice.get("text"):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
    latency = time.perf_counter() - start
    if not done:
        return RequestResult("error", latency, detail="stream ended without [DONE]")
    return RequestResult("ok", latency, ttft, usage_tokens if usage_tokens is not None else chunks)


async def exchange(client: aiohttp.ClientSession, url: str, payload: dict, start: float) -> RequestResult:
    async with client.post(url, json=payload) as response:
        if response.status != 200:
            body = await response.read()
            return not_ok_result(response.status, response.headers, body, time.perf_counter() - start)
        if payload.get("stream"):
            return await read_stream(response, start)
        body = json.loads(await response.read())
    latency = time.perf_counter() - start
    tokens = (body.get("usage") or {}).get("completion_tokens")
    return RequestResult("ok", latency, latency, tokens if tokens is not None else 0)


async def run_request(client: aiohttp.ClientSession, url: str, payload: dict, recorder: Recorder) -> RequestResult:
    recorder.sent += 1
    start = time.perf_counter()
    try:
        async with asyncio.timeout(recorder.request_timeout):
            result = await exchange(client, url, payload, start)
    except asyncio.CancelledError as exc:
        # Cancelling closes the stream (aiohttp drops an unfinished connection), which is how
        # an editor tells the server to stop generating. Only a user's own cancel counts as
        # one; a request cut by the level's hard deadline is an error.
        superseded = SUPERSEDED in exc.args or not recorder.closing
        outcome, detail = ("cancelled", "") if superseded else ("error", "level deadline")
        recorder.results.append(RequestResult(outcome, time.perf_counter() - start, detail=detail))
        raise
    except TimeoutError:
        result = RequestResult("error", time.perf_counter() - start, detail="timeout")
    except aiohttp.ClientError as exc:
        result = RequestResult("error", time.perf_counter() - start, detail=type(exc).__name__)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a malformed body or event
        result = RequestResult("error", time.perf_counter() - start, detail=f"bad response: {type(exc).__name__}")
    recorder.results.append(result)
    return result


# ----------------------------------------------------------------------------- virtual users


@dataclass
class Level:
    """Everything the users of one concurrency level share."""

    settings: Settings
    url: str  # the completions endpoint
    model_id: str
    client: aiohttp.ClientSession
    recorder: Recorder
    stop_at: float  # time.monotonic() after which no user starts a request
    tasks: set = field(default_factory=set)  # request tasks of typing users, for the hard deadline
    prompts: range = range(0)  # this level's share of the independent workload's pool
    prompts_used: int = 0

    def next_prompt(self, pool: list[str]) -> str:
        """This level's share of the pool in order: the engine and the baseline get the same
        prompts, and no prompt is sent twice in a run (the server's prefix cache outlives a
        level) unless a level uses up its share, which the report counts (repeated_prompts)."""
        prompt = pool[self.prompts[self.prompts_used % len(self.prompts)]]
        self.prompts_used += 1
        return prompt

    @property
    def repeated_prompts(self) -> int:
        return max(0, self.prompts_used - len(self.prompts))

    def keep_sending(self) -> bool:
        cap = self.settings.requests
        return time.monotonic() < self.stop_at and (cap <= 0 or self.recorder.sent < cap)

    def payload(self, prompt: str, suffix: str | None = None) -> dict:
        s = self.settings
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "stream": s.stream}
        if s.stream:
            body["stream_options"] = {"include_usage": True}
        if suffix is not None:
            body["suffix"] = suffix
        if s.stop:
            body["stop"] = s.stop
        return body


def prompt_share(pool_size: int, level_index: int, n_levels: int) -> range:
    """Pool indices for one level: after the greedy probes' prompts, an equal slice per level."""
    share = (pool_size - GREEDY_PROBES) // n_levels
    if share < 1:  # a tiny pool (test data): every level uses all of it
        return range(pool_size)
    start = GREEDY_PROBES + level_index * share
    return range(start, start + share)


def user_rng(settings: Settings, user: int) -> random.Random:
    # The same user of the same level draws the same prompts against the engine and the baseline.
    return random.Random(settings.seed * 1_000_003 + user)


async def closed_loop_user(level: Level, user: int, pool: list[str]) -> None:
    while level.keep_sending():
        result = await run_request(level.client, level.url, level.payload(level.next_prompt(pool)), level.recorder)
        if result.outcome.startswith("rejected"):
            # As the openai client does: honour Retry-After rather than hammer a full queue, so
            # rejections measure load shed, not the speed of a busy loop.
            pause = min(result.retry_after or 1.0, MAX_BACKOFF_S, max(0.0, level.stop_at - time.monotonic()))
            await asyncio.sleep(pause)


def new_editor(files: list[HeldOutFile], rng: random.Random, s: Settings) -> Editor:
    prefix_tokens = max(1, (s.prompt_max - FIM_OVERHEAD_TOKENS) * 3 // 4)
    return Editor(files, rng, prefix_tokens, max(0, s.prompt_max - FIM_OVERHEAD_TOKENS - prefix_tokens),
                  s.typing_window_step)


async def typing_user(level: Level, user: int, files: list[HeldOutFile]) -> None:
    s = level.settings
    rng = user_rng(s, user)
    editor = new_editor(files, rng, s)
    latest: asyncio.Task | None = None
    while level.keep_sending():
        step = rng.randint(1, 4)  # "a few characters at a time"
        interval = step / rng.uniform(*s.typing_cps)
        debounce = rng.uniform(*s.debounce_ms) / 1000
        editor.type(step)
        if debounce >= interval:  # the next keystroke comes first: the debounce timer restarts
            await asyncio.sleep(interval)
            continue
        await asyncio.sleep(debounce)
        if not level.keep_sending():
            break
        if latest is not None and not latest.done():
            latest.cancel(SUPERSEDED)  # the plugin aborts the stale completion
        prefix, suffix = editor.context()
        latest = asyncio.create_task(run_request(level.client, level.url, level.payload(prefix, suffix),
                                                 level.recorder))
        level.tasks.add(latest)
        latest.add_done_callback(level.tasks.discard)
        await asyncio.sleep(interval - debounce)
    if latest is not None:
        # The user stops typing: the last completion is allowed to finish.
        await asyncio.gather(latest, return_exceptions=True)


# ----------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


def rounded(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def prefix_cache_figures(before: dict, after: dict) -> dict | None:
    """A level's prefix-cache figures from the server's counters before and after it (None when
    the server exports none): hit rates, and prompt tokens prefilled per request, both as the
    lookups say (prompt minus hit tokens) and as the engine counted what it computed (lower
    when requests are cancelled before their prompt is done)."""
    delta = {k: after[k] - before[k] for k in PREFIX_METRICS if before.get(k) is not None and after.get(k) is not None}
    queries = delta.get("queries")
    if not queries or "query_tokens" not in delta or "hit_tokens" not in delta:
        return None

    def per(x):
        return round(x, 4) if x is not None else None
    return {"queries": int(queries),
            "hit_rate": per(delta["hits"] / queries) if "hits" in delta else None,
            "token_hit_rate": per(delta["hit_tokens"] / delta["query_tokens"]) if delta["query_tokens"] else None,
            "prompt_tokens_per_request": per(delta["query_tokens"] / queries),
            "prefill_tokens_per_request": per((delta["query_tokens"] - delta["hit_tokens"]) / queries),
            "computed_prefill_tokens_per_request": per(delta["prefilled_tokens"] / queries)
            if "prefilled_tokens" in delta else None,
            "evictions": int(delta["evictions"]) if "evictions" in delta else None}


def summarize(users: int, recorder: Recorder, elapsed: float, server_cancels: float | None,
              client_cpu_s: float = 0.0, prefix_cache: dict | None = None) -> dict:
    results = recorder.results
    counts = Counter(r.outcome for r in results)
    ok = [r for r in results if r.outcome == "ok"]
    latency = [r.latency_s * 1000 for r in ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tokens = sum(r.tokens for r in ok)
    sent = recorder.sent
    rejected = counts["rejected_429"] + counts["rejected_503"]
    return {
        "users": users, "elapsed_s": round(elapsed, 3), "sent": sent, "ok": counts["ok"],
        "errors": counts["error"], "rejected": rejected, "rejected_429": counts["rejected_429"],
        "rejected_503": counts["rejected_503"], "cancelled": counts["cancelled"],
        "counts_add_up": sent == counts["ok"] + counts["error"] + rejected + counts["cancelled"],
        "requests_per_s": round(counts["ok"] / elapsed, 3) if elapsed > 0 else 0.0,
        "generated_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": {f"p{q}": rounded(percentile(latency, q)) for q in (50, 95, 99)},
        "ttft_ms": {f"p{q}": rounded(percentile(ttft, q)) for q in (50, 95)},
        "rate_429": round(counts["rejected_429"] / sent, 4) if sent else 0.0,
        "rate_503": round(counts["rejected_503"] / sent, 4) if sent else 0.0,
        "error_rate": round(counts["error"] / sent, 4) if sent else 0.0,
        "server_cancellations": server_cancels,
        "prefix_cache": prefix_cache,
        # The load generator's own CPU time: near elapsed_s it was the bottleneck, not the server.
        "client_cpu_s": round(client_cpu_s, 3),
        "not_ok_details": dict(Counter(r.detail for r in results if r.outcome not in ("ok", "cancelled"))
                               .most_common(5)),
    }


def server_failed(stats: dict) -> str | None:
    """A level in which nothing succeeded and every failure was the server's fault (5xx other
    than 503, or no connection) means the server is broken: no point going on."""
    failures = stats["not_ok_details"]
    broken = [d for d in failures
              if re.match(r"HTTP 5(?!03)|ClientConnect|ClientOSError|ServerDisconnected|ClientPayload", d)]
    if stats["ok"] == 0 and stats["errors"] > 0 and sum(failures[d] for d in broken) == stats["errors"]:
        return f"{stats['errors']} of {stats['sent']} requests failed ({next(iter(failures))})"
    return None


# ----------------------------------------------------------------------------- server side


def auth_headers(settings: Settings) -> dict:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def http_get(url: str, headers: dict, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a GET, whatever the status; OSError when no answer came (refused,
    reset, timed out). The control-plane probes are a handful of calls: the stdlib is enough."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:  # a 4xx/5xx is an answer, not a transport failure
        with exc:
            return exc.code, exc.read()


def metric_samples(base_url: str, headers: dict) -> list[tuple[str, str, float]]:
    """(name, labels, value) of every sample in /metrics; [] if the server has none."""
    try:
        status, body = http_get(f"{base_url}/metrics", headers, timeout=10)
    except OSError:
        return []
    if status != 200:
        return []
    samples = []
    for line in body.decode("utf-8", "replace").splitlines():
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            samples.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return samples


def scrape_counter(base_url: str, pattern: str, headers: dict) -> float | None:
    """Sum of the samples of every metric whose name matches pattern (None if there is none)."""
    values = [v for name, _, v in metric_samples(base_url, headers) if re.fullmatch(pattern, name)]
    return sum(values) if values else None


def scrape_counters(base_url: str, patterns: dict[str, str], headers: dict) -> dict[str, float | None]:
    """{key: sum of the samples of the metrics whose name matches patterns[key]}, one scrape."""
    samples = metric_samples(base_url, headers)
    found = {}
    for key, pattern in patterns.items():
        values = [v for name, _, v in samples if re.fullmatch(pattern, name)]
        found[key] = sum(values) if values else None
    return found


def build_info(base_url: str, headers: dict) -> dict:
    """Labels of the server's *_build_info gauge (model, device, dtype...): what really served."""
    for name, labels, _ in metric_samples(base_url, headers):
        if name.endswith("build_info"):
            return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
    return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def wait_until_ready(base_url: str, settings: Settings, proc: subprocess.Popen | None = None,
                     log_path: str = "") -> dict:
    """Poll /ready until 200; returns /health's JSON (whatever the server says about itself).
    A running server (no proc) that refuses the connection fails at once: nothing will start it."""
    deadline = time.monotonic() + settings.ready_timeout
    headers = auth_headers(settings)
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"serve_api.py exited with code {proc.returncode} before it was ready: "
                             f"{last_line(log_path)} (log: {log_path})")
        try:
            status, body = http_get(f"{base_url}/ready", headers, timeout=5)
            if status in (200, 404):  # 404: a server without /ready; the preflight checks it
                break
            if status != 503:  # 503 = still loading or warming up; anything else is broken
                raise BenchError(f"server at {base_url} answered /ready with HTTP {status}: "
                                 f"{error_message(body) or 'no message'}")
        except OSError as exc:
            if proc is None:
                raise BenchError(f"cannot reach the server at {base_url}: {exc or type(exc).__name__}") from None
        if time.monotonic() > deadline:
            raise BenchError(f"server at {base_url} not ready after {settings.ready_timeout:.0f} s")
        time.sleep(0.25)
    info = {"build": build_info(base_url, headers)}
    try:
        status, body = http_get(f"{base_url}/health", headers, timeout=5)
        info["health"] = json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        info["health"] = None
    return info


def model_card(base_url: str, settings: Settings) -> dict:
    """The server's first /v1/models entry ({} if it has none we can read)."""
    try:
        _, body = http_get(f"{base_url}/v1/models", auth_headers(settings), timeout=10)
        card = json.loads(body)["data"][0]
        return card if isinstance(card, dict) else {}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def served_model_id(base_url: str, settings: Settings) -> str:
    return settings.model_id or str(model_card(base_url, settings).get("id") or "code-assistant")


def server_command(settings: Settings, port: int, max_batch: int | None, extra_args: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO_DIR, "serve_api.py"), "--model", settings.ckpt,
           "--host", "127.0.0.1", "--port", str(port)]
    queue_wait = settings.request_timeout if settings.max_queue_wait is None else settings.max_queue_wait
    options = {"--max-batch": max_batch, "--max-waiting": settings.max_waiting, "--max-queue-wait": queue_wait,
               "--prefill-chunk": settings.prefill_chunk, "--model-id": settings.model_id,
               "--fim-layout": settings.fim_layout}
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(extra_args) + settings.server_args


@contextlib.contextmanager
def managed_server(settings: Settings, max_batch: int | None, log_path: str, extra_args: tuple[str, ...] = ()):
    """serve_api.py on a free loopback port; yields (base_url, health info, command, pid). Always stopped."""
    port = free_port()
    cmd = server_command(settings, port, max_batch, extra_args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_DIR)
    try:
        base_url = f"http://127.0.0.1:{port}"
        yield base_url, wait_until_ready(base_url, settings, proc, log_path), cmd, proc.pid
    finally:
        stop_server(proc)


def process_tree_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process and all its descendants (the server: HTTP process, engine
    process, multiprocessing's tracker), from /proc; None off Linux or for a server not ours."""
    if pid is None:
        return None
    total_kb, pending = 0, [pid]
    try:
        while pending:
            p = pending.pop()
            with open(f"/proc/{p}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                pending += [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return None
    return round(total_kb / 1024, 1)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL if it does not within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- a sweep


@dataclass
class Target:
    label: str  # "engine" or "baseline"
    base_url: str
    model_id: str
    info: dict
    pid: int | None = None  # the server process, when this bench started it (for its memory)


def new_client(settings: Settings) -> aiohttp.ClientSession:
    # No pool cap (limit=0): aiohttp's default of 100 connections would queue users inside the
    # client. The per-request bound is asyncio.timeout in run_request, so none here.
    # aiohttp, not httpx: it read the same 128 streams for 33-35 ms of CPU per 1K tokens where
    # httpx took 132-278 (README, serving), and the load generator shares the server's cores.
    return aiohttp.ClientSession(headers=auth_headers(settings), connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None))


@dataclass
class LevelPart:
    """What one load-generator process's users did in a level."""
    recorder: Recorder
    elapsed_s: float
    cpu_s: float
    repeated_prompts: int


def client_process_count(settings: Settings, users: int) -> int:
    """One asyncio process streams ~2,600 tokens/s of SSE at most (measured: 95% of a core
    on a 16-CPU H100 host), so a fast server needs several; never more than users, nor than
    a --requests cap (each process gets a share of it)."""
    wanted = settings.client_procs or (1 if (os.cpu_count() or 1) <= 4 else 4)
    return max(1, min(wanted, users, settings.requests or users))


def split_requests(cap: int, procs: int, index: int) -> int:
    """Process index's share of a --requests cap (0: no cap)."""
    return 0 if cap <= 0 else cap // procs + (index < cap % procs)


async def drive_users(target: Target, user_ids: range, settings: Settings, workload, prompts: range,
                      progress=None, start_at: float | None = None) -> LevelPart:
    """Run the given users against the target for one level; their results."""
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    recorder, cpu_before = Recorder(settings.request_timeout), time.process_time()
    async with new_client(settings) as client:
        start = time.monotonic()
        level = Level(settings, f"{target.base_url}/v1/completions", target.model_id, client, recorder,
                      stop_at=start + settings.duration, prompts=prompts)
        user = typing_user if settings.workload == "typing" else closed_loop_user
        user_tasks = [asyncio.create_task(user(level, i, workload)) for i in user_ids]
        ticker = asyncio.create_task(tick(progress, start, settings.duration, recorder))
        deadline = start + settings.duration + settings.request_timeout + LEVEL_GRACE_S
        await asyncio.wait(user_tasks, timeout=deadline - time.monotonic())
        if level.tasks:  # superseded requests still closing their streams
            await asyncio.wait(set(level.tasks), timeout=max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - start
        ticker.cancel()
        leftovers = [t for t in [*user_tasks, *level.tasks] if not t.done()]
        recorder.closing = bool(leftovers)  # the hard deadline: whatever still runs is cut
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*user_tasks, *level.tasks, ticker, return_exceptions=True)
    return LevelPart(recorder, elapsed, time.process_time() - cpu_before, level.repeated_prompts if prompts else 0)


def drive_users_in_worker(target: Target, user_ids: range, settings: Settings, workload, prompts: range,
                          start_at: float) -> LevelPart:
    """drive_users in a load-generator process (its own event loop)."""
    return asyncio.run(drive_users(target, user_ids, settings, workload, prompts, start_at=start_at))


async def drive_level(target: Target, users: int, settings: Settings, workload, prompts: range, progress,
                      workers: ProcessPoolExecutor | None) -> list[LevelPart]:
    """The level's users in this process, or split among the worker processes (user i in
    process i % procs, so each user draws the same prompts however many processes run)."""
    procs = client_process_count(settings, users) if workers is not None else 1
    if procs == 1:
        return [await drive_users(target, range(users), settings, workload, prompts, progress)]
    loop, start_at = asyncio.get_running_loop(), time.monotonic() + WORKER_LEAD_S
    ticker = asyncio.create_task(tick(progress, start_at, settings.duration, None))
    parts = await asyncio.gather(*(
        loop.run_in_executor(workers, drive_users_in_worker, target, range(i, users, procs),
                             replace(settings, requests=split_requests(settings.requests, procs, i)), workload,
                             prompts[i::procs], start_at) for i in range(procs)))
    ticker.cancel()
    return parts


def merge_parts(parts: list[LevelPart]) -> tuple[Recorder, float, float]:
    """(one recorder of every result, the longest elapsed time, the client CPU seconds)."""
    merged = Recorder(parts[0].recorder.request_timeout)
    for part in parts:
        merged.sent += part.recorder.sent
        merged.results.extend(part.recorder.results)
    return merged, max(p.elapsed_s for p in parts), sum(p.cpu_s for p in parts)


async def run_level(target: Target, users: int, settings: Settings, workload, progress,
                    prompts: range = range(0), workers: ProcessPoolExecutor | None = None) -> dict:
    cancels_before = scrape_counter(target.base_url, settings.cancel_metric, auth_headers(settings))
    prefix_before = scrape_counters(target.base_url, PREFIX_METRICS, auth_headers(settings))
    started_at = time.time()
    parts = await drive_level(target, users, settings, workload, prompts, progress, workers)
    recorder, elapsed, client_cpu_s = merge_parts(parts)
    cancels_after = scrape_counter(target.base_url, settings.cancel_metric, auth_headers(settings))
    server_cancels = None if cancels_before is None or cancels_after is None else cancels_after - cancels_before
    prefix = prefix_cache_figures(prefix_before, scrape_counters(target.base_url, PREFIX_METRICS, auth_headers(settings)))
    stats = {**summarize(users, recorder, elapsed, server_cancels, client_cpu_s, prefix),
             "started_at": round(started_at, 3), "client_procs": len(parts),
             "client_bound": client_cpu_s > CLIENT_BOUND_SHARE * elapsed * len(parts),
             "server_rss_mb": process_tree_rss_mb(target.pid)}
    if prompts:  # the independent workload
        stats["repeated_prompts"] = sum(p.repeated_prompts for p in parts)
    return stats


async def tick(progress, start: float, duration: float, recorder: Recorder) -> None:
    if progress is None:
        return
    base = progress.n  # the levels before this one
    while True:
        progress.n = base + min(duration, max(0.0, time.monotonic() - start))
        if recorder is not None:  # None: the users run in other processes
            ok = sum(r.outcome == "ok" for r in recorder.results)
            progress.set_postfix_str(f"sent {recorder.sent} ok {ok}", refresh=False)
        progress.refresh()
        await asyncio.sleep(0.5)


async def preflight(target: Target, settings: Settings, workload) -> None:
    """One request of the real shape before any load: a server that errors, or rejects our
    prompts, is reported in one line instead of as a table of failures."""
    recorder = Recorder(settings.request_timeout)
    async with new_client(settings) as client:
        level = Level(settings, f"{target.base_url}/v1/completions", target.model_id, client, recorder, 0.0)
        if settings.workload == "typing":
            prefix, suffix = Editor(workload, random.Random(settings.seed), 32, 16).context()
            payload = level.payload(prefix, suffix)
        else:
            payload = level.payload(workload[0])
        result = await run_request(client, level.url, payload, recorder)
    if result.outcome != "ok":
        raise BenchError(f"test completion against {target.base_url} failed: {result.detail}")


def probe_payloads(level: Level, settings: Settings, workload) -> list[dict]:
    """The fixed prompts of the greedy-identity check: for typing, a few editors' consecutive
    keystrokes (each prompt extends the one before, so a cache serves most of it); otherwise
    pool prompts, each sent twice (the second is a full hit)."""
    if settings.workload != "typing":
        return [level.payload(prompt) for prompt in workload[: GREEDY_PROBES // 2] for _ in range(2)]
    rng = random.Random(settings.seed + 1)
    payloads = []
    for _ in range(3):
        editor = new_editor(workload, rng, settings)
        for _ in range(GREEDY_PROBES // 3):
            editor.type(rng.randint(1, 4))
            payloads.append(level.payload(*editor.context()))
    return payloads


async def greedy_probe(target: Target, settings: Settings, workload) -> dict:
    """Completions of the probe prompts at temperature 0, one request at a time."""
    recorder = Recorder(settings.request_timeout)
    texts = []
    async with new_client(settings) as client:
        level = Level(settings, f"{target.base_url}/v1/completions", target.model_id, client, recorder, 0.0)
        for payload in probe_payloads(level, settings, workload):
            payload = {k: v for k, v in payload.items() if k != "stream_options"}
            async with client.post(level.url, json={**payload, "temperature": 0.0, "stream": False}) as response:
                body = await response.read()
            if response.status != 200:
                raise BenchError(f"greedy probe against {target.base_url} failed: HTTP {response.status}: "
                                 f"{error_message(body)}")
            texts.append(json.loads(body)["choices"][0]["text"])
    return {"prompts": len(texts), "texts": texts}


def greedy_identity(servers: dict) -> dict | None:
    """Whether the engine and the baseline gave the same greedy completions of the probes."""
    if "baseline" not in servers or "greedy_probe" not in servers["engine"]:
        return None
    mine, theirs = servers["engine"]["greedy_probe"]["texts"], servers["baseline"]["greedy_probe"]["texts"]
    differ = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
    return {"prompts": len(mine), "identical": len(mine) - len(differ), "all_identical": not differ and len(mine) > 0,
            "first_mismatch": None if not differ else {"index": differ[0], "engine": mine[differ[0]],
                                                        "baseline": theirs[differ[0]]}}


def run_sweep(targets: list[Target], settings: Settings, workload, progress) -> dict:
    """{label: {"levels": [...], and "greedy_probe" when there is a baseline}}.

    Level by level, each on every target in turn (the first target alternating from level to
    level), never two at once: a slow spell of this shared machine then falls on both servers'
    runs of a level, not on every level of one server, as when one server's whole sweep ran
    before the other's (four such runs on one day gave 6.2x to 10.9x at 128 users)."""
    async def sweep(workers: ProcessPoolExecutor | None) -> dict:
        results = {}
        for target in targets:
            await preflight(target, settings, workload)
            results[target.label] = {"greedy_probe": await greedy_probe(target, settings, workload)} \
                if settings.baseline else {}
            results[target.label]["levels"] = []
        done, plan = 0, settings.levels * settings.waves
        for i, users in enumerate(plan):
            share = prompt_share(len(workload), i, len(plan)) if settings.workload != "typing" else range(0)
            for target in targets if i % 2 == 0 else targets[::-1]:
                if progress is not None:
                    progress.set_description(f"{target.label} {users} users")
                stats = await run_level(target, users, settings, workload, progress, share, workers)
                results[target.label]["levels"].append(stats)
                done += 1
                if progress is not None:  # a level cut short by --requests still counts in full
                    progress.n = done * settings.duration
                failure = server_failed(stats)
                if failure:
                    raise BenchError(f"{target.label} at {users} users: {failure}")
        return results
    procs = client_process_count(settings, max(settings.levels))
    if procs == 1:
        return asyncio.run(sweep(None))
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as workers:
        list(workers.map(time.sleep, [0.5] * procs))  # start them all now, not during the first level
        return asyncio.run(sweep(workers))


# ----------------------------------------------------------------------------- the report


def ratios(engine: list[dict], baseline: list[dict]) -> list[dict]:
    """One row per level, each server's run of it side by side (both ran the same plan)."""
    rows = []
    for e, b in zip(engine, baseline):
        e95, b95 = e["latency_ms"]["p95"], b["latency_ms"]["p95"]
        e50, b50 = e["latency_ms"].get("p50"), b["latency_ms"].get("p50")
        row = {"users": e["users"],
               "throughput_x": round(e["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None,
               "requests_x": round(e["requests_per_s"] / b["requests_per_s"], 2) if b["requests_per_s"] else None,
               "p95_ratio": round(e95 / b95, 3) if e95 is not None and b95 else None,
               "p50_ratio": round(e50 / b50, 3) if e50 is not None and b50 else None}
        e_pre, b_pre = (((s.get("prefix_cache") or {}).get("prefill_tokens_per_request")) for s in (e, b))
        row["prefill_tokens_x"] = round(b_pre / e_pre, 2) if e_pre and b_pre is not None else None
        rows.append(row)
    return rows


def cost(levels: list[dict], settings: Settings) -> dict:
    """$ per 1K generated tokens at the highest-throughput level whose p95 meets the target with
    at most 1% of requests failed or rejected; if none does, at the best-throughput level,
    flagged as missing the target."""
    key = "latency_ms" if settings.target_metric == "latency" else "ttft_ms"

    def meets(s: dict) -> bool:
        p95 = s[key]["p95"]
        shed = (s["errors"] + s["rejected"]) / s["sent"] if s["sent"] else 1.0
        return p95 is not None and p95 <= settings.p95_target_ms and shed <= 0.01

    usable = [s for s in levels if s["tokens_per_s"] > 0]
    if not usable:
        return {"target_met": False, "users": None, "usd_per_1k_tokens": None, "note": "no level produced tokens"}
    meeting = [s for s in usable if meets(s)]
    best = max(meeting or usable, key=lambda s: s["tokens_per_s"])
    usd = settings.price_per_hour / 3600 / best["tokens_per_s"] * 1000
    lowest = min((s[key]["p95"] for s in usable if s[key]["p95"] is not None), default=None)
    note = (f"best level meeting p95 {settings.target_metric} <= {settings.p95_target_ms:g} ms" if meeting else
            f"no level met p95 {settings.target_metric} <= {settings.p95_target_ms:g} ms "
            f"with <= 1% failed or rejected (lowest p95 {fmt(lowest, 0).strip()} ms); "
            f"cost at the best-throughput level")
    return {"target_met": bool(meeting), "users": best["users"], "tokens_per_s": best["tokens_per_s"],
            "p95_ms": best[key]["p95"], "usd_per_1k_tokens": round(usd, 8), "price_per_hour": settings.price_per_hour,
            "note": note}


def fmt(x, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width},.{digits}f}"


def print_table(report: dict) -> None:
    head = (f"{'server':<9}{'users':>6}{'sent':>7}{'ok':>7}{'err':>5}{'429':>6}{'503':>6}{'cancel':>7}"
            f"{'req/s':>8}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'ttft50':>8}{'ttft95':>8}")
    print(head)
    print("-" * len(head))
    for label, server in report["servers"].items():
        for s in server["levels"]:
            lat, ttft = s["latency_ms"], s["ttft_ms"]
            print(f"{label:<9}{s['users']:>6}{s['sent']:>7}{s['ok']:>7}{s['errors']:>5}{s['rejected_429']:>6}"
                  f"{s['rejected_503']:>6}{s['cancelled']:>7}{fmt(s['requests_per_s'], 8, 2)}"
                  f"{fmt(s['tokens_per_s'], 9)}{fmt(lat['p50'], 9)}{fmt(lat['p95'], 9)}{fmt(lat['p99'], 9)}"
                  f"{fmt(ttft['p50'], 8)}{fmt(ttft['p95'], 8)}")
    bound = [f"{label} at {s['users']} users" for label, server in report["servers"].items()
             for s in server["levels"] if s.get("client_bound")]
    if bound:
        print(f"warning: the load generator was CPU-bound ({', '.join(bound)}): those rows measure the client, "
              f"not the server; raise --client-procs")
    for label, server in report["servers"].items():
        memory = [s.get("server_rss_mb") for s in server["levels"]]
        if any(m is not None for m in memory):
            print(f"{label} memory after each level (RSS of the server's processes, MB): "
                  + ", ".join(fmt(m, 0, 0).strip() for m in memory))
    print_prefix_cache(report)
    if report["ratios"]:
        baseline = {"max-batch-1": "max-batch 1", "prefix-cache": "no prefix cache", "engine-thread": "engine thread"}[report["settings"]["compare"]]
        print(f"\nengine vs baseline ({baseline}), same workload:")
        for r in report["ratios"]:
            fewer = (f", {fmt(r['prefill_tokens_x'], 0, 1).strip()}x fewer prompt tokens prefilled per request"
                     if r.get("prefill_tokens_x") is not None else "")
            print(f"  {r['users']:>4} users: throughput {fmt(r['throughput_x'], 0, 2).strip()}x, "
                  f"p50 latency ratio {fmt(r.get('p50_ratio'), 0, 2).strip()}, "
                  f"p95 latency ratio {fmt(r['p95_ratio'], 0, 2).strip()}{fewer}")
    identity = report.get("greedy_identity")
    if identity:
        print(f"greedy identity: {identity['identical']} of {identity['prompts']} probe completions identical "
              f"on both servers")
    for label, c in report["cost"].items():
        if c["usd_per_1k_tokens"] is None:
            print(f"cost ({label}): {c['note']}")
        else:
            print(f"cost ({label}): ${c['usd_per_1k_tokens']:.5f} per 1K generated tokens at ${c['price_per_hour']:.2f}/h, "
                  f"{c['users']} users, {c['tokens_per_s']:,.0f} tok/s, p95 {fmt(c['p95_ms'], 0).strip()} ms: {c['note']}")


def print_prefix_cache(report: dict) -> None:
    rows = [(label, s["users"], s["prefix_cache"]) for label, server in report["servers"].items()
            for s in server["levels"] if s.get("prefix_cache")]
    if not rows:
        return
    print(f"\n{'server':<9}{'users':>6}{'lookups':>9}{'hit rate':>10}{'tok hit':>9}{'prompt/req':>12}"
          f"{'prefill/req':>13}{'evicted':>9}")
    for label, users, p in rows:
        print(f"{label:<9}{users:>6}{p['queries']:>9}{fmt(p['hit_rate'], 10, 3)}{fmt(p['token_hit_rate'], 9, 3)}"
              f"{fmt(p['prompt_tokens_per_request'], 12, 1)}{fmt(p['prefill_tokens_per_request'], 13, 1)}"
              f"{fmt(p['evictions'], 9)}")


def plot(report: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.2))
    per_wave = len(report["settings"]["levels"])  # --waves: one line per run of the sweep
    for (label, server), color in zip(report["servers"].items(), ("tab:blue", "tab:orange")):
        for first in range(0, len(server["levels"]), per_wave):
            levels = server["levels"][first:first + per_wave]
            users = [s["users"] for s in levels]
            for q, style in (("p50", "-"), ("p95", "--")):
                points = [(u, s["latency_ms"][q]) for u, s in zip(users, levels) if s["latency_ms"][q] is not None]
                if points:
                    ax_lat.plot(*zip(*points), style, marker="o", color=color,
                                label=f"{label} {q}" if first == 0 else None)
            ax_tok.plot(users, [s["tokens_per_s"] for s in levels], marker="o", color=color,
                        label=label if first == 0 else None)
    target = report["settings"]["p95_target_ms"]
    ax_lat.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:g} ms")
    ax_lat.set(xscale="log", yscale="log", xlabel="concurrent users", ylabel="latency (ms)", title="request latency")
    ax_tok.set(xscale="log", xlabel="concurrent users", ylabel="generated tokens/s", title="throughput")
    for ax in (ax_lat, ax_tok):
        ax.set_xticks(report["settings"]["levels"], [str(u) for u in report["settings"]["levels"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = report["servers"]["engine"]["server_info"]["build"].get("device") or report["machine"]["device"]
    fig.suptitle(f"{report['settings']['workload']} workload, served on {device} "
                 f"({report['machine']['cpu_count']} CPUs here)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda_available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def checkpoint_info(path: str) -> dict:
    """Validate the checkpoint with the project's one loader before starting any server."""
    if not os.path.isfile(path):  # before importing torch: a typo should fail in a blink
        raise BenchError(f"checkpoint not found: {path}")
    from model import CheckpointError, load_checkpoint
    try:
        model, ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise BenchError(str(exc)) from None
    info = {"path": os.path.abspath(path), "size_bytes": os.path.getsize(path), "model_args": ckpt["model_args"],
            "params": model.num_params(), "tokenizer": ckpt.get("tokenizer")}
    info.update({k: ckpt[k] for k in ("iter_num", "val_loss", "dataset", "quantization") if k in ckpt})
    return info


def fit_prompts_to_context(settings: Settings, block_size: int) -> Settings:
    """Prompts + max_tokens must fit the model's context, or the server would silently truncate
    them and the report would claim prompt lengths that were never served."""
    room = block_size - settings.max_tokens - FIM_OVERHEAD_TOKENS
    if room < 8:
        raise BenchError(f"--max-tokens {settings.max_tokens} leaves no room for a prompt in a "
                         f"{block_size}-token context")
    if settings.prompt_max <= room:
        return settings
    print(f"note: prompts cut to at most {room} tokens to fit the model's {block_size}-token context",
          file=sys.stderr)
    return replace(settings, prompt_max=room, prompt_min=min(settings.prompt_min, room))


# ----------------------------------------------------------------------------- main


def bench_targets(settings: Settings, stamp: str, workload, progress) -> dict:
    """The engine and the baseline, both up for the whole run (a running one is only waited
    for; one started here is stopped at the end), benched by run_sweep; {label: server report}."""
    runs = [("engine", settings.max_batch, settings.url, ())]
    if settings.baseline:
        extra_args, max_batch = COMPARISONS[settings.compare]
        runs.append(("baseline", max_batch or settings.max_batch, settings.baseline_url, extra_args))
    servers, targets = {}, []
    with contextlib.ExitStack() as started:
        for label, max_batch, url, extra_args in runs:
            if url:
                info, pid = wait_until_ready(url, settings), None
                servers[label] = {"url": url, "server_info": info}
            else:
                log_path = os.path.join(settings.out_dir, f"results-{stamp}-{label}.log")
                url, info, cmd, pid = started.enter_context(managed_server(settings, max_batch, log_path, extra_args))
                servers[label] = {"command": cmd[1:], "log": log_path, "server_info": info}
            targets.append(Target(label, url, served_model_id(url, settings), info, pid))
        for label, result in run_sweep(targets, settings, workload, progress).items():
            servers[label].update(result)
    return servers


def context_length(settings: Settings, ckpt: dict | None) -> int | None:
    """The context prompts must fit: the checkpoint's block size, or what running servers
    publish (max_model_len in /v1/models; checking them first also fails fast when one is down)."""
    if ckpt is not None:
        return ckpt["model_args"].get("block_size", 1024)
    lengths = []
    for url in filter(None, (settings.url, settings.baseline_url if settings.baseline else None)):
        wait_until_ready(url, settings)
        lengths.append(model_card(url, settings).get("max_model_len"))
    known = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(known) if known else None


def progress_bar(settings: Settings):
    if not settings.progress:
        return None
    from tqdm import tqdm
    n_servers = 2 if settings.baseline else 1
    return tqdm(total=n_servers * len(settings.levels) * settings.waves * settings.duration, unit="s",
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of load [{elapsed}]{postfix}")


def build_report(settings: Settings, ckpt: dict | None, servers: dict, started: float) -> dict:
    baseline = servers.get("baseline")
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": round(time.time() - started, 1),
            "settings": dict(asdict(settings), api_key="***" if settings.api_key else None),
            "machine": machine_info(), "checkpoint": ckpt, "servers": servers,
            "ratios": ratios(servers["engine"]["levels"], baseline["levels"]) if baseline else [],
            "greedy_identity": greedy_identity(servers),
            "cost": {label: cost(server["levels"], settings) for label, server in servers.items()}}


def run(settings: Settings) -> dict:
    from tokenizer import load_tokenizer

    ckpt = checkpoint_info(settings.ckpt) if settings.ckpt else None
    context = context_length(settings, ckpt)
    if context is not None:
        settings = fit_prompts_to_context(settings, context)
    tokenizer = load_tokenizer()
    files = load_held_out(settings.data_dir, tokenizer)
    workload = files if settings.workload == "typing" else prompt_pool(files, settings, tokenizer)
    os.makedirs(settings.out_dir, exist_ok=True)
    stamp, started = time.strftime("%Y%m%d-%H%M%S"), time.time()
    progress = progress_bar(settings)
    try:
        servers = bench_targets(settings, stamp, workload, progress)
    finally:
        if progress is not None:
            progress.close()
    report = build_report(settings, ckpt, servers, started)
    base = os.path.join(settings.out_dir, f"results-{stamp}")
    report["plot"] = base + ".png"
    plot(report, report["plot"])
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"wrote {base}.json and {base}.png")
    return report


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the servers we started are stopped.
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        run(settings)
    except BenchError as exc:
        print(f"bench_serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_serve: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
