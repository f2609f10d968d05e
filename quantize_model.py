"""Quantize a trained checkpoint to INT8 weights, measure what that cost, and report.

    python quantize_model.py --ckpt out-code-assistant/best.pt --out out-code-assistant/ckpt_int8.pt

Every Linear layer and both embedding tables (the token table is also the output layer and
is stored once) become int8 with one bf16 scale per output row, symmetric
(model.quantize_int8); LayerNorms and biases stay fp32. The output is an ordinary
checkpoint tagged quantization='int8-weight-only' that the same model.load_checkpoint reads,
with weights_only=True, on CPU or CUDA; the loader picks the kernel for the device (CPU: the
quantized engine's dynamic int8 GEMM, prepacked at load; CUDA: weight-only, dequantized
inside the matmul, which torch.compile fuses). See model.Int8Linear.

The report is printed and written as JSON beside the output (quantize.json):
  weights     bytes of the fp32 weights vs the stored int8 ones (every tensor counted once)
  val loss    before/after, on the same evenly spaced windows of the dataset's val.bin
  agreement   share of prompts (cut from val.bin) whose greedy one-line completion through
              engine.Engine, as served, is unchanged by quantization
  decode      tokens/s of fp32, bf16 and int8 at batch 1 and 32 on this device (timed loops
              of model.decode over a KV cache: the engine's inner loop without bookkeeping)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from engine import Engine, EngineConfig, SamplingParams
from model import (CHECKPOINT_FORMAT, INT8_WEIGHT_ONLY, GPT, CheckpointError, evenly_spaced_windows, load_checkpoint, mean_loss, quantize_int8,
                   save_checkpoint)
from tokenizer import TOKENIZER_NAME, TokenizerError, load_tokenizer

# What later stages check a checkpoint by, carried over from the float one.
CARRIED_KEYS = ("config", "tokenizer", "dataset", "dataset_fingerprint", "iter_num", "val_loss", "model_id")
LOSS_BATCH = 8  # windows per forward pass when measuring val loss


class QuantizeError(Exception):
    """Bad input or a failed check; one line for the CLI."""


# ----------------------------------------------------------------------------- the checkpoint


def read_source(path: str) -> tuple[GPT, dict]:
    model, ckpt = load_checkpoint(path, "cpu")
    if ckpt.get("quantization"):
        raise QuantizeError(f"{path} is already quantized ({ckpt['quantization']}); pass the float checkpoint")
    if ckpt.get("tokenizer", TOKENIZER_NAME) != TOKENIZER_NAME:
        raise QuantizeError(f"{path}: tokenizer {ckpt['tokenizer']!r}, this code speaks {TOKENIZER_NAME!r}")
    return model, ckpt


def stored_state(model: GPT) -> dict:
    """The int8 model's state dict as saved: scales in bf16 (exact: quantize_rows_int8 made them
    bf16 values). Tied tensors stay one tensor, so torch.save writes them once."""
    converted: dict[int, torch.Tensor] = {}
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".scales"):
            value = converted.setdefault(value.data_ptr(), value.to(torch.bfloat16))
        state[key] = value
    return state


def int8_checkpoint(model: GPT, source: dict, source_path: str) -> dict:
    with open(source_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    carried = {k: source[k] for k in CARRIED_KEYS if k in source}
    return dict(carried, format=CHECKPOINT_FORMAT, quantization=INT8_WEIGHT_ONLY,
                model=stored_state(quantize_int8(copy.deepcopy(model).cpu())), model_args=dict(source["model_args"]),
                source=dict(path=os.path.abspath(source_path), sha256=digest, iter_num=source.get("iter_num"),
                            val_loss=source.get("val_loss")))


def unique_bytes(tensors) -> tuple[int, int]:
    """(bytes, elements) of the distinct storages among tensors: a tied matrix counts once."""
    seen, nbytes, numel = set(), 0, 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
            numel += t.numel()
    return nbytes, numel


def weight_bytes(float_state: dict, int8_state: dict) -> dict:
    _, numel = unique_bytes(float_state.values())
    int8_bytes, _ = unique_bytes(int8_state.values())
    kept_float, _ = unique_bytes(v for v in int8_state.values() if v.dtype == torch.float32)
    return dict(fp32_bytes=4 * numel, int8_bytes=int8_bytes, ratio=4 * numel / int8_bytes, fp32_bytes_kept=kept_float,
                counted="every tensor of the state dict once (the tied token table / output layer once): "
                        "before, all as fp32; after, int8 weights + bf16 scales + fp32 LayerNorms and biases")


# ----------------------------------------------------------------------------- measurements


def resolve_data_dir(args, ckpt: dict) -> str:
    if args.data_dir:
        data_dir = args.data_dir
    else:
        config = ckpt.get("config") or {}
        dataset = ckpt.get("dataset") or config.get("dataset")
        if not dataset:
            raise QuantizeError(f"{args.ckpt} does not name its dataset; pass --data-dir")
        data_dir = os.path.join(config.get("data_dir", "data"), dataset)
    if not os.path.isfile(os.path.join(data_dir, "val.bin")):
        raise QuantizeError(f"{os.path.join(data_dir, 'val.bin')} not found (run `make data`, or pass --data-dir)")
    return data_dir


def val_windows(data_dir: str, block_size: int, max_tokens: int) -> torch.Tensor:
    """Evenly spaced (n, block_size + 1) windows of val.bin: the same for every model measured."""
    data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    if len(data) <= block_size + 1:
        raise QuantizeError(f"{data_dir}/val.bin holds {len(data)} tokens, fewer than one block")
    return evenly_spaced_windows(data, block_size, max_tokens)


def agreement_prompts(windows: torch.Tensor, n: int, max_len: int) -> list[list[int]]:
    """n prompts of 16..max_len tokens cut from the val windows (deterministic)."""
    gen = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, len(windows), (n,), generator=gen).tolist()
    lengths = torch.randint(16, max(17, max_len), (n,), generator=gen).tolist()
    return [windows[r, :length].tolist() for r, length in zip(rows, lengths)]


def greedy_lines(model: GPT, prompts: list[list[int]], enc, device, max_new: int) -> list[str]:
    """One greedy line per prompt through the serving engine."""
    engine = Engine(model, EngineConfig(max_batch=32, max_queue_wait_s=1e9), enc=enc, device=device).start()
    try:
        done = engine.generate(prompts, SamplingParams(max_tokens=max_new, temperature=0.0, stop=("\n",)))
    finally:
        engine.shutdown()
    failed = [c.error for c in done if c.error]
    if failed:
        raise QuantizeError(f"{len(failed)} completions failed in the engine: {failed[0]}")
    return [c.text for c in done]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(model: GPT, batch: int, device, steps: int, repeats: int = 5) -> float:
    """Best of `repeats` timed loops of `steps` batched decode calls, every row continuing the
    same prompt (prefilled once, copied to the other slots)."""
    prompt_len = min(200, model.config.block_size // 2)
    steps = max(1, min(steps, model.config.block_size - prompt_len))
    cache = model.allocate_kv_cache(batch, prompt_len + steps, device=device)
    prompt = torch.randint(0, 50000, (prompt_len,), generator=torch.Generator().manual_seed(0)).to(device)
    model.prefill(prompt, cache, 0, 0)
    for slot in range(1, batch):
        cache.copy_prefix(0, slot, prompt_len)
    slots = torch.arange(batch, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first loop warms allocators and caches up
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            positions = torch.full((batch,), prompt_len + i, dtype=torch.long, device=device)
            tokens = model.decode(tokens, cache, slots, positions).argmax(dim=-1)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return batch * steps / best


def decode_speeds(models: dict[str, GPT], device, steps: int, batches=(1, 32)) -> dict:
    return {name: {f"batch_{b}": round(decode_tokens_per_s(m, b, device, steps), 1) for b in batches}
            for name, m in models.items()}


# ----------------------------------------------------------------------------- the run


def run(args) -> dict:
    if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise QuantizeError("--out must differ from --ckpt: the float checkpoint stays the source of truth")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter()
    model, source = read_source(args.ckpt)
    data_dir = resolve_data_dir(args, source)  # checked before anything is written
    checkpoint = int8_checkpoint(model, source, args.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, checkpoint)
    timings = {"quantize_s": time.perf_counter() - clock}

    # Everything below measures the model as served: read back through the one loader.
    int8_model, _ = load_checkpoint(args.out, device)
    model = model.to(device)
    block_size = model.config.block_size
    clock = time.perf_counter()
    windows = val_windows(data_dir, block_size, args.val_tokens)
    before, after = (mean_loss(m, windows, device, LOSS_BATCH) for m in (model, int8_model))
    timings["val_loss_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    enc = load_tokenizer()
    prompts = agreement_prompts(windows, args.prompts, block_size - args.max_new_tokens)
    lines = [greedy_lines(m, prompts, enc, device, args.max_new_tokens) for m in (model, int8_model)]
    unchanged = sum(a == b for a, b in zip(*lines))
    timings["agreement_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    models = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16), "int8": int8_model}
    speeds = decode_speeds(models, device, args.bench_steps)
    timings["decode_bench_s"] = time.perf_counter() - clock
    report = dict(
        source=args.ckpt, out=args.out, device=device, kernel=int8_model.lm_head.kernel, torch=torch.__version__,
        threads=torch.get_num_threads(), weights=weight_bytes(source["model"], checkpoint["model"]),
        val_loss=dict(fp32=before, int8=after, relative_increase=(after - before) / before,
                      tokens=int(windows[:, 1:].numel()), data_dir=data_dir,
                      int8_float_dtype=str(int8_model.lm_head.scales.dtype).removeprefix("torch.")),
        agreement=dict(prompts=len(prompts), unchanged=unchanged, share=unchanged / max(1, len(prompts)),
                       max_new_tokens=args.max_new_tokens, stop="\\n", decoding="greedy, engine.Engine"),
        decode_tok_s=speeds, timings_s={k: round(v, 2) for k, v in timings.items()})
    write_json(args.report or os.path.join(os.path.dirname(os.path.abspath(args.out)), "quantize.json"), report)
    return report


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def print_report(r: dict) -> None:
    w, v, a, speeds = r["weights"], r["val_loss"], r["agreement"], r["decode_tok_s"]
    print(f"\nINT8: {r['source']} -> {r['out']}  ({r['kernel']} kernel on {r['device']})")
    print(f"  weights       {w['fp32_bytes'] / 1e6:.2f} MB fp32 -> {w['int8_bytes'] / 1e6:.2f} MB  "
          f"({w['ratio']:.2f}x smaller)")
    print(f"  val loss      {v['fp32']:.4f} -> {v['int8']:.4f} nats/token  ({100 * v['relative_increase']:+.2f}%, "
          f"{v['tokens']:,} tokens)")
    print(f"  agreement     {a['unchanged']}/{a['prompts']} greedy line completions unchanged "
          f"({100 * a['share']:.1f}%)")
    columns = list(next(iter(speeds.values())))
    print("  decode tok/s " + "".join(f"{c.replace('_', ' '):>10}" for c in columns))
    for name, row in speeds.items():
        print(f"    {name:11}" + "".join(f"{row[c]:10,.0f}" for c in columns))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="float checkpoint (e.g. out-code-assistant/best.pt)")
    p.add_argument("--out", required=True, help="int8 checkpoint to write (e.g. out-code-assistant/ckpt_int8.pt)")
    p.add_argument("--data-dir", help="dataset dir holding val.bin (default: data/<the checkpoint's dataset>)")
    p.add_argument("--report", help="report JSON (default: quantize.json beside --out)")
    p.add_argument("--device", default="auto", help="where to measure: auto | cpu | cuda[:N]")
    p.add_argument("--val-tokens", type=int, default=32768, help="val.bin tokens for the loss (default 32768)")
    p.add_argument("--prompts", type=int, default=100, help="prompts for the greedy agreement (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per agreement completion (default 24)")
    p.add_argument("--bench-steps", type=int, default=32, help="decode steps per timed loop (default 32)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (QuantizeError, CheckpointError, TokenizerError) as exc:
        print(f"quantize_model.py: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
