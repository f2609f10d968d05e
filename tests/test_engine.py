"""Tests for engine.py: continuous batching, sampling, stop handling, detokenization, token
healing, cancellation, queue bounds, draining, failure, prompts, async streaming."""

import asyncio
import threading
import time

import pytest
import torch

from engine import (Completion, Detokenizer, Engine, EngineConfig, EngineDraining, EngineFailed, EngineObserver,
                    QueueFull, SamplingParams, StreamEvent, TokenHealer, Vocabulary, build_prompt_ids,
                    first_argmax, split_fim_prompt)
from model import GPTConfig
from tokenizer import EOT_ID, FIM_MIDDLE_ID, N_VOCAB, fim_ids, load_tokenizer

V = 50304
GREEDY = dict(temperature=0.0, heal=False)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


@pytest.fixture(scope="module")
def vocab(enc):
    return Vocabulary(enc, V)


def make_engine(model, enc, observer=None, **config) -> Engine:
    return Engine(model, EngineConfig(**config), enc=enc, observer=observer).start()


def run(model, enc, prompts, params, **config) -> list[Completion]:
    engine = make_engine(model, enc, **config)
    try:
        return engine.generate(prompts, params)
    finally:
        engine.shutdown()


class FakeModel(torch.nn.Module):
    """Stands in for GPT where a test needs exact control: logits_at(position of the input
    token) gives the logits for the next token. Optional per-decode delay or failure."""

    def __init__(self, logits_at, block_size=64, delay=0.0, fail_decode=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the engine a dtype and device
        self.config = GPTConfig(block_size=block_size, vocab_size=V, n_layer=1, n_head=1, n_embd=8)
        self.logits_at, self.delay, self.fail_decode = logits_at, delay, fail_decode

    def allocate_kv_cache(self, n_slots, max_len, dtype=None, device=None):
        return None

    def prefill(self, tokens, cache, slot, start_pos):
        return self.logits_at(start_pos + len(tokens) - 1).clone()

    def decode(self, tokens, cache, slots, positions, window=None, slot_range=None):
        time.sleep(self.delay)
        if self.fail_decode:
            raise RuntimeError("simulated device failure")
        return torch.stack([self.logits_at(int(p)) for p in positions])


def one_hot(token: int) -> torch.Tensor:
    logits = torch.zeros(V)
    logits[token] = 10.0
    return logits


def scripted(script: list[int], prompt_len: int, **kwargs) -> FakeModel:
    """Emits script[0], script[1], ... after a prompt of prompt_len tokens, then EOT."""
    def logits_at(position):
        k = position - (prompt_len - 1)
        return one_hot(script[k] if 0 <= k < len(script) else EOT_ID)
    return FakeModel(logits_at, **kwargs)


def reference_greedy(model, prompt: list[int], max_tokens: int, stop_ids) -> list[int]:
    """Greedy decoding by full forward passes over the whole sequence, no cache."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits, _ = model(torch.tensor([seq]))
            token = int(logits[0, -1, :N_VOCAB].argmax())
            out.append(token)
            if token in stop_ids:
                break
            seq.append(token)
    return out


def collect_stream(handle) -> list[StreamEvent]:
    async def consume():
        return [event async for event in handle.stream()]
    return asyncio.run(consume())


class Recorder(EngineObserver):
    def __init__(self):
        self.rejects, self.finishes, self.first_tokens, self.steps, self.submits = [], [], [], [], 0

    def on_submit(self):
        self.submits += 1

    def on_reject(self, reason):
        self.rejects.append(reason)

    def on_first_token(self, ttft_s, queue_s):
        self.first_tokens.append((ttft_s, queue_s))

    def on_finish(self, completion):
        self.finishes.append(completion.finish_reason)

    def on_step(self, batch_size, prefill_tokens, decode_tokens, step_s):
        self.steps.append((batch_size, prefill_tokens, decode_tokens, step_s))


SOURCE = '''import os
import sys
from collections import defaultdict


class Inventory:
    """Counts items by name; négatif counts are refused."""

    def __init__(self, path=None):
        self.counts = defaultdict(int)
        self.path = path or os.path.join(os.getcwd(), "inventory.txt")

    def add(self, name: str, n: int = 1) -> int:
        if n < 0:
            raise ValueError(f"cannot add {n} of {name!r}")
        self.counts[name] += n
        return self.counts[name]

    def save(self):
        with open(self.path, "w", encoding="utf-8") as f:
            for name, n in sorted(self.counts.items()):
                f.write(f"{name}\\t{n}\\n")


def main(argv):
    inventory = Inventory()
    for arg in argv[1:]:
        name, _, n = arg.partition("=")
        inventory.add(name, int(n or 1))
    inventory.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


def prompts_of_lengths(enc, lengths):
    text = enc.encode_ordinary(SOURCE)
    assert len(text) >= 7 * len(lengths) + max(lengths)
    return [text[i * 7 : i * 7 + n] for i, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- correctness


def test_greedy_matches_reference_without_cache(tiny, enc, vocab):
    prompts = prompts_of_lengths(enc, [1, 5, 17, 40, 90])
    results = run(tiny, enc, prompts, SamplingParams(max_tokens=12, **GREEDY), max_batch=4, prefill_chunk=512)
    for prompt, result in zip(prompts, results):
        expected = reference_greedy(tiny, prompt, 12, vocab.stop_ids)
        assert result.token_ids == expected
        assert result.text == enc.decode(expected) and result.prompt_tokens == len(prompt)
        assert result.finish_reason == ("stop" if expected[-1] in vocab.stop_ids else "length")


@pytest.mark.parametrize("heal", [False, True])
def test_greedy_is_batch_invariant_with_chunked_prefill(tiny, enc, heal):
    prompts = prompts_of_lengths(enc, [3, 9, 30, 61, 75, 100])
    prompts[1] = enc.encode_ordinary("def f(x):\n    ")  # a healed prompt when heal=True
    params = SamplingParams(max_tokens=10, temperature=0.0, heal=heal)
    alone = [run(tiny, enc, [p], params, max_batch=1, prefill_chunk=512)[0] for p in prompts]
    together = run(tiny, enc, prompts, params, max_batch=8, prefill_chunk=7)  # prompts split over steps
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]


def test_seeded_sampling_reproducible_across_batch_compositions(tiny, enc):
    prompts = prompts_of_lengths(enc, [4, 20, 50])
    seeded = [SamplingParams(max_tokens=12, temperature=0.9, top_k=0, seed=7, heal=False),
              SamplingParams(max_tokens=12, temperature=1.2, top_k=40, top_p=0.9, seed=8, heal=False)]
    alone = [run(tiny, enc, [prompts[i]], seeded[i])[0].token_ids for i in range(2)]
    mixed_params = [seeded[0], seeded[1], SamplingParams(max_tokens=15, temperature=1.0)]  # + an unseeded row
    together = run(tiny, enc, prompts, mixed_params, max_batch=3, prefill_chunk=16)
    assert [together[0].token_ids, together[1].token_ids] == alone
    other_seed = run(tiny, enc, [prompts[0]], SamplingParams(max_tokens=12, temperature=0.9, seed=99, heal=False))
    assert other_seed[0].token_ids != alone[0]


def test_top_k_and_top_p_restrict_candidates(enc):
    base = torch.full((V,), -100.0)
    base[[100, 101, 102, 103]] = torch.tensor([3.0, 2.95, 2.9, 2.85])
    model = FakeModel(lambda pos: base.clone(), block_size=128)
    prompt = [5, 6]
    top_k = run(model, enc, [prompt], SamplingParams(max_tokens=60, top_k=3, seed=1, heal=False))[0]
    assert set(top_k.token_ids) <= {100, 101, 102} and len(set(top_k.token_ids)) > 1
    top_p = run(model, enc, [prompt], SamplingParams(max_tokens=60, top_p=0.4, seed=1, heal=False))[0]
    assert set(top_p.token_ids) == {100, 101}
    top_k1 = run(model, enc, [prompt], SamplingParams(max_tokens=20, top_k=1, seed=1, heal=False))[0]
    assert set(top_k1.token_ids) == {100}


def test_padded_vocabulary_rows_are_never_sampled(enc):
    logits = torch.zeros(V)
    logits[N_VOCAB + 5], logits[87] = 20.0, 10.0  # a padding row the tokenizer cannot decode
    model = FakeModel(lambda pos: logits.clone())
    for params in (SamplingParams(max_tokens=5, **GREEDY), SamplingParams(max_tokens=5, temperature=0.1, seed=0, heal=False)):
        result = run(model, enc, [[1, 2]], params)[0]
        assert result.token_ids == [87] * 5 and result.text == "xxxxx"


def test_prefill_is_bounded_per_step_and_decoding_continues(tiny, enc):
    recorder = Recorder()
    prompts = prompts_of_lengths(enc, [4, 45, 30])
    results = run(tiny, enc, prompts, SamplingParams(max_tokens=20, **GREEDY), observer=recorder,
                  max_batch=4, prefill_chunk=8)
    assert all(prefill <= 8 for _, prefill, _, _ in recorder.steps)
    assert sum(prefill for _, prefill, _, _ in recorder.steps) == 4 + 45 + 30
    # the short request decodes in the steps that prefill the long ones
    assert any(prefill and decode for _, prefill, decode, _ in recorder.steps)
    assert [r.completion_tokens for r in results] == [20] * 3


# ----------------------------------------------------------------------------- finishing


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(enc):
    # "a = 1" "\n" "\n" "def" ... : the stop "\n\ndef" arrives over three tokens
    script = enc.encode_ordinary("a = 1") + [198, 198] + enc.encode_ordinary("def g(): pass")
    prompt = [1, 2, 3]
    engine = make_engine(scripted(script, len(prompt)), enc)
    handle = engine.submit(prompt, SamplingParams(max_tokens=30, stop=("\n\ndef", "never"), **GREEDY))
    events = collect_stream(handle)
    result = handle.result(5)
    engine.shutdown()
    assert result.text == "a = 1" and result.finish_reason == "stop"
    assert "".join(e.text for e in events) == "a = 1"
    assert all("\n" not in e.text for e in events)  # the held "\n" never leaked
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(result.token_ids)


def test_held_stop_prefix_is_released_and_flushed(enc):
    script = enc.encode_ordinary("x\ny\n")
    engine = make_engine(scripted(script, 2), enc)
    handle = engine.submit([1, 2], SamplingParams(max_tokens=len(script), stop=("\n\n",), **GREEDY))
    events = collect_stream(handle)
    engine.shutdown()
    assert "".join(e.text for e in events) == "x\ny\n" == handle.result().text  # trailing "\n" flushed
    assert handle.result().finish_reason == "length"


def test_earliest_stop_wins():
    detok = Detokenizer([b"ab", b"cd"], stop=("cd", "bc"))  # both complete with "cd"; "bc" starts first
    assert detok.add(0) == "a" and detok.add(1) == "" and detok.stopped and detok.flush() == ""


@pytest.mark.parametrize("end_token", [EOT_ID, FIM_MIDDLE_ID])
def test_special_tokens_end_generation(enc, end_token):
    script = enc.encode_ordinary("return x") + [end_token] + enc.encode_ordinary(" junk")
    result = run(scripted(script, 3), enc, [[1, 2, 3]], SamplingParams(max_tokens=20, **GREEDY))[0]
    assert result.text == "return x" and result.finish_reason == "stop"
    assert result.token_ids[-1] == end_token
    assert result.completion_tokens == len(enc.encode_ordinary("return x")) + 1


def test_max_tokens_and_context_cap_finish_with_length(tiny, enc):
    prompt = prompts_of_lengths(enc, [30])[0]
    short = run(tiny, enc, [prompt], SamplingParams(max_tokens=3, **GREEDY))[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3
    capped = run(tiny, enc, [prompt], SamplingParams(max_tokens=500, **GREEDY), max_context=34)[0]
    assert capped.finish_reason == "length" and capped.completion_tokens == 4  # 30 + 4 = max_context
    zero = run(tiny, enc, [prompt], SamplingParams(max_tokens=0, **GREEDY))[0]
    assert zero.finish_reason == "length" and zero.completion_tokens == 0 and zero.text == ""


def test_submit_rejects_bad_requests(tiny, enc):
    engine = Engine(tiny, EngineConfig(max_context=32), enc=enc)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="max_context"):
        engine.submit(list(range(32)), SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, V - 1], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], SamplingParams(temperature=-1))
    engine.submit(list(range(31)), SamplingParams())  # max_context - 1 fits
    engine.shutdown()


# ----------------------------------------------------------------------------- detokenization


def test_detokenizer_never_splits_utf8(enc, vocab):
    text = "é€😀"
    byte_tokens = [enc.encode_single_token(bytes([b])) for b in text.encode()]
    for ids in (byte_tokens, enc.encode_ordinary(text)):
        detok = Detokenizer(vocab.token_bytes)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["é", "€", ""]  # the emoji's first token is held until its last byte


def test_engine_streams_multibyte_characters_whole(enc):
    text = "é€😀 ok"
    script = [enc.encode_single_token(bytes([b])) for b in text.encode()]
    engine = make_engine(scripted(script, 2), enc)
    handle = engine.submit([1, 2], SamplingParams(max_tokens=len(script), **GREEDY))
    events = collect_stream(handle)
    engine.shutdown()
    assert "".join(e.text for e in events) == text == handle.result().text
    assert all("\ufffd" not in e.text for e in events)


# ----------------------------------------------------------------------------- token healing


def test_healing_constraint_set_matches_a_vocabulary_scan(enc, vocab):
    healer = TokenHealer(vocab, "cpu")
    prompt = enc.encode_ordinary("def f(x):\n    ")
    assert healer.backoff(prompt) == b"    "
    allowed = set(healer.allowed_ids(b"    ").tolist())
    scan = {i for i in vocab.ordinary_ids
            if vocab.token_bytes[i].startswith(b"    ") or b"    ".startswith(vocab.token_bytes[i])}
    assert allowed == scan
    assert all(vocab.token_bytes[i].startswith(b"    ") for i in allowed if i not in (220, 50257, 50258))
    assert {50258, 50259, 50260} <= allowed and 611 not in allowed  # '   ' yes, ' if' no
    for remaining in (b" re", b"turn", b"\xf0\x9f", b"\n"):
        assert set(healer.allowed_ids(remaining).tolist()) == {
            i for i in vocab.ordinary_ids
            if vocab.token_bytes[i].startswith(remaining) or remaining.startswith(vocab.token_bytes[i])}
    assert healer.advance(b"    ", 50258) == b" " and healer.advance(b" ", 611) == b""
    assert healer.backoff(fim_ids([1, 2], [3], "psm")) == b""  # ends in a FIM marker
    assert healer.backoff([50259]) == b""  # the prompt's only token


def test_healing_continues_indentation_instead_of_adding_a_space(enc):
    # A model that would rather say ' if' (a fifth space) than '   ' + ' if'.
    preference = torch.zeros(V)
    preference[611], preference[50258] = 10.0, 9.0  # ' if', '   '
    model = FakeModel(lambda pos: preference.clone())
    prompt_text = "def f(x):\n    "
    prompt = enc.encode_ordinary(prompt_text)
    healed, plain = (run(model, enc, [prompt], SamplingParams(max_tokens=2, temperature=0, heal=h))[0]
                     for h in (True, False))
    assert healed.token_ids == [50258, 611] and healed.text == "if"
    assert prompt_text + healed.text == "def f(x):\n    if"
    assert plain.text.startswith(" if")  # without healing: five spaces


def test_healed_output_reconstructs_prompt_plus_text(tiny, enc, vocab):
    healer = TokenHealer(vocab, "cpu")
    texts = ["def f(x):\n    ", "import o", "for i in ra", "x = 1\n"]
    prompts = [enc.encode_ordinary(t) for t in texts]
    assert all(healer.backoff(p) for p in prompts)
    results = run(tiny, enc, prompts, SamplingParams(max_tokens=8, temperature=0.0))
    for text, prompt, result in zip(texts, prompts, results):
        generated = [t for t in result.token_ids if t not in vocab.stop_ids]
        assert enc.decode(prompt[:-1] + generated) == text + result.text
        first = vocab.token_bytes[generated[0]]
        assert first.startswith(healer.backoff(prompt)) or healer.backoff(prompt).startswith(first)


# ----------------------------------------------------------------------------- lifecycle


def slow_model(delay=0.01, block_size=128):
    return FakeModel(lambda pos: one_hot(87), block_size=block_size, delay=delay)


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_cancellation_frees_the_slot(enc):
    recorder = Recorder()
    engine = make_engine(slow_model(), enc, recorder, max_batch=1)
    hog = engine.submit([1, 2], SamplingParams(max_tokens=120, **GREEDY))
    queued = engine.submit([3, 4], SamplingParams(max_tokens=3, **GREEDY))
    wait_until(lambda: engine.num_running == 1 and engine.num_waiting == 1)
    time.sleep(0.05)
    hog.cancel()
    hog.cancel()  # idempotent
    assert hog.result(5).finish_reason == "abort" and hog.result().completion_tokens < 120
    assert queued.result(5).finish_reason == "length" and queued.result().text == "xxx"
    wait_until(lambda: engine.num_running == 0)
    assert sorted(recorder.finishes) == ["abort", "length"] and recorder.submits == 2
    assert len(recorder.first_tokens) == 2 and all(ttft >= queue >= 0 for ttft, queue in recorder.first_tokens)
    assert recorder.steps and all(0 < b and d <= b and s >= 0 for b, _, d, s in recorder.steps)
    assert sum(p for _, p, _, _ in recorder.steps) == 4  # two 2-token prompts
    engine.shutdown()


def test_abandoned_stream_cancels_the_request(enc):
    engine = make_engine(slow_model(), enc)
    handle = engine.submit([1, 2], SamplingParams(max_tokens=120, **GREEDY))

    async def first_event():
        async for event in handle.stream():
            return event
    assert asyncio.run(first_event()).text == "x"
    assert handle.result(5).finish_reason == "abort"
    engine.shutdown()


def test_async_stream_yields_the_same_text_as_result(tiny, enc):
    engine = make_engine(tiny, enc, max_batch=4)
    prompts = prompts_of_lengths(enc, [10, 25])
    handles = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in prompts]

    async def consume_all():
        async def text(h):
            return [e async for e in h.stream()]
        return await asyncio.gather(*(text(h) for h in handles))
    streams = asyncio.run(consume_all())
    for events, handle in zip(streams, handles):
        result = handle.result(5)
        assert "".join(e.text for e in events) == result.text
        assert [e.finish_reason for e in events][-1] == result.finish_reason
        assert all(e.finish_reason is None for e in events[:-1])
        assert events[-1].prompt_tokens == result.prompt_tokens
    engine.shutdown()


def test_stream_delivers_events_while_generating(enc):
    engine = make_engine(slow_model(0.02), enc)
    handle = engine.submit([1, 2], SamplingParams(max_tokens=15, **GREEDY))

    async def consume():
        seen = []
        async for event in handle.stream():
            seen.append((event, handle.done))
        return seen
    seen = asyncio.run(consume())
    engine.shutdown()
    assert not seen[0][1]  # the first piece arrived long before the request finished
    assert "".join(e.text for e, _ in seen) == "x" * 15 == handle.result().text
    assert len(seen) >= 10 and seen[-1][0].finish_reason == "length"


def test_queue_full_is_raised_and_reported(tiny, enc):
    recorder = Recorder()
    engine = Engine(tiny, EngineConfig(max_waiting=2), enc=enc, observer=recorder)  # not started: nothing leaves
    handles = [engine.submit([1, 2], SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.submit([1, 2], SamplingParams(max_tokens=2))
    assert engine.num_waiting == 2 and recorder.rejects == ["queue_full"]
    engine.shutdown()  # fails what is left rather than leaving callers hanging
    assert [h.result(1).error for h in handles] == ["engine_stopped"] * 2


def test_generate_respects_the_queue_bound(tiny, enc):
    prompts = prompts_of_lengths(enc, [5, 6, 7, 8, 9, 10, 11])
    results = run(tiny, enc, prompts, SamplingParams(max_tokens=2, **GREEDY), max_batch=2, max_waiting=1)
    assert [r.finish_reason for r in results] == ["length"] * 7


def test_queue_timeout(enc):
    recorder = Recorder()
    engine = make_engine(slow_model(), enc, recorder, max_batch=1, max_queue_wait_s=0.1)
    hog = engine.submit([1, 2], SamplingParams(max_tokens=60, **GREEDY))
    late = engine.submit([1, 2], SamplingParams(max_tokens=2, **GREEDY))
    result = late.result(5)
    assert (result.finish_reason, result.error, result.completion_tokens) == ("error", "queue_timeout", 0)
    assert "queue_timeout" in recorder.rejects
    assert hog.result(5).finish_reason == "length"
    engine.shutdown()


def test_drain_finishes_work_and_refuses_new(enc):
    recorder = Recorder()
    engine = make_engine(slow_model(0.002), enc, recorder, max_batch=2)
    handles = [engine.submit([1, 2], SamplingParams(max_tokens=10, **GREEDY)) for _ in range(4)]
    engine.drain()
    with pytest.raises(EngineDraining):
        engine.submit([1, 2], SamplingParams())
    assert engine.wait_idle(10)
    assert [h.result(0).finish_reason for h in handles] == ["length"] * 4
    assert recorder.rejects == ["draining"] and engine.alive
    engine.shutdown()
    assert not engine.alive


def test_engine_failure_fails_every_request(enc):
    engine = make_engine(FakeModel(lambda pos: one_hot(87), fail_decode=True), enc, max_batch=1)
    handles = [engine.submit([1, 2], SamplingParams(max_tokens=5, **GREEDY)) for _ in range(3)]
    results = [h.result(5) for h in handles]
    assert [(r.finish_reason, r.error) for r in results] == [("error", "engine_failed")] * 3
    wait_until(lambda: not engine.alive)
    with pytest.raises(EngineFailed):
        engine.submit([1, 2], SamplingParams())
    assert engine.wait_idle(1)


def test_heartbeat_advances_while_idle(tiny, enc):
    engine = Engine(tiny, EngineConfig(), enc=enc)
    assert not engine.alive and engine.seconds_since_heartbeat == float("inf")
    engine.start()
    time.sleep(0.7)
    assert engine.alive and engine.seconds_since_heartbeat < 0.5
    engine.shutdown()
    assert not engine.alive


def test_prefix_reuse_gives_the_same_output(tiny, enc):
    base = prompts_of_lengths(enc, [60])[0]
    params = SamplingParams(max_tokens=8, **GREEDY)
    engine = make_engine(tiny, enc, max_batch=2)
    first = engine.generate([base], params)[0]
    longer = engine.generate([base + [13, 14, 15]], params)[0]
    again = engine.generate([base], params)[0]
    engine.shutdown()
    assert first.cached_tokens == 0 and longer.cached_tokens == 60
    assert again.cached_tokens == 59 and again.token_ids == first.token_ids  # one token is always fed
    assert longer.token_ids == run(tiny, enc, [base + [13, 14, 15]], params, prefix_cache=False)[0].token_ids


def test_engine_thread_is_not_the_callers(tiny, enc):
    seen = []

    class ThreadObserver(EngineObserver):
        def on_step(self, *args):
            seen.append(threading.current_thread().name)
    run(tiny, enc, [[1, 2, 3]], SamplingParams(max_tokens=2), observer=ThreadObserver())
    assert seen and set(seen) == {"engine-loop"}


# ----------------------------------------------------------------------------- prompts


def test_plain_prompt_never_yields_special_tokens(enc):
    ids = build_prompt_ids(enc, "x = 1 <|endoftext|>", None, 100)
    assert ids == enc.encode_ordinary("x = 1 <|endoftext|>") and EOT_ID not in ids
    with pytest.raises(ValueError, match="empty"):
        build_prompt_ids(enc, "", None, 100)


@pytest.mark.parametrize("template", ["<fim_prefix>{p}<fim_suffix>{s}<fim_middle>",
                                      "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>",
                                      "<fim_prefix><fim_suffix>{s}<fim_middle>{p}"])
@pytest.mark.parametrize("layout", ["spm", "psm"])
def test_textual_fim_markers_become_fim_tokens(enc, template, layout):
    pre, suf = "def f(x):\n    return ", "\n\nprint(f(2))\n"
    ids = build_prompt_ids(enc, template.format(p=pre, s=suf), None, 100, fim_layout=layout)
    assert ids == fim_ids(enc.encode_ordinary(pre), enc.encode_ordinary(suf), layout)
    assert split_fim_prompt(template.format(p=pre, s=suf)) == (pre, suf)


def test_suffix_argument_builds_a_fim_prompt(enc):
    ids = build_prompt_ids(enc, "a = ", "\nb = 2", 100, fim_layout="psm")
    assert ids == fim_ids(enc.encode_ordinary("a = "), enc.encode_ordinary("\nb = 2"), "psm")
    assert split_fim_prompt("no markers here") is None


def test_truncation_keeps_the_text_nearest_the_cursor(enc):
    # Cuts move in steps of truncation_step(budget) tokens (3 for 50, 6 for 100, 4 for 75),
    # so that the start of the prompt stays put while the user types (prefix caching).
    words = " ".join(f"w{i}" for i in range(300))
    pre, suf = enc.encode_ordinary(words), enc.encode_ordinary(words)
    plain = build_prompt_ids(enc, words, None, 50)
    assert 50 - 3 < len(plain) <= 50 and plain == pre[-len(plain):] and (len(pre) - len(plain)) % 3 == 0
    ids = build_prompt_ids(enc, words, words, 103, fim_layout="psm")  # both long: suffix gets 1/4
    kept = len(ids) - 3 - 25
    assert ids == fim_ids(pre[-kept:], suf[:25], "psm") and 75 - 4 < kept <= 75
    ids = build_prompt_ids(enc, "x = 1\n", words, 103, fim_layout="psm")  # short prefix: suffix gets the rest
    short = enc.encode_ordinary("x = 1\n")
    assert ids == fim_ids(short, suf[: (100 - len(short)) // 6 * 6], "psm")
    with pytest.raises(ValueError):
        build_prompt_ids(enc, "a", "b", 3)


@pytest.mark.parametrize("layout", ["spm", "psm"])
def test_truncated_prompts_keep_their_start_while_the_user_types(enc, layout):
    """Consecutive keystrokes give prompts that begin alike: the cut moves once per step."""
    text = " ".join(f"w{i}" for i in range(400))
    suffix = " ".join(f"s{i}" for i in range(100))
    starts = set()
    for typed in range(0, 60, 3):
        ids = build_prompt_ids(enc, text[: 1500 + typed], suffix, 200, fim_layout=layout)
        assert len(ids) <= 200
        starts.add(tuple(ids[:120]))
    assert len(starts) <= 3  # about 20 tokens typed, steps of 9-12 tokens


def test_outbox_hands_a_steps_events_to_each_loop_in_order_and_only_on_flush():
    from engine import EventOutbox
    outbox = EventOutbox()

    async def scenario():
        loop = asyncio.get_running_loop()
        first, second = asyncio.Queue(), asyncio.Queue()
        outbox.put(loop, first, StreamEvent("a"))
        outbox.put(loop, second, StreamEvent("b"))
        outbox.put(loop, first, StreamEvent("c", "stop"))
        await asyncio.sleep(0.05)
        assert first.empty() and second.empty()  # nothing moves before the step's flush
        threading.Thread(target=outbox.flush).start()  # the engine thread's side
        got = [await asyncio.wait_for(first.get(), 5), await asyncio.wait_for(first.get(), 5),
               await asyncio.wait_for(second.get(), 5)]
        return [(e.text, e.finish_reason) for e in got]

    assert asyncio.run(scenario()) == [("a", None), ("c", "stop"), ("b", None)]
    outbox.flush()  # nothing pending: no error


def test_stream_joins_queued_pieces_but_never_merges_text_into_a_failure():
    from engine import EventOutbox, RequestHandle
    outbox = EventOutbox()
    handle = RequestHandle("r1", lambda: None, outbox)

    async def consume():
        stream = handle.stream()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # subscribed: pushes now go through the outbox
        for event in (StreamEvent("a"), StreamEvent("b"), StreamEvent("", "error", error="engine_failed")):
            handle.deliver(event)
        outbox.flush()
        events = [await asyncio.wait_for(first, 5)]
        events += [e async for e in stream]
        return [(e.text, e.finish_reason) for e in events]

    assert asyncio.run(consume()) == [("ab", None), ("", "error")]


def test_first_argmax_equals_argmax_including_ties_and_masked_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 50304)
    logits[1, [300, 7000]] = 50.0  # a tie across blocks: the first wins
    logits[2, [130, 131]] = 50.0  # a tie inside a block
    logits[3] = float("-inf")  # everything masked
    logits[4, :200] = float("-inf")
    assert torch.equal(first_argmax(logits), logits.argmax(dim=-1))
    odd = torch.randn(3, 1000)  # not a multiple of the block: plain argmax
    assert torch.equal(first_argmax(odd), odd.argmax(dim=-1))
