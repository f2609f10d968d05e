"""Automatic prefix caching (prefix_cache.py and its use in engine.py and serve_api.py):
chain-hash lookup, collision safety, LRU eviction of leaves, bit-exact KV copies, only the
new tokens prefilled, greedy output identical with and without the cache (whatever the batch
and however small the pool), the on/off switch and the Prometheus series."""
from __future__ import annotations

import json
import random
import re
import sysconfig

import httpx
import pytest
import torch

import bench_serve
import prefix_cache
import serve_api
from engine import Engine, EngineConfig, EngineObserver, SamplingParams
from model import GPT, GPTConfig
from prefix_cache import BlockIndex, PrefixCache
from serve_helpers import thread_server, write_tiny_checkpoint
from tokenizer import load_tokenizer

GREEDY = dict(temperature=0.0, heal=False)
BT = 16  # the engine's default block size, used by the engine tests below


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 20000) for _ in range(n)]


class Counting(EngineObserver):
    """Prefill tokens computed and (query, hit) of every lookup, from the engine thread."""

    def __init__(self):
        self.prefilled, self.lookups, self.evicted = 0, [], 0

    def on_step(self, batch_size, prefill_tokens, decode_tokens, step_s):
        self.prefilled += prefill_tokens

    def on_prefix_lookup(self, query_tokens, hit_tokens):
        self.lookups.append((query_tokens, hit_tokens))

    def on_prefix_evict(self, blocks):
        self.evicted += blocks


def engine_for(model, enc, observer=None, **config) -> Engine:
    return Engine(model, EngineConfig(**config), enc=enc, observer=observer).start()


def generate(model, enc, prompts, params, observer=None, **config):
    engine = engine_for(model, enc, observer, **config)
    try:
        return engine.generate(prompts, params), engine.prefix_cache_stats
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- the block index


def stored(index: BlockIndex, ids: list[int]) -> list:
    chain = index.match(ids)
    new = index.extend(chain, ids)
    index.touch(chain + new)
    return chain + new


def test_lookup_finds_the_longest_cached_chain_of_whole_blocks():
    index = BlockIndex(capacity=16, block_tokens=4)
    ids = list(range(100, 111))  # 2 full blocks + 3 tokens
    assert len(stored(index, ids)) == 2 and index.used == 2
    assert len(index.match(ids)) == 2
    assert len(index.match(ids[:8] + [1, 2, 3, 4])) == 2  # a longer prompt with the same start
    assert len(index.match(ids[:6] + [1, 2, 3, 4])) == 1  # differs inside block 2
    assert index.match([7] + ids[1:]) == []  # differs in the first token
    assert len(stored(index, ids)) == 2 and index.used == 2  # storing again adds nothing


def test_same_block_tokens_after_a_different_prefix_is_a_miss():
    index = BlockIndex(capacity=16, block_tokens=4)
    stored(index, [1, 2, 3, 4, 5, 6, 7, 8])
    assert index.match([9, 9, 9, 9, 5, 6, 7, 8]) == []
    chain = stored(index, [9, 9, 9, 9, 5, 6, 7, 8])
    assert len(chain) == 2 and index.used == 4  # its own [5, 6, 7, 8] block, under its own parent
    assert chain[1].key != index.match([1, 2, 3, 4, 5, 6, 7, 8])[1].key


def test_a_hash_collision_is_a_miss_never_wrong_blocks(monkeypatch):
    monkeypatch.setattr(prefix_cache, "chain_hash", lambda parent_key, piece: 42)  # every block collides
    index = BlockIndex(capacity=16, block_tokens=4)
    assert len(stored(index, [1, 2, 3, 4, 5, 6, 7, 8])) == 1  # block 2's key is taken: not indexed
    assert index.match([5, 6, 7, 8]) == []  # same key, other tokens: the tokens decide
    assert len(index.match([1, 2, 3, 4, 1, 2, 3, 4])) == 1  # same key and tokens, but not under block 1
    assert len(index.match([1, 2, 3, 4, 9, 9, 9, 9])) == 1


def test_eviction_is_least_recently_used_and_counted():
    index = BlockIndex(capacity=4, block_tokens=2)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    stored(index, a)
    stored(index, b)
    index.touch(index.match(a))  # a is used again: b is now the least recent
    stored(index, c)
    assert len(index.match(a)) == 2 and index.match(b) == [] and len(index.match(c)) == 2
    assert index.evictions == 2 and index.used == 4


