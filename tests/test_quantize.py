"""Tests for the INT8 weights (model.py) and quantize_model.py."""

import copy
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import quantize_model
from model import (CHECKPOINT_FORMAT, GPT, GPTConfig, Int8Linear, load_checkpoint, quantize_int8,
                   quantize_rows_int8, save_checkpoint, unwrapped_state_dict, use_int8_kernel)
from tokenizer import EOT_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=128)


def random_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def int8_copy(model: GPT, kernel: str) -> GPT:
    quantized = quantize_int8(copy.deepcopy(model))
    for layer in quantized.modules():
        if isinstance(layer, Int8Linear):
            layer.use_kernel(kernel)
    return quantized


def write_float_checkpoint(path, model: GPT, data_dir=None) -> None:
    config = {"dataset": "tiny", "data_dir": str(data_dir)} if data_dir else {}
    save_checkpoint(str(path), {"format": CHECKPOINT_FORMAT, "model": unwrapped_state_dict(model),
                                "model_args": asdict(model.config), "config": config, "tokenizer": "p50k_edit",
                                "dataset": "tiny", "iter_num": 3, "val_loss": 10.5})


def write_val_bin(data_dir, n_tokens=3000, seed=0) -> None:
    os.makedirs(data_dir, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, 50000, n_tokens).astype(np.uint16)
    tokens[::97] = EOT_ID
    tokens.tofile(os.path.join(data_dir, "val.bin"))


# ----------------------------------------------------------------------------- the int8 format


def test_round_trip_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(300, 50) * torch.logspace(-6, 1, 300)[:, None]  # rows of very different magnitude
    w[7] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and q.shape == w.shape
    assert int(q.abs().max()) <= 127
    error = (w - q.float() * scales.float()[:, None]).abs()
    assert (error <= scales.float()[:, None] / 2 + 1e-12).all()
    assert int(q[7].abs().max()) == 0
    # The scale is tight: each nonzero row uses (nearly) the whole -127..127 range.
    used = q.abs().amax(dim=1)[w.abs().amax(dim=1) > 1e-4]
    assert int(used.min()) >= 126


