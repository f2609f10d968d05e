"""The HTTP server end to end: real uvicorn on loopback, a tiny random model, httpx and the
official openai client. Behaviour clients rely on: shapes, streaming framing, stop strings,
FIM, errors, overload, cancellation, auth, metrics, draining on SIGTERM, start-up errors."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import serve_api
from engine import default_prefill_chunk
from model import cpu_has_native_bf16
from serve_helpers import (REPO, SERVER_SCRIPT, free_port, parse_stream, start_server_process, thread_server,
                           wait_until_ready, write_tiny_checkpoint)
from tokenizer import load_tokenizer

MODEL = serve_api.DEFAULT_MODEL_ID
PROMPT = "import os\n\ndef read_config(path):\n    "
GREEDY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    # block 128 for most tests; block 1024 where a request must still be generating while
    # the test acts on it (disconnect, queue timeout, SIGTERM).
    return {"small": write_tiny_checkpoint(root / "best.pt", 128),
            "long": write_tiny_checkpoint(root / "long.pt", 1024)}


@pytest.fixture(scope="module")
def server(checkpoints):
    with thread_server(checkpoints["small"], max_body_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def long_server(checkpoints):
    with thread_server(checkpoints["long"], max_batch=1, max_waiting=1, max_queue_wait_s=0.5) as srv:
        yield srv


def post(srv, body, path="/v1/completions", **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60, **kw)


def greedy_text(srv, **overrides) -> dict:
    r = post(srv, {**GREEDY, **overrides})
    assert r.status_code == 200, r.text
    return r.json()


def stream_raw(srv, body) -> tuple[httpx.Headers, str]:
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return r.headers, r.read().decode()


def metric_samples(srv) -> dict:
    """{(name, frozenset(labels)): value} of one /metrics scrape."""
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate, timeout=5.0, interval=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_error_shape(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ----------------------------------------------------------------------------- shapes


def test_complete_keeps_the_seed_contract(server):
    r = post(server, {"code": "def add(a, b):\n", "max_tokens": 8, "temperature": 0}, path="/complete")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["completion"], str) and 1 <= body["tokens"] <= 8 and body["latency_ms"] >= 0
    defaults = post(server, {"code": "x = 1\n"}, path="/complete")  # max_tokens 50, temperature 0.8, top_k 200
    assert defaults.status_code == 200 and defaults.json()["tokens"] <= 50


def test_v1_completion_shape_and_usage(server):
    body = greedy_text(server)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert abs(body["created"] - time.time()) < 60
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(load_tokenizer().encode_ordinary(PROMPT))
    assert 1 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert greedy_text(server)["choices"][0]["text"] == choice["text"]  # temperature 0 is deterministic


def test_models_health_ready(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert "gpt" not in MODEL.lower() and models["data"][0]["object"] == "model"
    assert httpx.get(server.url + "/health").status_code == 200
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_n_choices_echo_and_prompt_lists(server):
    body = greedy_text(server, n=3, max_tokens=6)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in body["choices"]}) == 1  # greedy: all identical
    one = greedy_text(server, max_tokens=6)
    assert body["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert body["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
    two = greedy_text(server, prompt=[PROMPT, "class A:\n"], n=2, max_tokens=4, echo=True)
    texts = [c["text"] for c in two["choices"]]
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert texts[0].startswith(PROMPT) and texts[2].startswith("class A:\n")
    # echo: the prompt, then a 4-token prefix of the same greedy completion
    assert one["choices"][0]["text"].startswith(texts[0][len(PROMPT):])


def test_huge_max_tokens_is_capped_not_rejected(server):
    body = greedy_text(server, max_tokens=4096)
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 128


# ----------------------------------------------------------------------------- streaming


def test_stream_concatenates_to_the_greedy_text(server):
    expected = greedy_text(server)
    headers, raw = stream_raw(server, {**GREEDY, "stream_options": {"include_usage": True}})
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    chunks, done = parse_stream(raw)
    assert done
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == expected["usage"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finish[-1] == expected["choices"][0]["finish_reason"] and all(f is None for f in finish[:-1])
    assert "".join(c["choices"][0]["text"] for c in choice_chunks) == expected["choices"][0]["text"]


def test_stream_without_usage_ends_with_finish_chunk_then_done(server):
    _, raw = stream_raw(server, {**GREEDY, "max_tokens": 5})
    chunks, done = parse_stream(raw)
    assert done and chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_openai_client_plain_and_stream(server):
    expected = greedy_text(server)["choices"][0]["text"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert plain.choices[0].text == expected and plain.usage.completion_tokens >= 1
    pieces, reasons = [], []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected and reasons[-1] is not None and not any(reasons[:-1])


def test_stop_strings_cut_exactly_and_never_leak(server):
    full = greedy_text(server, max_tokens=40)["choices"][0]["text"]
    assert len(full) >= 8, f"the tiny model's greedy text is too short to pick a stop string: {full!r}"
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    # More than OpenAI's 4 stop strings: editor plugins send ~10.
    stops = [f"never-{i}" for i in range(19)] + [stop]
    cut = greedy_text(server, max_tokens=40, stop=stops)["choices"][0]
    assert cut["text"] == expected and cut["finish_reason"] == "stop"
    chunks, done = parse_stream(stream_raw(server, {**GREEDY, "max_tokens": 40, "stop": stops})[1])
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert done and streamed == expected and stop not in streamed
    seed = post(server, {"code": PROMPT, "max_tokens": 40, "temperature": 0, "stop": stop}, path="/complete")
    assert seed.json()["completion"] == expected


def test_fim_through_suffix_and_textual_markers(server):
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    by_suffix = greedy_text(server, prompt=prefix, suffix=suffix, max_tokens=8)
    by_markers = greedy_text(server, prompt=f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>", max_tokens=8)
    by_pipes = greedy_text(server, prompt=f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>", max_tokens=8)
    plain = greedy_text(server, prompt=prefix, max_tokens=8)
    assert by_markers["choices"][0]["text"] == by_suffix["choices"][0]["text"] == by_pipes["choices"][0]["text"]
    # The markers became the 3 FIM tokens, not text: same prompt as the suffix form.
    prompt_tokens = {r["usage"]["prompt_tokens"] for r in (by_suffix, by_markers, by_pipes)}
    assert len(prompt_tokens) == 1
    assert by_suffix["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    seed = post(server, {"code": prefix, "suffix": suffix, "max_tokens": 8, "temperature": 0}, path="/complete")
    assert seed.status_code == 200 and seed.json()["completion"] == by_suffix["choices"][0]["text"]


# ----------------------------------------------------------------------------- load


def test_128_concurrent_requests_all_succeed(server):
    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            bodies = [{"model": MODEL, "prompt": f"def f{i}(x):\n    return x * {i}", "max_tokens": 8,
                       "temperature": 0.8, "seed": i} for i in range(128)]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 128
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)


# ----------------------------------------------------------------------------- errors


V1 = "/v1/completions"


def v1(**fields) -> dict:
    return {"model": MODEL, "prompt": "x", **fields}


BAD_INPUTS = [
    # (case, path, JSON body or raw bytes, status, param, code)
    ("malformed json", V1, b'{"model": "code-assistant", "prompt": ', 400, None, "invalid_json"),
    ("body not an object", V1, [1, 2], 400, None, None),
    ("missing prompt", V1, {"model": MODEL}, 400, "prompt", None),
    ("prompt wrong type", V1, v1(prompt=123), 400, "prompt", None),
    ("max_tokens wrong type", V1, v1(max_tokens="ten"), 400, "max_tokens", None),
    ("temperature 5", V1, v1(temperature=5), 400, "temperature", None),
    ("top_p 1.5", V1, v1(top_p=1.5), 400, "top_p", None),
    ("max_tokens -1", V1, v1(max_tokens=-1), 400, "max_tokens", None),
    ("empty prompt", V1, v1(prompt=""), 400, "prompt", None),
    ("empty prompt list", V1, v1(prompt=[]), 400, "prompt", None),
    ("token-id prompt", V1, v1(prompt=[1, 2, 3]), 400, "prompt", None),
    ("unknown model", V1, v1(model="gpt-4"), 404, "model", "model_not_found"),
    ("n=0", V1, v1(n=0), 400, "n", None),
    ("n too large", V1, v1(n=1000), 400, "n", None),
    ("logprobs=3", V1, v1(logprobs=3), 400, "logprobs", None),
    ("presence_penalty", V1, v1(presence_penalty=1), 400, "presence_penalty", None),
    ("too many stops", V1, v1(stop=[str(i) for i in range(33)]), 400, "stop", None),
    ("stream wrong type", V1, v1(stream=[1]), 400, "stream", None),
    ("body too large", V1, v1(prompt="x" * 100_000), 413, None, "body_too_large"),
    ("seed: code wrong type", "/complete", {"code": 5}, 400, "code", None),
    ("seed: empty code", "/complete", {"code": ""}, 400, "code", None),
    ("seed: temperature", "/complete", {"code": "x", "temperature": -1}, 400, "temperature", None),
    ("unknown route", "/v2/nothing", {"prompt": "x"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("case,path,body,status,param,code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_openai_error(server, case, path, body, status, param, code):
    raw = isinstance(body, bytes)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert_error_shape(r, status, param, code)
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_body_limit_counts_bytes_without_content_length(server):
    def chunks():  # chunked transfer: no Content-Length to trust
        yield b'{"model": "code-assistant", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413)


# ----------------------------------------------------------------------------- overload, cancellation


def long_stream_started(url: str, body: dict):
    """Open a streaming request and read until its first chunk: it then holds a slot."""
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", url + "/v1/completions", json={**body, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return client, response, lines


LONG = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0}


def test_disconnected_stream_frees_its_slot(long_server):
    engine = long_server.runtime.engine
    before = metric_samples(long_server)[("codeassist_cancellations_total", frozenset())]
    client, response, _ = long_stream_started(long_server.url, LONG)
    assert engine.num_running == 1
    response.close()
    client.close()
    assert wait_for(lambda: engine.num_running == 0, timeout=5)
    samples = metric_samples(long_server)
    assert samples[("codeassist_cancellations_total", frozenset())] == before + 1
    assert samples[("codeassist_requests_running", frozenset())] == 0


def test_client_gone_before_a_plain_response_frees_its_slot(long_server):
    engine = long_server.runtime.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(long_server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
    assert wait_for(lambda: engine.num_running == 0, timeout=5)
    aborted = ("codeassist_requests_finished_total", frozenset({("finish_reason", "abort")}))
    assert metric_samples(long_server)[aborted] >= 1


def test_full_queue_gets_429_and_a_long_wait_503(long_server):
    # max_batch 1, max_waiting 1, max_queue_wait 0.5 s: one running, one waiting, the rest 429.
    client, response, _ = long_stream_started(long_server.url, LONG)
    try:
        results = {}

        def send(name):
            results[name] = post(long_server, {**LONG, "max_tokens": 4})

        waiter = threading.Thread(target=send, args=("waiter",))
        waiter.start()
        assert wait_for(lambda: long_server.runtime.engine.num_waiting == 1, timeout=5)
        send("rejected")
        waiter.join(30)
    finally:
        response.close()
        client.close()
    error = assert_error_shape(results["rejected"], 429)
    assert error["type"] == "rate_limit_error" and int(results["rejected"].headers["retry-after"]) >= 1
    assert_error_shape(results["waiter"], 503, code="queue_timeout")
    assert "retry-after" in results["waiter"].headers
    assert wait_for(lambda: long_server.runtime.engine.num_running == 0, timeout=5)


# ----------------------------------------------------------------------------- auth, metrics


def test_api_keys(checkpoints):
    with thread_server(checkpoints["small"], api_keys=("k1", "k2")) as srv:
        body = {**GREEDY, "max_tokens": 2}
        assert_error_shape(post(srv, body), 401, code="invalid_api_key")
        assert_error_shape(post(srv, body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error_shape(post(srv, {"bad": "body"}), 401)  # auth before validation
        assert_error_shape(httpx.get(srv.url + "/v1/models"), 401)
        assert post(srv, body, headers={"Authorization": "Bearer k2"}).status_code == 200
        seed = post(srv, {"code": "x", "max_tokens": 2}, "/complete", headers={"Authorization": "Bearer k1"})
        assert seed.status_code == 200
        for open_path in ("/health", "/ready", "/metrics"):
            assert httpx.get(srv.url + open_path).status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="k1", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="bad", max_retries=0).completions.create(
                model=MODEL, prompt="x", max_tokens=2)


def test_metrics_parse_and_move_with_traffic(server):
    ok = ("codeassist_http_requests_total", frozenset({("endpoint", "/v1/completions"), ("status", "200")}))
    before = metric_samples(server)
    body = greedy_text(server, max_tokens=5)

    def moved():
        after = metric_samples(server)
        return after, after.get(("codeassist_generated_tokens_total", frozenset()), 0) - before.get(
            ("codeassist_generated_tokens_total", frozenset()), 0) == body["usage"]["completion_tokens"]

    assert wait_for(lambda: moved()[1], timeout=3)
    after = moved()[0]
    assert after[ok] == before.get(ok, 0) + 1
    delta = lambda name, labels=frozenset(): after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert delta("codeassist_prompt_tokens_total") == body["usage"]["prompt_tokens"]
    assert delta("codeassist_request_latency_seconds_count") == 1
    assert delta("codeassist_time_to_first_token_seconds_count") == 1
    assert delta("codeassist_engine_step_seconds_count") >= 1 and delta("codeassist_batch_size_count") >= 1
    reason = frozenset({("finish_reason", body["choices"][0]["finish_reason"])})
    assert delta("codeassist_requests_finished_total", reason) == 1
    assert after[("codeassist_ready", frozenset())] == 1 and after[("codeassist_requests_running", frozenset())] == 0
    assert after[("codeassist_kv_cache_usage_ratio", frozenset())] == 0
    build = [labels for name, labels in after if name == "codeassist_build_info"]
    output = "bfloat16" if cpu_has_native_bf16() else "float32"  # --output-dtype auto
    assert dict(build[0]) == {"model_id": MODEL, "device": "cpu", "dtype": "float32", "output_dtype": output,
                              "quantization": "none"}
    post(server, {"model": "nope", "prompt": "x"})
    bad = ("codeassist_http_requests_total", frozenset({("endpoint", "/v1/completions"), ("status", "404")}))
    assert metric_samples(server)[bad] == after.get(bad, 0) + 1


# ----------------------------------------------------------------------------- process level


def test_sigterm_drains_in_flight_requests_then_exits_0(checkpoints, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server_process(["--model", checkpoints["long"], "--port", str(port), "--drain-timeout", "20"],
                                log_path=tmp_path / "server.log")
    try:
        wait_until_ready(url, process=proc)
        client, response, lines = long_stream_started(url, {**LONG, "max_tokens": 400})
        proc.send_signal(signal.SIGTERM)
        ready = httpx.get(url + "/ready", timeout=5)
        late = httpx.post(url + "/v1/completions", json={**GREEDY, "max_tokens": 2}, timeout=5)
        rest = list(lines)  # the in-flight stream runs to its end
        client.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ready.status_code == 503 and "draining" in ready.json()["reason"]
    assert_error_shape(late, 503, code="draining")
    payloads = [line[len("data: "):] for line in rest if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]" and '"finish_reason":"length"' in payloads[-2], payloads[-3:]


def test_drain_timeout_aborts_what_is_left_with_an_in_band_error(checkpoints):
    with thread_server(checkpoints["long"], drain_timeout_s=0.3) as srv:
        client, response, lines = long_stream_started(srv.url, LONG)  # ~2 s or more of work
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(srv.runtime.drain(), srv.loop).result(timeout=10)
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        elapsed = time.monotonic() - started
        client.close()
        assert srv.runtime.engine.num_running == 0
    # "aborted", not finish_reason "length": the drain bound cut the stream before its 1000 tokens.
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "aborted", rest[-2:]
    assert all('"finish_reason":"length"' not in line for line in rest)
    assert elapsed < 5.0  # and promptly (0.3 s bound; generous for a loaded 2-core machine)


def test_a_dead_engine_process_fails_health_and_requests_but_not_the_server(checkpoints):
    with thread_server(checkpoints["small"]) as srv:
        process = srv.runtime.engine._process
        assert process.pid != os.getpid() and process.is_alive()  # the model runs in its own process
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        health = httpx.get(srv.url + "/health", timeout=5)
        late = post(srv, {**GREEDY, "max_tokens": 2})
        assert health.status_code == 503 and "engine" in health.json()["reason"]
        assert_error_shape(late, 503, code="engine_failed")
        assert httpx.get(srv.url + "/metrics", timeout=5).status_code == 200


def test_bad_checkpoint_exits_with_one_line_naming_the_make_target(tmp_path):
    missing = subprocess.run([sys.executable, SERVER_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MODEL_PATH": str(tmp_path / "none" / "best.pt")})
    corrupt = tmp_path / "ckpt_int8.pt"
    corrupt.write_bytes(b"not a checkpoint")
    broken = subprocess.run([sys.executable, SERVER_SCRIPT, "--model", str(corrupt)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    for result, target in ((missing, "make train"), (broken, "make quantize")):
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and target in lines[0], result.stderr


def test_settings_from_flags_and_environment():
    env = {"PORT": "9001", "API_KEYS": "a, b,", "MAX_BATCH": "4", "MODEL_ID": "mine", "DTYPE": "bfloat16",
           "ENGINE_PROCESS": "0"}
    s = serve_api.parse_settings(["--port", "9002", "--drain-timeout", "3"], env)
    assert (s.port, s.api_keys, s.max_batch, s.model_id) == (9002, ("a", "b"), 4, "mine")
    assert not s.engine_process and serve_api.parse_settings([], {}).engine_process
    assert (s.dtype, s.drain_timeout_s, s.host) == ("bfloat16", 3.0, "127.0.0.1")
    assert serve_api.parse_settings([], {}).port == 8000
    for bad in ({"PORT": "eighty"}, {"DTYPE": "int3"}, {"PREFILL_CHUNK": "-1"}, {"MAX_BATCH": "0"}):
        with pytest.raises(SystemExit):
            serve_api.parse_settings([], bad)


def test_the_prefill_chunk_follows_the_device_unless_set():
    assert serve_api.parse_settings([], {}).prefill_chunk == 0  # auto
    assert serve_api.parse_settings(["--prefill-chunk", "64"], {}).prefill_chunk == 64
    assert (default_prefill_chunk("cpu"), default_prefill_chunk("cuda:0")) == (512, 4096)