def test_eviction_takes_leaves_first_so_a_chain_keeps_its_start():
    index = BlockIndex(capacity=3, block_tokens=2)
    long = [1, 2, 3, 4, 5, 6]
    stored(index, long)
    stored(index, [7, 8])  # one block of room needed: the deepest block of `long` goes
    assert len(index.match(long)) == 2 and len(index.match([7, 8])) == 1


def test_pinned_blocks_are_never_evicted():
    index = BlockIndex(capacity=2, block_tokens=2)
    held = stored(index, [1, 2, 3, 4])
    index.pin(held)
    assert stored(index, [5, 6]) == [] and index.evictions == 0  # no room: nothing stored
    index.unpin(held)
    assert len(stored(index, [5, 6])) == 1 and len(index.match([1, 2, 3, 4])) == 1


def test_a_block_with_cached_children_is_never_evicted():
    index = BlockIndex(capacity=3, block_tokens=2)
    first, second = stored(index, [1, 2, 3, 4])
    stored(index, [5, 6])
    index.pin([second])  # the least recent leaf is busy; its parent is next in LRU order
    stored(index, [7, 8])  # so the room comes from the other leaf
    assert index.match([1, 2, 3, 4]) == [first, second] and index.match([5, 6]) == []


def test_a_store_never_evicts_the_chain_it_extends():
    index = BlockIndex(capacity=3, block_tokens=2)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    chain = stored(index, ids)  # 5 full blocks, room for 3: the first 3 are kept
    assert [b.tokens for b in chain] == [(1, 2), (3, 4), (5, 6)]
    assert index.match(ids) == chain and index.evictions == 0


# ----------------------------------------------------------------------------- KV copies


def prefill_slot(model, cache, slot, ids, chunk=None):
    with torch.inference_mode():
        chunk = chunk or len(ids)
        for start in range(0, len(ids), chunk):
            logits = model.prefill(torch.tensor(ids[start : start + chunk]), cache, slot, start)
    return logits


def test_restored_kv_is_bit_identical_and_a_suffix_prefill_matches_a_full_one(tiny):
    ids = tokens(1, 100)
    cache = tiny.allocate_kv_cache(3, 128)
    full_logits = prefill_slot(tiny, cache, 0, ids)
    pc = PrefixCache(cache, block_tokens=BT, n_blocks=32)
    with torch.inference_mode():
        pc.store(cache, 0, ids[:70])  # 4 blocks: positions 0..63
        assert pc.blocks_used == 4 and pc.bytes_used == 4 * pc.bytes_per_block
        assert pc.restore(cache, 1, ids) == 64
    assert torch.equal(cache.k[:, 1, :, :64], cache.k[:, 0, :, :64])
    assert torch.equal(cache.v[:, 1, :, :64], cache.v[:, 0, :, :64])
    with torch.inference_mode():
        suffix_logits = tiny.prefill(torch.tensor(ids[64:]), cache, 1, 64)
    torch.testing.assert_close(suffix_logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, 1, :, :100], cache.k[:, 0, :, :100], rtol=1e-5, atol=1e-5)
    assert suffix_logits.argmax() == full_logits.argmax()


def test_restore_always_leaves_one_token_to_feed_and_keeps_what_the_slot_holds(tiny):
    ids = tokens(2, 64)  # exactly 4 blocks
    cache = tiny.allocate_kv_cache(2, 128)
    prefill_slot(tiny, cache, 0, ids)
    pc = PrefixCache(cache, block_tokens=BT, n_blocks=8)
    with torch.inference_mode():
        pc.store(cache, 0, ids)
        assert pc.restore(cache, 1, ids) == 63  # all cached, but the last token's logits are needed
        assert pc.restore(cache, 1, ids + [5, 6], held=66) == 65  # the slot knows better than the pool
        assert pc.restore(cache, 1, [1] + ids) == 0


def test_cache_is_sized_by_memory():
    cache = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).allocate_kv_cache(1, 128)
    per_block = 2 * 2 * 2 * BT * 32 * 4  # k and v, layers, heads, tokens, head_dim, fp32
    pc = PrefixCache.sized(cache, BT, max_mib=1.0)
    assert pc.bytes_per_block == per_block and pc.capacity_blocks == (1 << 20) // per_block
    assert PrefixCache.sized(cache, BT, max_mib=0.0) is None
    assert PrefixCache.sized(cache, BT, max_mib=0.0, n_blocks=3).capacity_blocks == 3


# ----------------------------------------------------------------------------- the engine


