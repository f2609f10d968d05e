"""HTTP front end of the code assistant: validation, OpenAI shapes, streaming, auth, errors,
health, metrics. The model math, batching and sampling live in engine.py, which runs in a
process of its own (engine_process.py); this file only translates HTTP into engine requests
and engine events back into HTTP.

Endpoints: POST /complete (the seed's contract), POST /v1/completions (OpenAI legacy
Completions, what editor plugins speak), GET /v1/models, GET /health (liveness), GET /ready
(readiness), GET /metrics (Prometheus), GET / (the browser playground, static/playground.html,
which speaks only the public API above), GET /info (a JSON index).

Shutdown (why a custom uvicorn.Server): on SIGTERM uvicorn closes its listener at once, so a
load balancer still routing to us would see "connection refused" and our own /ready could not
say 503. DrainingServer instead keeps listening while the app drains: /ready turns 503, new
completions get 503 `draining`, in-flight requests run to completion for at most
--drain-timeout seconds (then the engine aborts them), and only then does uvicorn shut down and
the process exit 0. A second SIGTERM/SIGINT exits at once.

    python serve_api.py --model out-code-assistant/best.pt --port 8000
Every flag has an environment variable (see Settings); a flag wins over the environment.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Callable, Union

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import (Engine, EngineConfig, EngineDraining, EngineObserver, QueueFull, SamplingParams,
                    StreamEvent, build_prompt_ids, default_prefill_chunk)
from engine_process import EngineProcess
from model import CheckpointError, load_checkpoint, resolve_output_dtype
from tokenizer import DEFAULT_FIM_LAYOUT, FIM_LAYOUTS, TOKENIZER_NAME, load_tokenizer

log = logging.getLogger("serve_api")

DEFAULT_MODEL_ID = "code-assistant"  # never "gpt...": Continue switches to chat prompts for those
MAX_CHOICES = 8        # n per prompt; each choice is a full engine request
MAX_PROMPTS = 16       # prompts per request (OpenAI allows a list)
MAX_STOP_STRINGS = 32  # Continue sends ~10, so OpenAI's cap of 4 would break it
RETRY_AFTER_S = "1"
LATENCY_BUCKETS = (.005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 20, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METRIC_PREFIX = "codeassist_"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PLAYGROUND_PAGE = os.path.join(STATIC_DIR, "playground.html")


# ----------------------------------------------------------------------------- settings


def option(default, flag: str, env: str, text: str, choices: tuple = ()):
    """A setting's default plus how to set it: a flag, else an environment variable."""
    return field(default=default, metadata=dict(flag=flag, env=env, help=text, choices=choices))


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


