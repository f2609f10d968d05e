"""The engine in a process of its own, so that HTTP and the model never share a GIL.

Why: in one process the event loop (HTTP, JSON, SSE) and the engine thread take turns on the
GIL. Every torch call gives it up and must win it back, so at 128 users a busy event loop
stretched engine steps from 8 to 26 ms (README, "Serving under load"). vLLM's V1 engine core
runs in its own process for the same reason. Here:

    HTTP process                                  engine process (spawned)
    EngineProcess: Engine's API,        submit,   EngineService: one thread drives
      submit() -> RequestHandle        cancel,      Engine.step() and, after each step,
      a receiver thread completes  ---- drain ---->   sends the step's stream events,
      the handles                  <-- one message   observer calls and stats
                                       per step --

EngineProcess keeps Engine's surface (submit and handles, num_running, num_waiting,
prefix_cache_stats, alive, heartbeat, drain, wait_idle, shutdown), so serve_api.py serves
either. The child loads the model itself through a picklable `loader`: no weights cross the
pipe, and only the child touches CUDA. It ignores SIGINT and SIGTERM (the HTTP process drains
first, then tells it to stop) and exits when the pipe closes, so it never outlives the server.

Requests are bounded here, in the HTTP process: at most max_batch running plus max_waiting
queued, counted exactly (the parent sees every submit and every final event), so a full queue
is a synchronous QueueFull (429) as with the in-process engine.
"""
from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from engine import (IDLE_WAIT_S, Completion, Engine, EngineConfig, EngineDraining, EngineFailed, EngineObserver,
                    EventOutbox, QueueFull, RequestHandle, SamplingParams, StreamEvent, check_request,
                    prefix_cache_stats, raise_for_rejection)

log = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    """What the child reports once its model is loaded and warmed."""
    served: Any  # the loader's result without its model (serve_api.ServedModel: id, device, dtype, ...)
    max_context: int
    max_batch: int
    vocab_size: int


@dataclass
class EngineStats:
    """The child's state after a step, for metrics and health."""
    running: int = 0
    waiting: int = 0
    prefix_cache: dict = field(default_factory=lambda: prefix_cache_stats(None))
    failure: str | None = None


def failed_completion(error: str) -> tuple[StreamEvent, Completion]:
    """The final event and result of a request that the engine could not run."""
    return (StreamEvent("", "error", error),
            Completion("", "error", prompt_tokens=0, completion_tokens=0, token_ids=[], error=error))


# ----------------------------------------------------------------------------- HTTP process side