def test_a_prompt_extending_a_cached_one_prefills_only_the_new_tokens(tiny, enc):
    counting = Counting()
    params = SamplingParams(max_tokens=4, **GREEDY)
    first, other = tokens(3, 70), tokens(4, 50)
    engine = engine_for(tiny, enc, counting, max_batch=1)  # one slot: `other` overwrites it
    try:
        engine.generate([first], params)
        engine.generate([other], params)
        before = counting.prefilled
        result = engine.generate([first + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]], params)[0]
    finally:
        engine.shutdown()
    assert counting.lookups == [(70, 0), (50, 0), (80, 64)]
    assert result.cached_tokens == 64 and counting.prefilled - before == 80 - 64


def test_the_users_previous_slot_gives_a_hit_to_the_token(tiny, enc):
    counting = Counting()
    params = SamplingParams(max_tokens=4, **GREEDY)
    base = tokens(5, 70)
    engine = engine_for(tiny, enc, counting, max_batch=2)
    try:
        engine.generate([base], params)
        engine.generate([base + [7, 8, 9]], params)
    finally:
        engine.shutdown()
    assert counting.lookups == [(70, 0), (73, 70)]  # the slot still held all 70, not just 4 blocks


def typing_prompts(n_users: int, steps: int) -> list[list[int]]:
    """What editors send: each user's prompt grows by a few tokens per request."""
    prompts = []
    for user in range(n_users):
        file = tokens(100 + user, 120)
        start = 40 + user * 5
        prompts += [file[: start + 3 * k] for k in range(steps)]
    return prompts


def test_greedy_output_is_identical_with_and_without_the_cache(tiny, enc):
    params = SamplingParams(max_tokens=10, **GREEDY)
    prompts = typing_prompts(4, 4) + [tokens(200, 90)] * 2  # and one prompt twice
    uncached, stats = generate(tiny, enc, prompts, params, prefix_cache=False, max_batch=1)
    assert stats["blocks_capacity"] == 0 and all(c.cached_tokens == 0 for c in uncached)
    want = [c.token_ids for c in uncached]
    # Cached, in different batch compositions: one at a time, 3 at once, 32 at once (the last
    # 4 of the second round find the first round's blocks), in any order.
    for max_batch in (1, 3, 32):
        counting = Counting()
        cached, _ = generate(tiny, enc, prompts + prompts, params, counting, max_batch=max_batch)
        assert [c.token_ids for c in cached] == want + want, f"max_batch {max_batch}"
        assert sum(hit for _, hit in counting.lookups) > 0
    shuffled = list(range(len(prompts)))
    random.Random(0).shuffle(shuffled)
    cached, _ = generate(tiny, enc, [prompts[i] for i in shuffled], params, max_batch=5)
    assert [c.token_ids for c in cached] == [want[i] for i in shuffled]


def test_eviction_under_memory_pressure_never_corrupts_a_running_request(tiny, enc):
    params = SamplingParams(max_tokens=12, **GREEDY)
    prompts = typing_prompts(6, 4)
    random.Random(1).shuffle(prompts)
    want = [c.token_ids for c in generate(tiny, enc, prompts, params, prefix_cache=False, max_batch=8)[0]]
    counting = Counting()
    # A pool of 5 blocks for 24 prompts of 3-5 blocks each, 8 of them running at once.
    engine = engine_for(tiny, enc, counting, max_batch=8, prefix_cache_blocks=5, prefill_chunk=48)
    try:
        handles = [engine.submit(p, params) for p in prompts + prompts]
        got = [h.result(60).token_ids for h in handles]
        stats = engine.prefix_cache_stats
    finally:
        engine.shutdown()
    assert got == want + want
    assert stats["blocks_used"] <= 5 and stats["evictions"] > 0 and counting.evicted == stats["evictions"]
    assert sum(hit for _, hit in counting.lookups) > 0


def test_switched_off_nothing_is_reused(tiny, enc):
    counting = Counting()
    params = SamplingParams(max_tokens=3, **GREEDY)
    base = tokens(6, 60)
    _, stats = generate(tiny, enc, [base, base + [1, 2], base], params, counting, prefix_cache=False, max_batch=1)
    assert counting.lookups == [(60, 0), (62, 0), (60, 0)] and counting.prefilled == 182
    assert stats == dict(blocks_used=0, blocks_capacity=0, bytes_used=0, bytes_capacity=0, evictions=0)


# ----------------------------------------------------------------------------- serve_api