@dataclass(frozen=True)
class Settings:
    model_path: str = option("out-code-assistant/best.pt", "--model", "MODEL_PATH", "checkpoint to serve")
    host: str = option("127.0.0.1", "--host", "HOST", "interface to bind")
    port: int = option(8000, "--port", "PORT", "TCP port")
    device: str = option("auto", "--device", "DEVICE", "auto | cpu | cuda | cuda:N")
    dtype: str = option("auto", "--dtype", "DTYPE", "auto: bf16 on CUDA, fp32 on CPU",
                        ("auto", "float32", "bfloat16", "float16"))
    output_dtype: str = option("auto", "--output-dtype", "OUTPUT_DTYPE",
                               "output layer: auto = bfloat16 for a float32 model on a CPU with native bf16 "
                               "(AVX512-BF16/AMX), else the model's dtype", ("auto", "float32", "bfloat16"))
    max_batch: int = option(64, "--max-batch", "MAX_BATCH", "sequences decoded together (KV-cache slots)")
    max_waiting: int = option(256, "--max-waiting", "MAX_WAITING", "queue length beyond which requests get 429")
    max_queue_wait_s: float = option(10.0, "--max-queue-wait", "MAX_QUEUE_WAIT_S", "seconds queued before 503")
    prefill_chunk: int = option(0, "--prefill-chunk", "PREFILL_CHUNK",
                                "prompt tokens prefilled per engine step (0: 512 on CPU, 4096 on CUDA)")
    drain_timeout_s: float = option(20.0, "--drain-timeout", "DRAIN_TIMEOUT_S", "seconds to finish after SIGTERM")
    api_keys: tuple[str, ...] = option((), "--api-keys", "API_KEYS",
                                       "comma-separated bearer keys; none: no auth (prefer the env: flags show in ps)")
    model_id: str = option("", "--model-id", "MODEL_ID", f"model name (else the checkpoint's, else {DEFAULT_MODEL_ID})")
    fim_layout: str = option(DEFAULT_FIM_LAYOUT, "--fim-layout", "FIM_LAYOUT", "FIM layout the model was trained on", FIM_LAYOUTS)
    threads: int = option(0, "--threads", "TORCH_THREADS",
                          "model threads (0: torch's default, one per core); fewer leave cores to HTTP")
    engine_process: bool = option(True, "--engine-process", "ENGINE_PROCESS",
                                  "run the model in its own process, off the HTTP process's GIL "
                                  "(--no-engine-process: a thread of this process)")
    cuda_graphs: bool = option(True, "--cuda-graphs", "CUDA_GRAPHS",
                               "on CUDA, replay decode steps from captured graphs (--no-cuda-graphs: eager)")
    prefix_cache: bool = option(True, "--prefix-cache", "PREFIX_CACHE",
                                "reuse the KV of earlier prompts' beginnings (--no-prefix-cache, PREFIX_CACHE=0: off)")
    prefix_cache_mb: float = option(512.0, "--prefix-cache-mb", "PREFIX_CACHE_MB", "memory bound of the prefix cache (MiB)")
    max_body_bytes: int = option(1 << 20, "--max-body-bytes", "MAX_BODY_BYTES", "larger request bodies get 413")
    heartbeat_timeout_s: float = option(10.0, "--heartbeat-timeout", "HEARTBEAT_TIMEOUT_S",
                                        "/health fails when the engine loop is silent this long")
    log_level: str = option("info", "--log-level", "LOG_LEVEL", "verbosity", ("debug", "info", "warning", "error"))


def boolean(value: str | bool) -> bool:
    if isinstance(value, bool):  # from a --flag/--no-flag pair
        return value
    word = value.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"not a boolean: {value!r}")
    return word in ("1", "true", "yes", "on")


CONVERTERS = {"str": str, "int": int, "float": float, "bool": boolean, "tuple[str, ...]": comma_list}  # by annotation


def parse_settings(argv: list[str] | None, environ: dict[str, str]) -> Settings:
    """Flags win over environment variables, which win over the defaults (12-factor)."""
    parser = argparse.ArgumentParser(description="Serve the code-completion model over HTTP.")
    for f in fields(Settings):
        switch = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {}
        parser.add_argument(f.metadata["flag"], dest=f.name, help=f"{f.metadata['help']} "
                            f"[env {f.metadata['env']}; default {f.default!r}]", **switch)
    args, values = parser.parse_args(argv), {}
    for f in fields(Settings):
        source, raw = (f.metadata["flag"], getattr(args, f.name))
        if raw is None:
            source, raw = f.metadata["env"], environ.get(f.metadata["env"])
        if raw is None:
            continue
        convert = CONVERTERS[f.type]
        try:
            values[f.name] = convert(raw)
        except ValueError:
            parser.error(f"{source}: cannot read {raw!r} as {convert.__name__}")
        if f.metadata["choices"] and values[f.name] not in f.metadata["choices"]:
            parser.error(f"{source}: {raw!r} is not one of {', '.join(f.metadata['choices'])}")
    settings = Settings(**values)
    if min(settings.max_batch, settings.max_body_bytes) < 1 or min(settings.max_waiting, settings.prefill_chunk) < 0:
        parser.error("--max-batch and --max-body-bytes must be >= 1, --max-waiting and --prefill-chunk >= 0")
    if settings.prefix_cache_mb < 0:
        parser.error("--prefix-cache-mb must be >= 0")
    if settings.threads < 0:
        parser.error("--threads must be >= 0")
    return settings


# ----------------------------------------------------------------------------- model loading


class StartupError(Exception):
    """The server cannot start; the message is one line for the terminal."""


