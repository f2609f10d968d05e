"""The CUDA-graph decode path's bookkeeping, checked on CPU: bucketing, padding rows, the
spare slot, and the automatic choice. The capture itself needs a GPU (make gpu-check)."""
import types

import pytest
import torch

from cuda_graphs import GATHER, IN_PLACE, DecodeGraphs, StepShape, batch_buckets, smallest_at_least, window_buckets
from engine import Engine, EngineConfig, SamplingParams


def test_batch_buckets_are_powers_of_two_capped_by_max_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_window_buckets_step_up_to_the_cache_length():
    assert window_buckets(320, 64) == [64, 128, 192, 256, 320]
    assert window_buckets(300, 64) == [64, 128, 192, 256, 300]
    assert window_buckets(16, 64) == [16]
    assert smallest_at_least(65, window_buckets(320, 64)) == 128
    assert smallest_at_least(64, window_buckets(320, 64)) == 64
    with pytest.raises(ValueError, match="exceeds"):
        smallest_at_least(321, window_buckets(320, 64))


def prefilled(model, prompts: dict[int, list[int]], n_slots: int, max_len: int):
    cache = model.allocate_kv_cache(n_slots, max_len, device="cpu")
    for slot, prompt in prompts.items():
        model.prefill(torch.tensor(prompt), cache, slot, 0)
    return cache


@pytest.mark.parametrize("in_place", [True, False])
def test_padded_bucketed_decode_equals_plain_decode_and_spares_other_slots(tiny, in_place):
    torch.manual_seed(1)
    prompts = {0: torch.randint(0, 500, (7,)).tolist(), 2: torch.randint(0, 500, (30,)).tolist(),
               4: torch.randint(0, 500, (70,)).tolist()}
    plain_cache = prefilled(tiny, prompts, 6, 128)
    graph_cache = prefilled(tiny, prompts, 6, 128)
    graph_cache.k[:, 1].fill_(7.0)  # a slot no row decodes: padding must not write to it
    graph_cache.v[:, 3].fill_(-7.0)
    graphs = DecodeGraphs(tiny, graph_cache, max_batch=5, window_step=32, capture=False, in_place=in_place)
    assert graphs.padding_slot == 5
    slots = [4, 0, 2]  # furthest position 70 -> window 96
    # In place: one row per slot 0..4 (slots 1 and 3 are padding rows); gather: 3 rows padded to 4.
    expected_shape = StepShape(IN_PLACE, 5, 96) if in_place else StepShape(GATHER, 4, 96)
    assert graphs.plan(slots, [len(prompts[s]) for s in slots]) == expected_shape
    tokens = [11, 22, 33]
    positions = [len(prompts[s]) for s in slots]
    expected = tiny.decode(torch.tensor(tokens), plain_cache, torch.tensor(slots), torch.tensor(positions))
    got = graphs.decode(tokens, slots, positions)
    assert got.shape == expected.shape == (3, tiny.config.vocab_size)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.all(graph_cache.k[:, 1] == 7.0) and torch.all(graph_cache.v[:, 3] == -7.0)
    for slot in slots:  # each live row's new K/V landed where plain decode put it
        position = len(prompts[slot])
        assert torch.allclose(graph_cache.k[:, slot, :, position], plain_cache.k[:, slot, :, position], atol=1e-6)


def test_a_full_bucket_needs_no_padding_and_continues_greedily(tiny):
    torch.manual_seed(2)
    prompts = {0: torch.randint(0, 500, (5,)).tolist(), 1: torch.randint(0, 500, (9,)).tolist()}
    plain_cache, graph_cache = prefilled(tiny, prompts, 3, 64), prefilled(tiny, prompts, 3, 64)
    graphs = DecodeGraphs(tiny, graph_cache, max_batch=2, window_step=16, capture=False)
    seqs = {s: list(p) for s, p in prompts.items()}
    for _ in range(12):  # crosses the window buckets 16 -> 32
        tokens, positions = [seqs[s][-1] for s in (0, 1)], [len(seqs[s]) - 1 for s in (0, 1)]
        expected = tiny.decode(torch.tensor(tokens), plain_cache, torch.tensor([0, 1]), torch.tensor(positions))
        got = graphs.decode(tokens, [0, 1], positions)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        for slot, token in zip((0, 1), got.argmax(-1).tolist()):
            seqs[slot].append(token)