def test_server_flags_and_environment_switch_the_cache():
    assert serve_api.parse_settings([], {}).prefix_cache is True
    assert serve_api.parse_settings(["--no-prefix-cache"], {}).prefix_cache is False
    assert serve_api.parse_settings([], {"PREFIX_CACHE": "0"}).prefix_cache is False
    assert serve_api.parse_settings(["--prefix-cache"], {"PREFIX_CACHE": "off"}).prefix_cache is True
    assert serve_api.parse_settings(["--prefix-cache-mb", "64"], {}).prefix_cache_mb == 64.0
    assert serve_api.parse_settings([], {}).fim_layout == "spm"  # the layout that keeps prompts reusable


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(codeassist_prefix\w*|codeassist_prefill\w*) (\S+)$",
                                                                text, re.M)}


def test_metrics_count_lookups_hits_and_cache_memory(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt", 128)
    prefix = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        data = f.read()\n" * 2
    body = {"model": serve_api.DEFAULT_MODEL_ID, "suffix": "\n\nprint(read_config('x'))\n", "max_tokens": 4,
            "temperature": 0}
    with thread_server(ckpt) as srv:
        before = scrape(srv.url)
        texts = []
        for typed in ("", "  ", "  # co"):
            r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": prefix + typed}, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        after = scrape(srv.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["codeassist_prefix_cache_queries_total"] == 3
    assert delta["codeassist_prefix_cache_hits_total"] == 2  # the 2nd and 3rd requests
    hit, query = delta["codeassist_prefix_cache_hit_tokens_total"], delta["codeassist_prefix_cache_query_tokens_total"]
    assert 0 < hit < query and delta["codeassist_prefill_tokens_total"] == query - hit
    assert after["codeassist_prefix_cache_blocks"] > 0 and after["codeassist_prefix_cache_capacity_blocks"] > 0
    assert after["codeassist_prefix_cache_bytes"] > 0 and "codeassist_prefix_cache_evictions_total" in after


# ----------------------------------------------------------------------------- bench_serve


def test_bench_editor_keeps_its_prompt_start_while_typing(tmp_path, enc):
    text = "".join(f"line_{i} = compute({i}, value)\n" for i in range(400))
    (tmp_path / "val_docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    files = bench_serve.load_held_out(str(tmp_path), enc)
    for step, most_starts in ((64, 2), (1, 25)):
        editor = bench_serve.Editor(files, random.Random(0), prefix_tokens=300, suffix_tokens=40, window_step=step)
        editor.jump = lambda: None  # stay in one place: the region ends at the file's end
        editor.doc, editor.cursor, editor.region_end = files[0], len(text) // 2, len(text)
        starts = set()
        for _ in range(30):
            editor.type(2)
            prefix, _ = editor.context()
            assert text[: editor.cursor].endswith(prefix) and len(enc.encode_ordinary(prefix)) <= 302
            starts.add(editor.cursor - len(prefix))
        assert len(starts) <= most_starts, (step, len(starts))


def test_bench_compares_prefix_cache_on_and_off(tmp_path, capsys):
    stdlib = sysconfig.get_paths()["stdlib"]
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "val_docs.jsonl", "w") as f:
        for name in ("textwrap.py", "shlex.py"):
            f.write(json.dumps({"text": open(f"{stdlib}/{name}", encoding="utf-8").read()}) + "\n")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt", 256)
    code = bench_serve.main(["--ckpt", ckpt, "--data-dir", str(data), "--workload", "typing", "--levels", "2",
                             "--duration", "3", "--max-tokens", "4", "--compare", "prefix-cache", "--no-progress",
                             "--server-arg=--log-level=warning", "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    report_name = next(p for p in (tmp_path / "out").iterdir() if p.suffix == ".json")
    report = json.loads(report_name.read_text())
    engine, baseline = report["servers"]["engine"], report["servers"]["baseline"]
    assert "--no-prefix-cache" in baseline["command"] and "--no-prefix-cache" not in engine["command"]
    assert "--max-batch" not in baseline["command"]  # the same server, only the cache differs
    on, off = engine["levels"][0]["prefix_cache"], baseline["levels"][0]["prefix_cache"]
    assert off["token_hit_rate"] == 0 and off["prefill_tokens_per_request"] == off["prompt_tokens_per_request"]
    assert on["token_hit_rate"] > 0.5 and on["prefill_tokens_per_request"] < off["prefill_tokens_per_request"] / 2
    (ratio,) = report["ratios"]
    assert ratio["prefill_tokens_x"] > 2 and ratio["p50_ratio"] is not None
    identity = report["greedy_identity"]
    assert identity["all_identical"] and identity["prompts"] == bench_serve.GREEDY_PROBES
    assert "engine vs baseline (no prefix cache)" in out and "greedy identity: 12 of 12" in out