@dataclass(frozen=True)
class ServedModel:
    model: torch.nn.Module
    model_id: str
    device: str
    dtype: str
    output_dtype: str  # the output layer's (model.set_output_dtype), may differ from dtype
    quantization: str
    created: int


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StartupError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    # fp32 on CPU: for the small models we serve it measured faster than bf16 at batch 1
    # (904 vs 620 tok/s for 2x128); bf16 is the fast dtype on GPUs.
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_served_model(settings: Settings) -> ServedModel:
    path = settings.model_path
    make_target = "make quantize" if path.endswith("_int8.pt") else "make train"
    device = resolve_device(settings.device)
    try:
        model, ckpt = load_checkpoint(path, device)
    except CheckpointError as exc:
        raise StartupError(f"{exc}; run `{make_target}` to (re)create it, or pass --model PATH") from None
    if ckpt.get("tokenizer", TOKENIZER_NAME) != TOKENIZER_NAME:
        raise StartupError(f"{path}: trained with tokenizer {ckpt['tokenizer']!r}, "
                           f"this server speaks {TOKENIZER_NAME!r}")
    model_id = settings.model_id or str(ckpt.get("model_id") or DEFAULT_MODEL_ID)
    if "gpt" in model_id.lower():
        raise StartupError(f"model id {model_id!r} contains 'gpt': editor clients (Continue) would send chat "
                           f"prompts; choose another --model-id")
    quantization = ckpt.get("quantization") or "none"
    if quantization == "none":  # a quantized model keeps the float dtype its loader chose for scales
        model = model.to(resolve_dtype(settings.dtype, device))
    model.set_output_dtype(resolve_output_dtype(settings.output_dtype, model, device))
    dtype = str(model.dtype).removeprefix("torch.")
    return ServedModel(model, model_id, device, dtype, model.output_dtype_name, quantization, int(time.time()))


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str, code: str, status: int = 503) -> ApiError:
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ApiError(status, message, kind, code=code, headers={"Retry-After": RETRY_AFTER_S})