def test_the_layout_follows_how_far_the_live_slots_spread():
    """In place while the slot span is at most twice the batch bucket; gather beyond."""
    model = types.SimpleNamespace()
    cache = types.SimpleNamespace(n_slots=129, max_len=320, k=torch.zeros(1))
    graphs = DecodeGraphs(model, cache, max_batch=128, window_step=64, capture=False)
    assert graphs.plan(list(range(100)), [5] * 100) == StepShape(IN_PLACE, 128, 64)
    assert graphs.plan([3, 5, 6], [200, 64, 7]) == StepShape(IN_PLACE, 8, 256)  # span 8 <= 2 * 4
    assert graphs.plan([3, 17], [200, 64]) == StepShape(GATHER, 2, 256)  # span 32 > 2 * 2
    assert graphs.plan([3, 90], [1, 2]) == StepShape(GATHER, 2, 64)
    assert graphs.plan([0, 1, 2, 3, 120], [1] * 5) == StepShape(GATHER, 8, 64)
    assert graphs.plan(list(range(40)) + [127], [1] * 41) == StepShape(IN_PLACE, 128, 64)
    shapes = graphs.shapes()
    assert len(shapes) == len(set(shapes)) == 8 * 5 + 6 * 5  # gather only below half of max_batch
    assert shapes[0] == StepShape(IN_PLACE, 128, 320)
    assert {s.rows for s in shapes if s.layout == GATHER} == {1, 2, 4, 8, 16, 32}


def test_any_sdpa_kernel_computes_the_same_step(tiny):
    """attention="any" only widens the kernels PyTorch may pick (cuDNN's, on a GPU)."""
    torch.manual_seed(4)
    prompts = {0: torch.randint(0, 500, (9,)).tolist(), 1: torch.randint(0, 500, (17,)).tolist()}
    caches = [prefilled(tiny, prompts, 3, 64) for _ in range(2)]
    steps = [DecodeGraphs(tiny, cache, max_batch=2, window_step=16, capture=False, attention=attention)
             for cache, attention in zip(caches, ("portable", "any"))]
    portable, any_kernel = (g.decode([5, 6], [0, 1], [9, 17]) for g in steps)
    assert torch.allclose(portable, any_kernel, atol=1e-6)
    with pytest.raises(ValueError, match="attention must be one of portable, any"):
        DecodeGraphs(tiny, caches[0], max_batch=2, capture=False, attention="fastest")
    with pytest.raises(ValueError, match="graph_attention must be one of"):
        Engine(tiny, EngineConfig(max_batch=2, graph_attention="fastest"))


def test_decode_graphs_refuse_what_they_cannot_do(tiny):
    cache = tiny.allocate_kv_cache(4, 32, device="cpu")
    with pytest.raises(ValueError, match="spare slot"):
        DecodeGraphs(tiny, cache, max_batch=4, capture=False)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(tiny, cache, max_batch=3, capture=True)
    graphs = DecodeGraphs(tiny, cache, max_batch=3, capture=False)
    with pytest.raises(ValueError, match="padding slot"):
        graphs.decode([1], [3], [0])
    with pytest.raises(ValueError, match="exceeds"):
        graphs.decode([1], [0], [32])
    with pytest.raises(ValueError, match="empty"):
        graphs.decode([], [], [])


def test_graphs_are_chosen_only_on_cuda(tiny):
    """On CPU the engine keeps its plain path (no spare slot, no graphs) whatever the switch."""
    engine = Engine(tiny, EngineConfig(max_batch=4, cuda_graphs=True))
    assert engine._runner.graphs is None and engine._runner.cache.n_slots == 4
    engine.start()
    try:
        [done] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0))
        assert len(done.token_ids) == 4
    finally:
        engine.shutdown()