class EngineProcess:
    """Starts the engine process and stands in for its Engine. Blocks until the model is
    loaded; a loader error (serve_api.StartupError: missing checkpoint...) is raised here."""

    def __init__(self, loader: Callable[[], Any], config: EngineConfig, observer: EngineObserver | None = None,
                 threads: int = 0, log_level: str = "INFO"):
        self.config = config
        self.observer = observer or EngineObserver()
        # The child may queue max_batch more than max_waiting: the bound is enforced here.
        child_config = replace(config, max_waiting=config.max_waiting + config.max_batch)
        context = multiprocessing.get_context("spawn")  # never fork a process that has threads and torch
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine_service, name="engine",
                                        args=(child_conn, loader, child_config, threads, log_level), daemon=True)
        self._process.start()
        child_conn.close()  # ours is closed: EOF on our end now means the child is gone
        self.info = self._await_start()
        self.served, self.max_context, self.max_batch = self.info.served, self.info.max_context, self.info.max_batch
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._handles: dict[int, RequestHandle] = {}
        self._keys = itertools.count()
        self._outbox = EventOutbox()
        self._stats = EngineStats()
        self._last_heard = time.monotonic()
        self._receiver: threading.Thread | None = None
        self._draining = self._stopping = False
        self._failure: str | None = None

    def _await_start(self) -> EngineInfo:
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited with code {self._process.exitcode} while starting")
        kind, payload = self._conn.recv()
        if kind == "startup_failed":
            self._process.join(10)
            raise payload
        return payload

    # ---- Engine's surface

    @property
    def num_running(self) -> int:
        return self._stats.running

    @property
    def num_waiting(self) -> int:
        return self._stats.waiting

    @property
    def prefix_cache_stats(self) -> dict[str, int]:
        return self._stats.prefix_cache

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self._failure is None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def seconds_since_heartbeat(self) -> float:
        return time.monotonic() - self._last_heard

    def start(self) -> "EngineProcess":
        if self._receiver is None:
            self._receiver = threading.Thread(target=self._receive, name="engine-receiver", daemon=True)
            self._receiver.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        prompt_ids = list(prompt_ids)
        check_request(prompt_ids, params, self.max_context, self.info.vocab_size)
        with self._cond:
            rejection = self._admission_check()
            if rejection is None:
                key = next(self._keys)
                handle = RequestHandle(f"req-{key}", functools.partial(self._send, ("cancel", key)), self._outbox)
                self._handles[key] = handle
        if rejection in ("queue_full", "draining"):  # as Engine counts them: a failure is no rejection
            self._notify("on_reject", rejection)
        raise_for_rejection(rejection, self.config.max_waiting, self._failure)
        self._send(("submit", key, prompt_ids, params))
        return handle

    def _admission_check(self) -> str | None:
        if self._failure is not None:
            return "failed"
        if self._draining or self._stopping:
            return "draining"
        if len(self._handles) >= self.config.max_batch + self.config.max_waiting:
            return "queue_full"
        return None

    def drain(self) -> None:
        with self._cond:
            self._draining = True
        self._send(("drain",))

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._handles, timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the child (requests left get 'engine_stopped'); kill it if it does not go."""
        with self._cond:
            self._stopping = self._draining = True
        self._send(("shutdown",))
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("engine process did not stop within %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        if self._receiver is not None:
            self._receiver.join(5)  # it sees EOF now and fails whatever is left
        else:
            self._child_gone()

    # ---- plumbing

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone; the receiver fails the requests
                pass

    def _receive(self) -> None:
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                break
            self._last_heard = time.monotonic()
            if kind != "update":
                continue
            try:
                self._apply(*payload)
            except Exception:  # noqa: BLE001 - a bug here must not stop every later stream
                log.exception("could not apply an engine update")
        self._child_gone()

    def _apply(self, updates: list, calls: list, stats: EngineStats) -> None:
        self._stats = stats
        if stats.failure is not None:
            self._failure = stats.failure
        for hook, args in calls:
            self._notify(hook, *args)
        finished = []
        for key, events, completion in updates:
            handle = self._handles.get(key)
            if handle is None:
                continue
            for event in events[:-1] if completion is not None else events:
                handle.deliver(event)
            if completion is not None:
                handle.complete(events[-1], completion)
                finished.append(key)
        self._outbox.flush()
        if finished:
            with self._cond:
                for key in finished:
                    self._handles.pop(key, None)
                self._cond.notify_all()

    def _child_gone(self) -> None:
        """No more messages: fail whatever is still in flight, so no client waits forever."""
        with self._cond:
            if self._failure is None and not self._stopping:
                self._failure = f"the engine process exited unexpectedly (code {self._process.exitcode})"
                log.error("%s", self._failure)
            error = "engine_stopped" if self._stopping else "engine_failed"
            left, self._handles = list(self._handles.values()), {}
            self._cond.notify_all()
        for handle in left:
            handle.complete(*failed_completion(error))
        self._outbox.flush()
        self._conn.close()

    def _notify(self, hook: str, *args) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001 - a metrics bug must not stop the stream
            log.exception("engine observer %s failed", hook)


# ----------------------------------------------------------------------------- engine process side


class RelayObserver(EngineObserver):
    """Records the engine's observer calls, to be replayed in the HTTP process."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def take(self) -> list[tuple[str, tuple]]:
        calls, self.calls = self.calls, []
        return calls

    def on_submit(self): self.calls.append(("on_submit", ()))
    def on_reject(self, reason): self.calls.append(("on_reject", (reason,)))
    def on_first_token(self, ttft_s, queue_s): self.calls.append(("on_first_token", (ttft_s, queue_s)))
    def on_finish(self, completion): self.calls.append(("on_finish", (completion,)))
    def on_step(self, *args): self.calls.append(("on_step", args))
    def on_prefix_lookup(self, query_tokens, hit_tokens): self.calls.append(("on_prefix_lookup", (query_tokens, hit_tokens)))
    def on_prefix_evict(self, blocks): self.calls.append(("on_prefix_evict", (blocks,)))


