"""The engine in its own process (engine_process.py): a real spawned child running a tiny
random checkpoint. What the HTTP layer relies on: the same results as the in-process engine,
a synchronous queue bound, cancellation, metrics relayed, a clean stop, and no client left
waiting when the child dies."""
from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from dataclasses import replace

import pytest

import serve_api
from engine import Engine, EngineConfig, EngineDraining, EngineFailed, EngineObserver, QueueFull, SamplingParams
from engine_process import EngineProcess
from model import load_checkpoint, resolve_output_dtype
from serve_helpers import write_tiny_checkpoint
from tokenizer import load_tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LONG = SamplingParams(max_tokens=10_000, temperature=1.0, seed=1)  # runs until cancelled (capped by the context)


class Recorder(EngineObserver):
    def __init__(self):
        self.hooks: list[str] = []
        self.rejects: list[str] = []

    def on_submit(self):
        self.hooks.append("on_submit")

    def on_reject(self, reason):
        self.rejects.append(reason)

    def on_step(self, *args):
        self.hooks.append("on_step")

    def on_finish(self, completion):
        self.hooks.append("on_finish")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", block_size=256)


def start(ckpt, **config) -> tuple[EngineProcess, Recorder]:
    settings = replace(serve_api.Settings(), model_path=ckpt, device="cpu")
    recorder = Recorder()
    engine = EngineProcess(functools.partial(serve_api.load_served_model, settings),
                           EngineConfig(**{"max_batch": 4, **config}), recorder, threads=1)
    return engine.start(), recorder


@pytest.fixture(scope="module")
def engine(ckpt):
    """Shared by the tests that leave it as they found it (a start costs ~2.5 s: spawn, imports)."""
    engine, recorder = start(ckpt)
    engine.recorder = recorder
    yield engine
    engine.shutdown(10)


@pytest.fixture
def own_engine(ckpt):
    engine, recorder = start(ckpt)
    engine.recorder = recorder
    yield engine
    engine.shutdown(10)


def prompts() -> list[list[int]]:
    enc = load_tokenizer()
    return [enc.encode_ordinary(text) for text in ("def add(a, b):\n", "import os\n\n", "class Stack:\n    ")]


def test_greedy_results_match_the_in_process_engine(engine, ckpt):
    handles = [engine.submit(p, GREEDY) for p in prompts()]
    remote = [h.result(30) for h in handles]
    model, _ = load_checkpoint(ckpt, "cpu")
    model.set_output_dtype(resolve_output_dtype("auto", model, "cpu"))  # as the server loads it
    local = Engine(model, EngineConfig(max_batch=4)).generate(prompts(), GREEDY)
    assert [c.token_ids for c in remote] == [c.token_ids for c in local]
    assert [c.text for c in remote] == [c.text for c in local]
    assert all(c.finish_reason in ("length", "stop") and c.error is None for c in remote)


def test_stream_delivers_the_same_text_as_the_result(engine):
    handle = engine.submit(prompts()[0], GREEDY)

    async def consume():
        return [event async for event in handle.stream()]

    pieces = asyncio.run(consume())
    assert pieces[-1].finish_reason in ("length", "stop")
    assert "".join(e.text for e in pieces) == handle.result(1).text


def test_describes_what_it_serves(engine):
    assert engine.max_context == 256 and engine.max_batch == 4
    assert engine.served.model is None and engine.served.device == "cpu" and engine.served.dtype == "float32"


def test_bad_requests_fail_at_submit_without_reaching_the_child(engine):
    for prompt, params in [([], GREEDY), ([1] * 256, GREEDY), ([10 ** 6], GREEDY),
                           ([1, 2], SamplingParams(temperature=-1))]:
        with pytest.raises(ValueError):
            engine.submit(prompt, params)
    assert engine.wait_idle(1)


def test_queue_bound_is_synchronous_and_cancel_frees_the_slots(ckpt):
    engine, recorder = start(ckpt, max_batch=1, max_waiting=1)
    try:
        running, waiting = engine.submit([1, 2, 3], LONG), engine.submit([4, 5, 6], LONG)
        with pytest.raises(QueueFull):
            engine.submit([7, 8, 9], GREEDY)
        assert recorder.rejects == ["queue_full"]
        assert wait_for(lambda: engine.num_running == 1 and engine.num_waiting == 1)
        waiting.cancel()
        running.cancel()
        assert running.result(10).finish_reason == "abort" and waiting.result(10).finish_reason == "abort"
        assert engine.wait_idle(5) and wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)
        assert engine.submit([7, 8, 9], GREEDY).result(30).completion_tokens > 0
    finally:
        engine.shutdown(10)


def test_observer_calls_are_relayed(engine):
    engine.submit(prompts()[1], GREEDY).result(30)
    assert wait_for(lambda: "on_finish" in engine.recorder.hooks)
    hooks = engine.recorder.hooks
    assert hooks.index("on_submit") < hooks.index("on_step") < hooks.index("on_finish")


def test_heartbeat_stays_fresh_while_idle(engine):
    time.sleep(1.0)
    assert engine.alive and engine.seconds_since_heartbeat < 0.9


def test_drain_refuses_new_work_and_finishes_what_runs(own_engine):
    engine = own_engine
    handle = engine.submit(prompts()[0], GREEDY)
    engine.drain()
    with pytest.raises(EngineDraining):
        engine.submit(prompts()[1], GREEDY)
    assert engine.wait_idle(30) and handle.result(1).finish_reason in ("length", "stop")
    assert engine.recorder.rejects == ["draining"]


def test_shutdown_stops_the_child_and_ends_what_was_running(own_engine):
    engine = own_engine
    handle = engine.submit([1, 2, 3], LONG)
    assert wait_for(lambda: engine.num_running == 1)
    engine.shutdown(10)
    completion = handle.result(5)
    assert completion.finish_reason == "error" and completion.error == "engine_stopped"
    assert not engine.alive and engine._process.exitcode == 0


def test_child_ignores_ctrl_c_the_server_drains_first(engine):
    os.kill(engine._process.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    assert engine.submit(prompts()[2], GREEDY).result(30).finish_reason in ("length", "stop")
    assert engine.alive


def test_a_dead_child_fails_requests_in_flight_and_refuses_new_ones(own_engine):
    engine = own_engine
    handle = engine.submit([1, 2, 3], LONG)
    assert wait_for(lambda: engine.num_running == 1)
    os.kill(engine._process.pid, signal.SIGKILL)
    completion = handle.result(10)
    assert completion.finish_reason == "error" and completion.error == "engine_failed"
    assert wait_for(lambda: not engine.alive)
    with pytest.raises(EngineFailed):
        engine.submit([1, 2, 3], GREEDY)


def test_startup_error_is_raised_in_the_parent(tmp_path):
    settings = replace(serve_api.Settings(), model_path=str(tmp_path / "missing.pt"))
    with pytest.raises(serve_api.StartupError, match="make train"):
        EngineProcess(functools.partial(serve_api.load_served_model, settings), EngineConfig())