def engine_failure(event: StreamEvent) -> ApiError:
    """What a final event with finish_reason abort/error means to the client."""
    if event.error == "queue_timeout":
        return overloaded("the request waited too long for a free slot; retry later", "queue_timeout")
    if event.finish_reason == "abort" or event.error == "engine_stopped":
        return overloaded("the request was aborted: the server is shutting down", "aborted")
    return ApiError(500, "the inference engine failed during generation", "server_error",
                    code=event.error or "engine_failed")


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 {"detail": [...]} rewritten as OpenAI's 400 naming the offending field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return invalid("malformed JSON in the request body", code="invalid_json")
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not path:
        return invalid("the request body must be a JSON object (Content-Type: application/json)", code="invalid_body")
    param = path[0]
    return invalid(f"{param}: {first.get('msg', 'invalid value')}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})).response()

    async def on_crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, "internal server error", "server_error").response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Every Prometheus series the server exports, in the app's own registry (never the
    process-global one, so several apps in one process, as in tests, do not collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name, doc, labels=()):
            return Counter(METRIC_PREFIX + name, doc, labels, registry=r)

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(METRIC_PREFIX + name, doc, buckets=buckets, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(METRIC_PREFIX + name, doc, labels, registry=r)

        self.http_requests = counter("http_requests_total", "HTTP responses", ["endpoint", "status"])
        self.latency = histogram("request_latency_seconds", "End-to-end engine request time, submit to last token")
        self.ttft = histogram("time_to_first_token_seconds", "Submit to first generated token")
        self.queue_time = histogram("queue_time_seconds", "Time spent waiting for a KV-cache slot")
        self.step_time = histogram("engine_step_seconds", "Duration of one engine step")
        self.batch_size = histogram("batch_size", "Sequences in one engine step", BATCH_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed")
        self.generated_tokens = counter("generated_tokens_total", "Tokens generated")
        self.finished = counter("requests_finished_total", "Engine requests by finish reason", ["finish_reason"])
        self.rejections = counter("rejections_total", "Requests refused, by reason", ["reason"])
        self.cancellations = counter("cancellations_total", "Engine requests cancelled: client gone or sibling failed")
        self.running = gauge("requests_running", "Requests holding a KV-cache slot")
        self.waiting = gauge("requests_waiting", "Requests queued for a slot")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Occupied KV-cache slots / all slots")
        self.prefill_tokens = counter("prefill_tokens_total", "Prompt tokens run through the model (not reused)")
        self.prefix_queries = counter("prefix_cache_queries_total", "Prompts looked up in the prefix cache")
        self.prefix_hits = counter("prefix_cache_hits_total", "Lookups that reused at least one cached token")
        self.prefix_query_tokens = counter("prefix_cache_query_tokens_total", "Prompt tokens looked up")
        self.prefix_hit_tokens = counter("prefix_cache_hit_tokens_total",
                                         "Prompt tokens reused instead of prefilled (/ query tokens = hit ratio)")
        self.prefix_evictions = counter("prefix_cache_evictions_total", "Prefix-cache blocks evicted for room (LRU)")
        self.prefix_bytes = gauge("prefix_cache_bytes", "Memory held by cached prefix blocks")
        self.prefix_blocks = gauge("prefix_cache_blocks", "Prefix-cache blocks in use")
        self.prefix_capacity = gauge("prefix_cache_capacity_blocks", "Prefix-cache blocks that fit its memory bound")
        self.ready = gauge("ready", "1 when /ready answers 200")
        self.build_info = gauge("build_info", "What is served",
                                ["model_id", "device", "dtype", "output_dtype", "quantization"])

    def bind(self, runtime: "Runtime") -> None:
        """Gauges read live state at scrape time, so they can never drift from the engine."""
        engine = runtime.engine
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.kv_usage.set_function(lambda: engine.num_running / max(engine.max_batch, 1))
        self.ready.set_function(lambda: float(runtime.readiness() is None))
        self.prefix_bytes.set_function(lambda: engine.prefix_cache_stats["bytes_used"])
        self.prefix_blocks.set_function(lambda: engine.prefix_cache_stats["blocks_used"])
        self.prefix_capacity.set_function(lambda: engine.prefix_cache_stats["blocks_capacity"])
        served = runtime.served
        self.build_info.labels(served.model_id, served.device, served.dtype, served.output_dtype,
                               served.quantization).set(1)


class PrometheusObserver(EngineObserver):
    """Engine callbacks, called on the engine thread, or on EngineProcess's receiver thread as
    the engine process relays them (prometheus_client is thread-safe)."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def on_reject(self, reason):
        self.m.rejections.labels(reason).inc()

    def on_first_token(self, ttft_s, queue_s):
        self.m.ttft.observe(ttft_s)

    def on_finish(self, completion):
        self.m.finished.labels(completion.finish_reason).inc()
        self.m.latency.observe(completion.latency_s)
        self.m.queue_time.observe(completion.queue_s)
        self.m.prompt_tokens.inc(completion.prompt_tokens)
        self.m.generated_tokens.inc(completion.completion_tokens)

    def on_step(self, batch_size, prefill_tokens, decode_tokens, step_s):
        self.m.batch_size.observe(batch_size)
        self.m.step_time.observe(step_s)
        self.m.prefill_tokens.inc(prefill_tokens)

    def on_prefix_lookup(self, query_tokens, hit_tokens):
        self.m.prefix_queries.inc()
        self.m.prefix_query_tokens.inc(query_tokens)
        if hit_tokens:
            self.m.prefix_hits.inc()
            self.m.prefix_hit_tokens.inc(hit_tokens)

    def on_prefix_evict(self, blocks):
        self.m.prefix_evictions.inc(blocks)


# ----------------------------------------------------------------------------- request schemas


class CompleteRequest(BaseModel):
    """The seed's /complete contract (plus suffix for FIM, stop and seed)."""
    model_config = ConfigDict(extra="ignore")
    code: str
    max_tokens: int = Field(50, ge=0)
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(200, ge=0)
    top_p: float = Field(1.0, ge=0, le=1)
    suffix: str | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI legacy Completions. Unknown fields are ignored, as OpenAI-compatible servers do."""
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, ge=0, le=1)
    top_k: int | None = Field(0, ge=0)  # not OpenAI's, but common (vLLM) and cheap to honour
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    best_of: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    user: str | None = None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings", "stop")
    return tuple(s for s in stops if s)  # an empty stop string would end every completion at once


def reject_unsupported(req: CompletionRequest) -> None:
    """Fields accepted only at their neutral value: a clear 400 beats silently ignoring them."""
    if req.logprobs is not None:
        raise invalid("logprobs: not supported by this server (send null)", "logprobs", "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise invalid(f"{name}: only 0 is supported", name, "unsupported")
    if req.logit_bias:
        raise invalid("logit_bias: not supported (send null or {})", "logit_bias", "unsupported")
    if req.best_of not in (None, 1, req.n or 1):
        raise invalid("best_of: only best_of == n is supported", "best_of", "unsupported")


def text_prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise invalid("prompt: must not be empty", "prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise invalid("prompt: token-id prompts are not supported; send a string or a list of strings", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise invalid(f"prompt: at most {MAX_PROMPTS} prompts per request", "prompt")
    return prompts


# ----------------------------------------------------------------------------- runtime state


def start_engine(settings: Settings, observer: EngineObserver, enc) -> tuple[Engine | EngineProcess, ServedModel]:
    """The engine (its own process by default; engine_process.py says why) and what it serves.
    StartupError when the model cannot be served."""
    config = EngineConfig(max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                          max_queue_wait_s=settings.max_queue_wait_s,
                          prefill_chunk=settings.prefill_chunk or default_prefill_chunk(resolve_device(settings.device)),
                          prefix_cache=settings.prefix_cache, prefix_cache_mb=settings.prefix_cache_mb,
                          cuda_graphs=settings.cuda_graphs)
    if settings.engine_process:
        engine = EngineProcess(functools.partial(load_served_model, settings), config, observer,
                               threads=settings.threads, log_level=settings.log_level)
        return engine, engine.served
    served = load_served_model(settings)
    return Engine(served.model, config, enc=enc, observer=observer, device=served.device), served



class Runtime:
    """What one app owns: settings, model, tokenizer, engine, metrics, and its lifecycle
    (warming_up -> ready | warmup_failed; any -> draining -> stopped)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.enc = load_tokenizer()
        self.metrics = Metrics()
        self.engine, self.served = start_engine(settings, PrometheusObserver(self.metrics), self.enc)
        self.phase, self.phase_detail = "warming_up", ""
        self.metrics.bind(self)

    def liveness(self) -> str | None:
        """None when healthy, else why not. Cheap: reads engine state only."""
        if not self.engine.alive:
            return "the engine is not running"
        age = self.engine.seconds_since_heartbeat
        if age > self.settings.heartbeat_timeout_s:
            return f"engine loop silent for {age:.1f} s"
        return None

    def readiness(self) -> str | None:
        if self.phase != "ready":
            return f"{self.phase}: {self.phase_detail}" if self.phase_detail else self.phase
        return self.liveness()

    async def warm_up(self) -> None:
        """One tiny generation through the whole path, so the first user does not pay for
        lazy initialisation (allocator, kernels) and a broken model never reports ready."""
        try:
            handle = self.engine.submit(self.enc.encode_ordinary("def "), SamplingParams(max_tokens=2, temperature=0.0))
            async for event in handle.stream():
                if event.finish_reason in ("abort", "error"):
                    raise RuntimeError(f"warm-up generation ended with {event.finish_reason} ({event.error})")
        except Exception as exc:  # noqa: BLE001 (reported through /ready, never raised)
            log.error("warm-up failed: %s", exc)
            if self.phase == "warming_up":
                self.phase, self.phase_detail = "warmup_failed", str(exc).splitlines()[0]
            return
        if self.phase == "warming_up":
            self.phase = "ready"
            log.info("ready: serving %s on %s (%s, output layer %s)", self.served.model_id, self.served.device,
                     self.served.dtype, self.served.output_dtype)

    async def drain(self) -> None:
        """Stop taking work, let in-flight requests finish (bounded). Idempotent."""
        if self.phase in ("draining", "stopped"):
            return
        self.phase, self.phase_detail = "draining", "shutting down"
        self.engine.drain()
        log.info("draining: waiting up to %.0f s for in-flight requests", self.settings.drain_timeout_s)
        if await run_in_threadpool(self.engine.wait_idle, self.settings.drain_timeout_s):
            log.info("drained")
            return
        # Past the bound: stop the engine now, so the streams left get their in-band error and
        # close, rather than generating on through uvicorn's own grace period.
        log.warning("drain timeout: aborting %d request(s)", self.engine.num_running + self.engine.num_waiting)
        await run_in_threadpool(self.engine.shutdown, 5.0)

    async def stop(self) -> None:
        await self.drain()
        self.phase = "stopped"
        await run_in_threadpool(self.engine.shutdown, 5.0)

    def refuse_if_draining(self) -> None:
        if self.phase in ("draining", "stopped"):
            self.metrics.rejections.labels("draining").inc()
            raise overloaded("the server is shutting down; retry on another replica", "draining")


# ----------------------------------------------------------------------------- generation plumbing


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_no: int
    prompt: str  # as the client sent it, for echo
    prompt_ids: list[int]
    params: SamplingParams


async def plan_choices(rt: Runtime, prompts: list[str], suffix: str | None, n: int, sampling: dict,
                       param: str = "prompt") -> list[Choice]:
    """Tokenize (off the event loop: a 1 MiB prompt takes a while) and size each choice.

    The prompt may use at most context - min(max_tokens, context/2) tokens (build_prompt_ids keeps
    the text nearest the cursor), so a huge max_tokens (Continue sends 4096) neither truncates
    the prompt to nothing nor gets rejected; max_tokens is then capped to what fits."""
    context = rt.engine.max_context
    requested = sampling["max_tokens"]
    budget = context - min(max(requested, 1), context // 2)
    choices = []
    for p, prompt in enumerate(prompts):
        if not prompt and not suffix:
            raise invalid(f"{param}: must not be empty", param)
        try:
            ids = await run_in_threadpool(build_prompt_ids, rt.enc, prompt, suffix, budget, rt.settings.fim_layout)
        except ValueError as exc:
            raise invalid(f"{param}: {exc}", param) from None
        for j in range(n):
            seed = sampling["seed"]
            params = SamplingParams(**{**sampling, "max_tokens": max(0, min(requested, context - len(ids))),
                                       "seed": None if seed is None else (seed + j) % 2 ** 63})
            choices.append(Choice(p * n + j, p, prompt, ids, params))
    return choices


class ChoiceStreams:
    """The engine streams of all choices of one HTTP request, merged into one sequence of
    (choice index, event) so that n choices generate concurrently and stream interleaved."""

    def __init__(self, rt: Runtime, choices: list[Choice]):
        self.rt, self.queue, self.handles, self.open = rt, asyncio.Queue(), {}, set()
        self.pumps: list[asyncio.Task] = []
        try:
            for c in choices:
                self._start(c)
        except BaseException:
            self.close()
            raise

    def _start(self, c: Choice) -> None:
        self.open.add(c.index)
        try:
            handle = self.rt.engine.submit(c.prompt_ids, c.params)
        except QueueFull:
            raise overloaded("too many requests queued; retry later", "queue_full", status=429) from None
        except EngineDraining:
            if not self.rt.engine.alive:  # a dead loop refuses work the same way
                raise overloaded("the inference engine has stopped; retry elsewhere", "engine_failed") from None
            raise overloaded("the server is shutting down; retry on another replica", "draining") from None
        except ValueError as exc:
            raise invalid(f"prompt: {exc}", "prompt") from None
        self.handles[c.index] = handle
        self.pumps.append(asyncio.create_task(self._pump(c.index, handle)))

    async def _pump(self, index: int, handle) -> None:
        try:
            async for event in handle.stream():
                self.queue.put_nowait((index, event))
        except Exception:  # noqa: BLE001 (an engine bug becomes this choice's error, not a hang)
            log.exception("engine stream failed")
            self.queue.put_nowait((index, StreamEvent("", "error", error="engine_failed")))

    async def next(self) -> tuple[int, StreamEvent] | None:
        """The next event, or None once every choice has finished."""
        if not self.open:
            return None
        index, event = await self.queue.get()
        if event.finish_reason is not None:
            self.open.discard(index)
        return index, event

    def close(self) -> None:
        """Cancel whatever is still generating (client gone, or another choice failed), so
        its KV-cache slot frees at the next engine step."""
        for index in self.open:
            if index in self.handles:
                self.handles[index].cancel()
                self.rt.metrics.cancellations.inc()
        self.open = set()
        for task in self.pumps:
            task.cancel()


class ClientGone(Exception):
    pass


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable):
    """Await `awaitable`; raise ClientGone as soon as the client hangs up instead."""
    work, gone = asyncio.ensure_future(awaitable), asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone()
    return work.result()


async def collect(streams: ChoiceStreams) -> dict[int, tuple[str, StreamEvent]]:
    """Every choice's full text and final event; the first failure becomes an ApiError."""
    parts: dict[int, list[str]] = {}
    finals: dict[int, tuple[str, StreamEvent]] = {}
    while (item := await streams.next()) is not None:
        index, event = item
        parts.setdefault(index, []).append(event.text)
        if event.finish_reason in ("abort", "error"):
            raise engine_failure(event)
        if event.finish_reason is not None:
            finals[index] = ("".join(parts[index]), event)
    return finals


# ----------------------------------------------------------------------------- OpenAI shapes


@dataclass(frozen=True)
class Reply:
    """Fields every object of one completion shares."""
    id: str
    created: int
    model: str

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def choice_json(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage_json(choices: list[Choice], completion_tokens: int) -> dict:
    # The prompt counts once per prompt, not once per choice (as OpenAI bills it).
    prompt_tokens = sum(len(ids) for ids in {c.prompt_no: c.prompt_ids for c in choices}.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def sse_events(reply: Reply, choices: list[Choice], streams: ChoiceStreams, first, echo: bool,
                     include_usage: bool) -> AsyncIterator[str]:
    """The SSE body. `finally` cancels the engine requests when the client disconnects:
    Starlette cancels this generator then, and a slot must not keep computing for nobody."""
    prompts = {c.index: c.prompt for c in choices}
    pending_echo = set(prompts) if echo else set()
    generated = 0
    try:
        item = first
        while item is not None:
            index, event = item
            if event.finish_reason in ("abort", "error"):
                yield sse(engine_failure(event).body())  # the status line is sent; say it in-band
                break
            text = (prompts[index] if index in pending_echo else "") + event.text
            pending_echo.discard(index)
            if text or event.finish_reason:
                chunk = reply.envelope([choice_json(index, text, event.finish_reason)])
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            if event.finish_reason:
                generated += event.completion_tokens
            item = await streams.next()
        else:
            if include_usage:
                yield sse({**reply.envelope([]), "usage": usage_json(choices, generated)})
        yield sse("[DONE]")
    finally:
        streams.close()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ----------------------------------------------------------------------------- middleware


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, whatever Content-Length claims (chunked uploads, lying
    headers): the body is read here, counted, and replayed to the app. An oversized body is
    still drained (up to DRAIN_FACTOR x the limit) so the client reads our 413, not a reset."""

    DRAIN_FACTOR = 16

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.DRAIN_FACTOR * self.max_bytes:
            return await self.too_large(scope, receive, send)  # not worth reading
        body, size, more = [], 0, True
        while more and size <= self.DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size <= self.max_bytes:
                body.append(chunk)
        if size > self.max_bytes:
            return await self.too_large(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replay_receive, send)

    async def too_large(self, scope, receive, send):
        error = ApiError(413, f"request body exceeds {self.max_bytes} bytes", code="body_too_large")
        await error.response()(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts every response by endpoint and status (unknown paths share one label so random
    URLs cannot blow up the series count)."""

    def __init__(self, app, counter: Counter, known_paths: set[str]):
        self.app, self.counter, self.known = app, counter, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in self.known else "other"
            self.counter.labels(endpoint, str(status[0])).inc()


# ----------------------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    """The app and everything it owns. Loads the model (StartupError if unusable); the engine
    loop starts in the lifespan, warm-up runs in the background."""
    rt = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        rt.engine.start()
        warm = asyncio.create_task(rt.warm_up())
        try:
            yield
        finally:
            warm.cancel()
            await rt.stop()

    app = FastAPI(title="code assistant", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = rt
    install_error_handlers(app)
    add_routes(app, rt)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    known = {route.path for route in app.routes}
    app.add_middleware(RequestMetricsMiddleware, counter=rt.metrics.http_requests, known_paths=known)
    return app


def api_key_guard(rt: Runtime) -> Callable:
    keys = [k.encode() for k in rt.settings.api_keys]

    async def require_api_key(request: Request) -> None:  # async: FastAPI runs a sync one in a thread
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare_digest against every key (no early exit): timing reveals nothing about which.
        matches = [hmac.compare_digest(given, key) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


def add_routes(app: FastAPI, rt: Runtime) -> None:
    guarded = [Depends(api_key_guard(rt))]

    @app.get("/")
    async def playground():
        # Public like /health: the page holds no secrets; it asks for the API key itself.
        if not os.path.isfile(PLAYGROUND_PAGE):
            raise ApiError(404, "the playground is not installed (static/playground.html)", code="not_found")
        return FileResponse(PLAYGROUND_PAGE, headers={"Cache-Control": "no-cache"})

    if os.path.isdir(STATIC_DIR):  # the playground's script; an image without static/ still serves the API
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/info")
    async def index():
        return {"model": rt.served.model_id, "endpoints": ["/complete", "/v1/completions", "/v1/models",
                                                          "/health", "/ready", "/metrics", "/"]}

    @app.get("/health")
    async def health():
        problem = rt.liveness()
        body = {"status": "ok" if problem is None else "unhealthy", "reason": problem,
                "heartbeat_age_s": round(rt.engine.seconds_since_heartbeat, 3)}
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @app.get("/ready")
    async def ready():
        problem = rt.readiness()
        if problem is None:
            return {"status": "ready", "model": rt.served.model_id}
        return JSONResponse({"status": "not_ready", "reason": problem}, status_code=503,
                            headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        card = {"id": rt.served.model_id, "object": "model", "created": rt.served.created,
                "owned_by": "self-hosted", "max_model_len": rt.engine.max_context}
        return {"object": "list", "data": [card]}

    @app.post("/complete", dependencies=guarded)
    async def complete(body: CompleteRequest, request: Request):
        started = time.perf_counter()
        rt.refuse_if_draining()
        sampling = dict(max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                        top_p=body.top_p, seed=body.seed, stop=stop_strings(body.stop))
        choices = await plan_choices(rt, [body.code], body.suffix, 1, sampling, param="code")
        finals = await generate(request, rt, choices)
        text, event = finals[0]
        return {"completion": text, "tokens": event.completion_tokens, "finish_reason": event.finish_reason,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1)}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        if body.model != rt.served.model_id:
            raise ApiError(404, f"model {body.model!r} not found; this server serves {rt.served.model_id!r}",
                           param="model", code="model_not_found")
        reject_unsupported(body)
        prompts = text_prompts(body.prompt)
        rt.refuse_if_draining()
        temperature = 0.0 if body.top_p == 0 else (1.0 if body.temperature is None else body.temperature)
        sampling = dict(max_tokens=16 if body.max_tokens is None else body.max_tokens, temperature=temperature,
                        top_k=body.top_k or 0, top_p=body.top_p or 1.0, seed=body.seed, stop=stop_strings(body.stop))
        choices = await plan_choices(rt, prompts, body.suffix, body.n or 1, sampling)
        reply = Reply(f"cmpl-{secrets.token_hex(12)}", int(time.time()), rt.served.model_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_reply(request, rt, reply, choices, bool(body.echo), include_usage)
        finals = await generate(request, rt, choices)
        out = [choice_json(i, (c.prompt if body.echo else "") + finals[i][0], finals[i][1].finish_reason)
               for i, c in enumerate(choices)]
        return reply.envelope(out, usage_json(choices, sum(e.completion_tokens for _, e in finals.values())))


async def generate(request: Request, rt: Runtime, choices: list[Choice]) -> dict[int, tuple[str, StreamEvent]]:
    """Run every choice to completion; if the client leaves first, cancel them (499)."""
    streams = ChoiceStreams(rt, choices)
    try:
        return await unless_disconnected(request, collect(streams))
    except ClientGone:
        raise ApiError(499, "client closed the request", code="client_closed") from None
    finally:
        streams.close()


async def stream_reply(request: Request, rt: Runtime, reply: Reply, choices: list[Choice], echo: bool,
                       include_usage: bool) -> Response:
    """Waits for the first event before sending headers, so a request that never got a slot
    still gets a real 503 status instead of an in-band error."""
    streams = ChoiceStreams(rt, choices)
    try:
        first = await unless_disconnected(request, streams.next())
    except ClientGone:
        streams.close()
        raise ApiError(499, "client closed the request", code="client_closed") from None
    except BaseException:
        streams.close()
        raise
    if first is not None and first[1].finish_reason in ("abort", "error"):
        streams.close()
        raise engine_failure(first[1])
    events = sse_events(reply, choices, streams, first, echo, include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


# ----------------------------------------------------------------------------- process entry point


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before uvicorn shuts down
    (see the module docstring); the signal is not re-raised afterwards, so the exit is 0."""

    def __init__(self, config: uvicorn.Config, drain: Callable):
        super().__init__(config)
        self.drain, self.loop, self.draining = drain, None, False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        log.info("signal %s: draining before exit", sig)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain()
        finally:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv, dict(os.environ))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.threads:
        torch.set_num_threads(settings.threads)  # for --no-engine-process; the engine process sets its own
    try:
        app = create_app(settings)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, drain=app.state.runtime.drain).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