class EngineService:
    """The child's one thread: messages in, a step, the step's results out; repeat."""

    def __init__(self, engine: Engine, relay: RelayObserver, conn):
        self.engine, self.relay, self.conn = engine, relay, conn
        self.live: dict[int, RequestHandle] = {}
        self.refused: list[tuple[int, str]] = []
        self.stopping = False
        self.failure: str | None = None
        self.last_sent = 0.0

    def run(self) -> int:
        """The exit code: 0 when told to stop or when the HTTP process is gone, 1 on failure."""
        while not self.stopping:
            if not self._receive(IDLE_WAIT_S if self.engine.idle else 0.0):
                return 0
            if not self.stopping and not self.engine.idle:
                try:
                    self.engine.step()
                except Exception as exc:  # noqa: BLE001 - every failure must reach the clients
                    log.exception("engine step failed; failing all in-flight requests")
                    self.engine.fail(exc)
                    self.failure = f"{type(exc).__name__}: {exc}"
                    self._send_updates(force=True)
                    return 1
            self._send_updates()
        self._send_updates(force=True)
        return 0

    def _receive(self, timeout: float) -> bool:
        """Handle every message waiting (waiting up to `timeout` for the first); False at EOF."""
        try:
            ready = self.conn.poll(timeout)
            while ready:
                self._handle(*self.conn.recv())
                ready = self.conn.poll(0)
        except (EOFError, OSError):
            return False
        return True

    def _handle(self, kind: str, *payload) -> None:
        if kind == "submit":
            self._submit(*payload)
        elif kind == "cancel" and payload[0] in self.live:
            self.live[payload[0]].cancel()
        elif kind == "drain":
            self.engine.drain()
        elif kind == "shutdown":
            self.stopping = True
            self.engine.shutdown(0)  # no thread to join: fails what is left with 'engine_stopped'

    def _submit(self, key: int, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.live[key] = self.engine.submit(prompt_ids, params)
        except (QueueFull, EngineDraining, ValueError) as exc:  # races with drain/failure only
            failed = isinstance(exc, EngineFailed) or not isinstance(exc, EngineDraining)
            self.refused.append((key, "engine_failed" if failed else "engine_stopped"))

    def _send_updates(self, force: bool = False) -> None:
        updates = [(key, [event], completion) for key, (event, completion) in
                   ((key, failed_completion(error)) for key, error in self.refused)]
        self.refused = []
        for key, handle in list(self.live.items()):
            events = handle.take_events()
            if events:
                updates.append((key, events, handle.result(0) if handle.done else None))
            if handle.done:
                del self.live[key]
        calls = self.relay.take()
        now = time.monotonic()
        if updates or calls or force or now - self.last_sent >= IDLE_WAIT_S:
            stats = EngineStats(self.engine.num_running, self.engine.num_waiting, self.engine.prefix_cache_stats,
                                self.failure)
            self.conn.send(("update", updates, calls, stats))
            self.last_sent = now


def picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def run_engine_service(conn, loader: Callable[[], Any], config: EngineConfig, threads: int, log_level: str) -> None:
    """The engine process's entry point (spawned, so everything it gets is pickled)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the HTTP process drains, then stops us
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        served = loader()
        relay = RelayObserver()
        engine = Engine(served.model, config, observer=relay, device=served.device)
        engine.prepare()
    except BaseException as exc:  # noqa: BLE001 - reported to the HTTP process, which exits with it
        conn.send(("startup_failed", picklable(exc)))
        return
    conn.send(("started", EngineInfo(replace(served, model=None), engine.max_context, engine.max_batch,
                                     engine.vocab_size)))
    code = EngineService(engine, relay, conn).run()
    conn.close()
    if code:
        raise SystemExit(code)