@pytest.mark.parametrize("kernel", ["dynamic-int8", "weight-only"])
def test_quantized_logits_stay_close_to_full_precision(kernel):
    model = random_model()
    quantized = int8_copy(model, kernel)
    idx = torch.randint(0, 50257, (32, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model._hidden_states(idx, torch.arange(24))
        reference = model.lm_head(hidden)
        logits = quantized.lm_head(quantized._hidden_states(idx, torch.arange(24)))
    relative = (logits - reference).norm() / reference.norm()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert relative < 0.03, relative
    assert agreement > 0.9, agreement
    # And the model actually computes with int8 weights: no float copy of a matrix is left.
    assert not any(p.dim() == 2 for p in quantized.parameters())


def test_int8_model_is_tied_and_counts_float_tensors_it_keeps():
    quantized = quantize_int8(random_model())
    assert quantized.transformer.wte is quantized.lm_head
    state = quantized.state_dict()
    floats = sorted(k for k, v in state.items() if v.dtype == torch.float32 and not k.endswith(".scales"))
    assert floats and all(k.endswith((".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for k in floats)
    assert state["transformer.wpe.weight_int8"].dtype == torch.int8


def test_embedding_lookup_matches_dequantized_rows():
    quantized = quantize_int8(random_model())
    ids = torch.tensor([[0, 5, 50303]])
    rows = quantized.transformer.wte(ids)
    assert torch.equal(rows[0], quantized.lm_head.weight[ids[0]])


# ----------------------------------------------------------------------------- loading and inference


@pytest.fixture(scope="module")
def quantized_files(tmp_path_factory):
    """A float checkpoint, a tiny val.bin and the int8 checkpoint quantize_model.py made of them."""
    root = tmp_path_factory.mktemp("quant")
    write_val_bin(root / "data" / "tiny")
    write_float_checkpoint(root / "best.pt", random_model(), data_dir=root / "data")
    out = root / "ckpt_int8.pt"
    rc = quantize_model.main(["--ckpt", str(root / "best.pt"), "--out", str(out), "--val-tokens", "1024",
                              "--prompts", "6", "--max-new-tokens", "4", "--bench-steps", "2"])
    assert rc == 0
    return root


def test_cli_writes_a_checkpoint_readable_with_weights_only(quantized_files):
    raw = torch.load(quantized_files / "ckpt_int8.pt", weights_only=True)
    assert raw["quantization"] == "int8-weight-only" and raw["format"] == CHECKPOINT_FORMAT
    assert raw["tokenizer"] == "p50k_edit" and raw["model_args"]["n_embd"] == 64
    assert raw["source"]["iter_num"] == 3 and len(raw["source"]["sha256"]) == 64
    assert raw["model"]["lm_head.weight_int8"].dtype == torch.int8
    assert raw["model"]["lm_head.scales"].dtype == torch.bfloat16
    # The tied table is one tensor in the file, as in a float checkpoint.
    assert raw["model"]["lm_head.weight_int8"].data_ptr() == raw["model"]["transformer.wte.weight_int8"].data_ptr()
    assert raw["model"]["transformer.h.0.mlp.c_fc.bias"].dtype == torch.float32


def test_cli_report_has_every_figure(quantized_files):
    report = json.loads((quantized_files / "quantize.json").read_text())
    w, v = report["weights"], report["val_loss"]
    assert w["ratio"] == pytest.approx(w["fp32_bytes"] / w["int8_bytes"]) and w["ratio"] > 3.5
    assert v["tokens"] == 1024 and abs(v["relative_increase"]) < 0.01
    assert report["agreement"]["prompts"] == 6 and 0 <= report["agreement"]["share"] <= 1
    assert set(report["decode_tok_s"]) == {"fp32", "bf16", "int8"}
    assert all(x > 0 for row in report["decode_tok_s"].values() for x in row.values())
    assert report["kernel"] == "dynamic-int8"


def test_load_checkpoint_gives_an_int8_model_with_the_cpu_kernel(quantized_files):
    model, ckpt = load_checkpoint(str(quantized_files / "ckpt_int8.pt"), "cpu")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 4 + 2 and all(m.kernel == "dynamic-int8" for m in layers)
    assert model.transformer.wte is model.lm_head and not model.training
    float_model, _ = load_checkpoint(str(quantized_files / "best.pt"))
    idx = torch.randint(0, 50257, (4, 16))
    with torch.no_grad():
        got, ref = model(idx)[0], float_model(idx)[0]
    assert (got - ref).norm() / ref.norm() < 0.03


@pytest.mark.parametrize("kernel", ["dynamic-int8", "weight-only"])
def test_int8_prefill_and_decode_match_its_own_forward(kernel):
    model = int8_copy(random_model(), kernel)
    seqs = [torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 14)]
    cache = model.allocate_kv_cache(2, 32)
    with torch.no_grad():
        full = [model(s[None])[0][0, -1] for s in seqs]
    # Prefill all but the last token, then decode the last tokens of both rows in one batch.
    for slot, s in enumerate(seqs):
        prefill = model.prefill(s, cache, slot, 0)
        assert torch.allclose(prefill, full[slot], rtol=0, atol=1e-5)  # same shapes: same kernel calls
        model.prefill(s[:-1], cache, slot, 0)
    last = torch.stack([s[-1] for s in seqs])
    decoded = model.decode(last, cache, torch.tensor([0, 1]), torch.tensor([len(s) - 1 for s in seqs]))
    for row in range(2):
        # dynamic-int8 quantizes activations per call, one range per tensor: a step over other
        # rows than the full forward's differs a little.
        tol = 1e-5 if kernel == "weight-only" else 0.05
        assert (decoded[row] - full[row]).norm() / full[row].norm() < tol
        assert decoded[row].argmax() == full[row].argmax()


def test_the_cuda_configuration_weight_only_in_bf16_runs_here(quantized_files):
    # No GPU here: run what load_checkpoint sets up on CUDA (weight-only kernel, bf16 floats)
    # on the CPU, through the same code, and compare with the float model.
    model, _ = load_checkpoint(str(quantized_files / "ckpt_int8.pt"), "cpu")
    model = model.to(torch.bfloat16)
    assert use_int8_kernel(model, "cuda") == "weight-only" and model.lm_head.weight.dtype == torch.bfloat16
    float_model, _ = load_checkpoint(str(quantized_files / "best.pt"))
    idx = torch.randint(0, 50257, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = model(idx)[0].float(), float_model(idx)[0]
    assert (got - ref).norm() / ref.norm() < 0.05
    cache = model.allocate_kv_cache(1, 16)  # the engine's cache follows the float dtype
    assert cache.dtype == torch.bfloat16 and model.prefill(idx[0], cache, 0, 0).dtype == torch.float32


def test_missing_cpu_kernel_falls_back_to_weight_only_with_a_warning(monkeypatch, caplog):
    def no_engine(self):
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack NoQEngine")

    monkeypatch.setattr(Int8Linear, "_prepack", no_engine)
    model = quantize_int8(random_model())
    with caplog.at_level(logging.WARNING):
        assert use_int8_kernel(model, "cpu") == "weight-only"
    assert "weight-only" in caplog.text and "NoQEngine" in caplog.text
    assert all(m.kernel == "weight-only" for m in model.modules() if isinstance(m, Int8Linear))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))[0]).all()


def test_size_ratio_on_a_model_where_scales_and_floats_are_small(tmp_path):
    # Width 256: bf16 scales cost 2/256 of the int8 bytes, LayerNorms and biases ~0.1%.
    model = random_model(n_embd=256, n_head=4)
    quantized = quantize_int8(copy.deepcopy(model))
    sizes = quantize_model.weight_bytes(model.state_dict(), quantize_model.stored_state(quantized))
    params = sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert sizes["fp32_bytes"] == 4 * params
    assert sizes["ratio"] >= 3.9
    # The files agree: the tied table is stored once in each.
    write_float_checkpoint(tmp_path / "f.pt", model)
    save_checkpoint(str(tmp_path / "q.pt"), {"model": quantize_model.stored_state(quantized)})
    assert os.path.getsize(tmp_path / "f.pt") / os.path.getsize(tmp_path / "q.pt") >= 3.85


# ----------------------------------------------------------------------------- bad input


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "quantize_model.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_bad_inputs_exit_nonzero_with_one_line_and_write_nothing(tmp_path, quantized_files, capsys):
    out = tmp_path / "out" / "int8.pt"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = {
        str(tmp_path / "missing.pt"): "not found",
        str(garbage): "not a readable checkpoint",
        str(quantized_files / "ckpt_int8.pt"): "already quantized",
    }
    for ckpt, message in cases.items():
        assert quantize_model.main(["--ckpt", ckpt, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # A float checkpoint whose dataset cannot be found is refused before anything is written.
    write_float_checkpoint(tmp_path / "f.pt", random_model())
    assert quantize_model.main(["--ckpt", str(tmp_path / "f.pt"), "--out", str(out),
                                "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "val.bin not found" in capsys.readouterr().err
    assert not out.parent.exists()
    assert sorted(os.listdir(tmp_path)) == ["f.pt", "garbage.pt"]


def test_cli_exit_status_for_a_missing_file(tmp_path):
    result = run_cli("--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "int8.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "checkpoint not found" in result.stderr
    assert os.listdir(tmp_path) == []
