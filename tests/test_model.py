"""Tests for model.py: training loss, KV-cache inference, pretrained import, checkpoints."""

import os
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_module
from model import (CHECKPOINT_FORMAT, GPT, CheckpointError, GPTConfig, chunked_cross_entropy,
                   load_checkpoint, save_checkpoint, unwrapped_state_dict)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the OpenMP
    workers spin against other processes (steps measured 50x slower). Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = dict(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def last_logits(model: GPT, seq: list[int]) -> torch.Tensor:
    """Reference: a fresh full forward over the whole sequence, no cache."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([seq]))
    return logits[0, -1].float()


# ----------------------------------------------------------------------------- training


def test_forward_without_targets_returns_last_position_logits():
    model = tiny_model()
    idx = torch.randint(0, 512, (3, 10))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (3, 1, 512)
    # The last position's logits must depend on the earlier tokens (attention works) and
    # equal those of the same prefix run alone (causality: no look-ahead needed).
    shorter, _ = model(idx[:, :7])
    assert not torch.allclose(shorter, logits)
    assert torch.allclose(model(idx[:, :7])[0], shorter)


def test_forward_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("chunk_rows", [7, 1024])
def test_chunked_loss_and_gradients_match_full_cross_entropy(chunk_rows):
    torch.manual_seed(0)
    n, c, v = 50, 16, 300
    hidden = torch.randn(n, c, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, c)).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[::5] = -1  # ignored positions

    loss = chunked_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale the result
    grads = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-1)
    (2.5 * ref).backward()
    assert abs(loss.item() - ref.item()) < 1e-6
    assert (grads[0] - hidden.grad).abs().max() < 1e-6
    assert (grads[1] - weight.grad).abs().max() < 1e-6
    assert hidden.grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_chunked_loss_under_bf16_autocast_computes_in_bf16_and_returns_fp32_grads():
    torch.manual_seed(0)
    n, c, v = 40, 16, 300
    hidden = torch.randn(n, c).requires_grad_()
    weight = (0.3 * torch.randn(v, c)).requires_grad_()
    targets = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    # The reference: the same matmul in bf16 (what autocast does to a Linear), CE in fp32.
    h_ref, w_ref = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h_ref.bfloat16() @ w_ref.bfloat16().t()).float(), targets)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    fp32 = F.cross_entropy(hidden.detach() @ weight.detach().t(), targets)
    assert abs(loss.item() - fp32.item()) > 1e-4  # so it really ran in bf16 (here 5e-4 apart)
    assert (hidden.grad - h_ref.grad).abs().max() < 2e-3
    assert (weight.grad - w_ref.grad).abs().max() < 2e-3


def test_chunked_loss_without_grad_matches_and_model_loss_matches_reference():
    model = tiny_model()
    idx = torch.randint(0, 512, (2, 20))
    targets = torch.randint(0, 512, (2, 20))
    targets[0, :4] = -1
    with torch.no_grad():
        _, loss = model(idx, targets)
        hidden = model._hidden_states(idx, torch.arange(20))
        ref = F.cross_entropy(model.lm_head(hidden).view(-1, 512), targets.view(-1), ignore_index=-1)
    assert abs(loss.item() - ref.item()) < 1e-5


def test_model_gradients_match_full_cross_entropy():
    model = tiny_model()
    idx = torch.randint(0, 512, (2, 12))
    targets = torch.randint(0, 512, (2, 12))
    targets[1, -3:] = -1
    _, loss = model(idx, targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model._hidden_states(idx, torch.arange(12))
    F.cross_entropy(model.lm_head(hidden).view(-1, 512), targets.view(-1), ignore_index=-1).backward()
    for name, p in model.named_parameters():
        assert (ours[name] - p.grad).abs().max() < 1e-6, name


def test_loss_falls_when_overfitting_one_batch():
    model = tiny_model().train()
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(25):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 6.0  # ~ln(512) at init
    assert losses[-1] < 0.5 * losses[0]


def test_configure_optimizers_decays_only_matrices():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_in_groups = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_in_groups == model.num_params(non_embedding=False)  # tied matrix counted once
    assert not opt.defaults.get("fused")
    # torch's fused AdamW also accepts CPU tensors, so the CUDA choice is checkable here.
    assert model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda").defaults["fused"]


def test_num_params_and_mfu():
    model = tiny_model()
    cfg = model.config
    assert model.num_params(non_embedding=False) - model.num_params() == cfg.block_size * cfg.n_embd
    # Count by hand: tied embedding, position table, per block 12*C^2 weights + 13*C biases/gains, ln_f.
    C = cfg.n_embd
    expected = cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(non_embedding=False) == expected
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * C * cfg.block_size
    assert model.estimate_mfu(1000, 2.0, 1e9) == pytest.approx(flops_per_token * 1000 / 2.0 / 1e9)


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "n_layer": 8, "n_embd": 128}))
    c_proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    c_fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert c_fc_std == pytest.approx(0.02, rel=0.05)
    assert c_proj_std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert model.lm_head.weight is model.transformer.wte.weight


# ----------------------------------------------------------------------------- KV-cache inference


def test_prefill_logits_equal_forward_logits():
    model = tiny_model()
    cache = model.allocate_kv_cache(n_slots=2, max_len=32, dtype=torch.float32, device="cpu")
    seq = torch.randint(0, 512, (11,)).tolist()
    logits = model.prefill(torch.tensor(seq), cache, slot=1, start_pos=0)
    assert logits.dtype == torch.float32 and logits.shape == (512,)
    assert (logits - last_logits(model, seq)).abs().max() <= 1e-5
    assert cache.k[:, 0].abs().max() == 0  # the other slot is untouched
    assert cache.k[:, 1, :, :11].abs().min() > 0 and cache.k[:, 1, :, 11:].abs().max() == 0


def test_batched_decode_with_rows_of_different_lengths_matches_full_forward():
    model = tiny_model()
    cache = model.allocate_kv_cache(n_slots=4, max_len=40, dtype=torch.float32, device="cpu")
    torch.manual_seed(3)
    prompts = {0: torch.randint(0, 512, (5,)).tolist(),
               2: torch.randint(0, 512, (9,)).tolist(),   # slot 1 stays empty: slots need not be contiguous
               3: torch.randint(0, 512, (13,)).tolist()}
    seqs = {}
    for slot, prompt in prompts.items():
        if slot == 3:  # chunked prefill: the second chunk attends to the first via the cache
            model.prefill(torch.tensor(prompt[:6]), cache, slot, start_pos=0)
            logits = model.prefill(torch.tensor(prompt[6:]), cache, slot, start_pos=6)
        else:
            logits = model.prefill(torch.tensor(prompt), cache, slot, start_pos=0)
        assert (logits - last_logits(model, prompt)).abs().max() <= 1e-5
        seqs[slot] = prompt + [int(logits.argmax())]

    slots = torch.tensor([3, 0, 2])  # deliberately not in slot order
    for _ in range(6):
        tokens = torch.tensor([seqs[s][-1] for s in slots.tolist()])
        positions = torch.tensor([len(seqs[s]) - 1 for s in slots.tolist()])
        logits = model.decode(tokens, cache, slots, positions)
        assert logits.shape == (3, 512) and logits.dtype == torch.float32
        for row, slot in enumerate(slots.tolist()):
            assert (logits[row] - last_logits(model, seqs[slot])).abs().max() <= 1e-5
            seqs[slot].append(int(logits[row].argmax()))


@pytest.mark.parametrize("slot_list", [[1, 2, 3], [0, 2, 3], [0, 3]], ids=["run", "gap", "wide-gap"])
def test_decode_reading_a_run_of_slots_in_place_matches_full_forward(slot_list):
    # The engine passes slot_range=(first, last + 1) for ascending slots; rows of the run
    # outside the batch (slot 1 in "gap") hold another sequence that must not leak in.
    model = tiny_model()
    cache = model.allocate_kv_cache(n_slots=4, max_len=40, dtype=torch.float32, device="cpu")
    torch.manual_seed(4)
    seqs = {slot: torch.randint(0, 512, (4 + 3 * slot,)).tolist() for slot in range(4)}
    for slot, seq in seqs.items():
        seq.append(int(model.prefill(torch.tensor(seq), cache, slot, start_pos=0).argmax()))
    slots = torch.tensor(slot_list)
    for _ in range(4):
        tokens = torch.tensor([seqs[s][-1] for s in slot_list])
        positions = torch.tensor([len(seqs[s]) - 1 for s in slot_list])
        logits = model.decode(tokens, cache, slots, positions, window=int(positions.max()) + 1,
                              slot_range=(slot_list[0], slot_list[-1] + 1))
        for row, slot in enumerate(slot_list):
            assert (logits[row] - last_logits(model, seqs[slot])).abs().max() <= 1e-5
            seqs[slot].append(int(logits[row].argmax()))


def test_decode_ignores_stale_cache_entries_past_a_rows_position():
    # A slot reused for a shorter sequence still holds the old sequence's later entries;
    # the per-row mask must hide them.
    model = tiny_model()
    cache = model.allocate_kv_cache(1, 32, torch.float32, "cpu")
    model.prefill(torch.randint(0, 512, (20,)), cache, 0, 0)
    seq = torch.randint(0, 512, (4,)).tolist()
    model.prefill(torch.tensor(seq[:3]), cache, 0, 0)
    logits = model.decode(torch.tensor([seq[3]]), cache, torch.tensor([0]), torch.tensor([3]))
    assert (logits[0] - last_logits(model, seq)).abs().max() <= 1e-5


def test_inference_follows_weight_updates():
    # The inference paths may keep a derived copy of the output matrix (model._output_logits);
    # it must not go stale when training or loading changes the weights.
    model = tiny_model()
    cache = model.allocate_kv_cache(1, 16, torch.float32, "cpu")
    seq = torch.randint(0, 512, (6,)).tolist()
    before = model.prefill(torch.tensor(seq), cache, 0, 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    after = model.prefill(torch.tensor(seq), cache, 0, 0)
    assert not torch.allclose(before, after)
    assert (after - last_logits(model, seq)).abs().max() <= 1e-5
    model.load_state_dict(tiny_model(seed=5).state_dict())
    assert (model.prefill(torch.tensor(seq), cache, 0, 0) - last_logits(model, seq)).abs().max() <= 1e-5


def test_copy_prefix_lets_a_slot_continue_another_slots_prompt():
    model = tiny_model()
    cache = model.allocate_kv_cache(2, 32, torch.float32, "cpu")
    seq = torch.randint(0, 512, (12,)).tolist()
    model.prefill(torch.tensor(seq[:8]), cache, slot=0, start_pos=0)
    cache.copy_prefix(src_slot=0, dst_slot=1, length=8)
    logits = model.prefill(torch.tensor(seq[8:]), cache, slot=1, start_pos=8)
    assert (logits - last_logits(model, seq)).abs().max() <= 1e-5
    assert cache.n_slots == 2 and cache.max_len == 32


def test_bf16_inference_runs_and_stays_close_to_fp32():
    model = tiny_model()
    seq = torch.randint(0, 512, (10,)).tolist()
    ref = last_logits(model, seq)
    model = model.to(torch.bfloat16)
    cache = model.allocate_kv_cache(1, 16, torch.bfloat16, "cpu")
    assert cache.k.dtype == torch.bfloat16
    model.prefill(torch.tensor(seq[:9]), cache, 0, 0)
    logits = model.decode(torch.tensor([seq[9]]), cache, torch.tensor([0]), torch.tensor([9]))
    assert logits.dtype == torch.float32
    assert (logits[0] - ref).abs().max() < 0.1 * ref.abs().max()


def test_bf16_output_layer_is_close_to_fp32_and_the_same_alone_or_in_a_batch():
    model = tiny_model()
    cache = model.allocate_kv_cache(3, 32, torch.float32, "cpu")
    torch.manual_seed(5)
    seqs = [torch.randint(0, 512, (n,)).tolist() for n in (6, 9, 12)]
    for slot, seq in enumerate(seqs):
        model.prefill(torch.tensor(seq[:-1]), cache, slot, 0)
    tokens, slots = torch.tensor([s[-1] for s in seqs]), torch.arange(3)
    positions = torch.tensor([len(s) - 1 for s in seqs])
    fp32 = model.decode(tokens, cache, slots, positions)
    model.set_output_dtype(torch.bfloat16)
    assert model.output_dtype_name == "bfloat16" and model.lm_head.weight.dtype == torch.float32
    batch = model.decode(tokens, cache, slots, positions)
    assert batch.dtype == torch.float32 and not torch.equal(batch, fp32)  # really computed in bf16
    assert (batch - fp32).abs().max() < 0.02 * fp32.abs().max()
    for row in range(3):  # greedy identity in the engine needs each row independent of the batch
        alone = model.decode(tokens[row:row + 1], cache, slots[row:row + 1], positions[row:row + 1])
        assert torch.equal(alone[0], batch[row])
    model.set_output_dtype(None)
    assert torch.equal(model.decode(tokens, cache, slots, positions), fp32)


def test_output_dtype_resolution(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert model_module.resolve_output_dtype("auto", model, "cpu") == torch.bfloat16
    assert model_module.resolve_output_dtype("float32", model, "cpu") == torch.float32
    assert model_module.resolve_output_dtype("auto", model.to(torch.bfloat16), "cpu") is None  # already bf16
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower
    assert model_module.resolve_output_dtype("auto", tiny_model(), "cpu") is None
    int8 = model_module.quantize_int8(tiny_model())
    assert model_module.resolve_output_dtype("bfloat16", int8, "cpu") is None and int8.output_dtype_name == "int8"
    with pytest.raises(ValueError):
        int8.set_output_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match="output dtype"):
        model_module.resolve_output_dtype("fp8", tiny_model(), "cpu")


def test_cache_rejects_mismatched_dtype_and_out_of_range_positions():
    model = tiny_model()
    with pytest.raises(ValueError, match="dtype"):
        model.allocate_kv_cache(1, 16, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="block_size"):
        model.allocate_kv_cache(1, 65, torch.float32, "cpu")
    cache = model.allocate_kv_cache(1, 16, torch.float32, "cpu")
    with pytest.raises(ValueError):
        model.prefill(torch.zeros(10, dtype=torch.long), cache, 0, start_pos=8)
    with pytest.raises(ValueError):
        model.decode(torch.zeros(1, dtype=torch.long), cache, torch.tensor([0]), torch.tensor([16]))


# ----------------------------------------------------------------------------- pretrained weights


def test_from_pretrained_matches_hugging_face_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # initializer_range 0.1 (not GPT-2's 0.02) makes activations large enough that an
    # exact GELU instead of GPT-2's tanh approximation would show up in the logits.
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=50257,
                                        initializer_range=0.1)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)

    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.block_size == 64 and model.config.vocab_size == 50304
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        ref = hf_model(idx).logits[:, -1]
        ours = model(idx)[0][:, 0]
    assert ours.shape == (2, 50304)
    assert (ours[:, :50257] - ref).abs().max() < 1e-4
    # The padded rows exist, are freshly initialised (not zero, not copies), and are tied.
    extra = model.transformer.wte.weight[50257:]
    assert extra.shape == (47, 64) and 0.01 < extra.std().item() < 0.03
    assert model.lm_head.weight is model.transformer.wte.weight


def test_from_pretrained_explains_a_missing_transformers(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install transformers"):
        GPT.from_pretrained("gpt2")


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint(model: nn.Module, config: GPTConfig | None = None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model": unwrapped_state_dict(model),
            "model_args": asdict(config or model.config), "tokenizer": "p50k_edit", "iter_num": 7}


class Wrapper(nn.Module):
    """Stands in for DDP / torch.compile, which prefix state-dict keys the same way."""

    def __init__(self, inner: nn.Module, attr: str):
        super().__init__()
        self.add_module(attr, inner)


def test_unwrapped_state_dict_strips_wrapper_prefixes():
    model = tiny_model()
    wrapped = Wrapper(Wrapper(model, "_orig_mod"), "module")
    assert all(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
    state = unwrapped_state_dict(wrapped)
    assert state.keys() == model.state_dict().keys()


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    ckpt = make_checkpoint(Wrapper(model, "_orig_mod"), model.config)
    save_checkpoint(str(path), ckpt)
    loaded, loaded_ckpt = load_checkpoint(str(path))
    assert not loaded.training
    assert loaded_ckpt["iter_num"] == 7 and loaded_ckpt["tokenizer"] == "p50k_edit"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in loaded_ckpt["model"])
    idx = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_checkpoint_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(model_module.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(model_module.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": {}})
    assert events == ["fsync", "replace"]


def test_failed_save_keeps_previous_file_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), make_checkpoint(tiny_model()))
    before = path.read_bytes()

    with pytest.raises(Exception):
        save_checkpoint(str(path), {"model": {}, "unpicklable": lambda: None})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]

    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"half of something")
        raise OSError("disk full")

    monkeypatch.setattr(model_module.torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), make_checkpoint(tiny_model(seed=1)))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_checkpoint_errors_are_checkpoint_errors_naming_the_path(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="not found.*missing.pt"):
        load_checkpoint(str(missing))

    good = tmp_path / "good.pt"
    save_checkpoint(str(good), make_checkpoint(tiny_model()))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=bad.name):
            load_checkpoint(str(bad))

    cases = {
        "list.pt": [1, 2, 3],
        "no_args.pt": {"model": {}},
        "unknown_args.pt": {**make_checkpoint(tiny_model()), "model_args": {**TINY, "n_kv_head": 2}},
        "wrong_shapes.pt": {**make_checkpoint(tiny_model()), "model_args": {**TINY, "n_embd": 128}},
        "bad_args.pt": {**make_checkpoint(tiny_model()), "model_args": {**TINY, "n_head": 3}},
        "future.pt": {**make_checkpoint(tiny_model()), "format": CHECKPOINT_FORMAT + 1},
        "quantized.pt": {**make_checkpoint(tiny_model()), "quantization": "int8-weight-only"},
    }
    for name, obj in cases.items():
        save_checkpoint(str(tmp_path / name), obj)
        with pytest.raises(CheckpointError, match=name) as info:
            load_checkpoint(str(tmp_path / name))
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="n_kv_head"):
        load_checkpoint(str(tmp_path / "unknown_args.pt"))
    with pytest.raises(CheckpointError, match="int8 weights do not match"):  # float weights tagged int8
        load_checkpoint(str(tmp_path / "quantized.pt"))


class NotData:
    """An arbitrary class: unpickling it would mean importing and running code."""


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "code.pt"
    save_checkpoint(str(path), {**make_checkpoint(tiny_model()), "extra": NotData()})
    with pytest.raises(CheckpointError, match="code.pt"):
        load_checkpoint(str(path))


def test_batched_prefill_matches_one_by_one_prefill():
    model = tiny_model()
    torch.manual_seed(5)
    seqs = [torch.randint(0, 512, (n,)) for n in (7, 3, 12)]
    slots, starts = [2, 0, 3], [0, 9, 4]
    caches = [model.allocate_kv_cache(n_slots=4, max_len=24, dtype=torch.float32, device="cpu") for _ in range(2)]
    history, older = torch.randint(0, 512, (9,)), torch.randint(0, 512, (20,))
    for cache in caches:
        model.prefill(history, cache, 0, 0)  # slot 0's sequence continues at position 9
        # slot 3 holds 20 positions; the chunk overwrites 4..15, leaving 16..19 stale: unseen
        model.prefill(older, cache, 3, 0)
    one_by_one = torch.stack([model.prefill(t, caches[0], s, p) for t, s, p in zip(seqs, slots, starts)])
    batched = model.prefill_batch(seqs, caches[1], slots, starts)
    assert batched.shape == (3, 512) and batched.dtype == torch.float32
    assert (batched - one_by_one).abs().max() <= 1e-5
    assert (caches[0].k - caches[1].k).abs().max() <= 1e-5 and (caches[0].v - caches[1].v).abs().max() <= 1e-5
    # and rows agree with a plain forward of their whole sequence
    assert (batched[1] - last_logits(model, history.tolist() + seqs[1].tolist())).abs().max() <= 1e-5
    assert (batched[2] - last_logits(model, older[:4].tolist() + seqs[2].tolist())).abs().max() <= 1e-5
    assert (batched[0] - last_logits(model, seqs[0].tolist())).abs().max() <= 1e-5
