"""`make gpu-check`: every GPU measurement in one call, written to bench/gpu-<gpu>-<time>.json.

Sections (each timed on the same device in the same run, so the figures compare):
  decode   ms/step and tokens/s of the 124M architecture (random bf16 weights) at batch 1,
           32, 128, 256 and contexts ~320 and ~1024, CUDA graphs on vs off, beside the memory
           floor (weight bytes + live KV bytes, over the measured device copy bandwidth)
  hf       Hugging Face `generate` on the same architecture and batch (the reference)
  http     serve_api.py + bench_serve.py: 128 concurrent users, 64 new tokens, p50/p95, TTFT
  train    train.py under torchrun on one GPU, the 124M config: tokens/s and MFU

A section that cannot run (a package missing on the machine, no dataset) records why
instead of failing the others. `--smoke` runs the decode and hf sections at toy sizes on
CPU, which is how the tests check the script's plumbing on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

from cuda_graphs import DecodeGraphs
from model import GPT, GPTConfig, model_checkpoint, save_checkpoint
from tokenizer import TOKENIZER_NAME

GPT2_124M = GPTConfig()  # the defaults are GPT-2 124M (12 x 768, context 1024, padded vocab)
TOY = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)


class GpuCheckError(Exception):
    pass


def timed_ms(fn, iters: int, device: torch.device) -> float:
    """Mean milliseconds per call after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), 10, device)
    return 2 * n_bytes / (ms / 1000)


def random_model(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    return GPT(config).to(device=device, dtype=dtype).eval()


def decode_section(config: GPTConfig, device: torch.device, dtype: torch.dtype, batches: list[int],
                   contexts: list[int], iters: int) -> dict:
    model = random_model(config, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    kv_per_token = 2 * config.n_layer * config.n_embd * torch.finfo(dtype).bits // 8
    rows = []
    for batch in batches:
        cache = model.allocate_kv_cache(batch + 1, config.block_size, device=device)
        for context in contexts:
            tokens, slots = [1] * batch, list(range(batch))
            positions = [context - 1 - (row % 16) for row in range(batch)]  # rows at different positions
            row = {"batch": batch, "context": context}
            for graphs_on in ([False, True] if device.type == "cuda" else [False]):
                runner = DecodeGraphs(model, cache, batch, capture=graphs_on)
                ms = timed_ms(lambda: runner.decode(tokens, slots, positions), iters, device)
                key = "graphs" if graphs_on else "eager"
                row[f"{key}_ms"], row[f"{key}_tok_s"] = round(ms, 4), round(batch * 1000 / ms, 1)
            floor_s = (weight_bytes + batch * context * kv_per_token) / bandwidth
            row["floor_ms"] = round(floor_s * 1000, 4)
            rows.append(row)
            print(f"decode batch {batch:4d} context {context:5d}: " +
                  ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith(("_ms", "_tok_s"))), flush=True)
        del cache
    return {"dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "rows": rows}


def hf_section(config: GPTConfig, device: torch.device, dtype: torch.dtype, batch: int, prompt_len: int,
               new_tokens: int) -> dict:
    """Hugging Face generate (greedy, KV cache) on the same architecture: ms per decode step
    from the difference between new_tokens and 1 new token, so prefill cancels out."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return {"skipped": "transformers is not installed"}
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                           n_layer=config.n_layer, n_head=config.n_head)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, 50000, (batch, prompt_len), device=device)
    mask = torch.ones_like(prompt)

    def generate(n):
        with torch.inference_mode():
            model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
    one, many = timed_ms(lambda: generate(1), 2, device), timed_ms(lambda: generate(new_tokens), 2, device)
    step_ms = (many - one) / (new_tokens - 1)
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "ms_per_step": round(step_ms, 4), "tok_s": round(batch * 1000 / step_ms, 1)}


def write_random_checkpoint(config: GPTConfig, path: str) -> None:
    """A servable checkpoint of random weights: the serving path's speed does not depend on them."""
    save_checkpoint(path, model_checkpoint(random_model(config, torch.device("cpu"), torch.float32), TOKENIZER_NAME))


def http_section(config: GPTConfig, data_dir: str, users: int, new_tokens: int, duration: float) -> dict:
    if not os.path.isfile(os.path.join(data_dir, "val_docs.jsonl")):
        return {"skipped": f"{data_dir}/val_docs.jsonl missing (run make data, or carry data/)"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "random-124m.pt")
        write_random_checkpoint(config, ckpt)
        command = [sys.executable, "bench_serve.py", "--ckpt", ckpt, "--data-dir", data_dir, "--no-baseline",
                   "--levels", str(users), "--max-tokens", str(new_tokens), "--duration", str(duration),
                   "--max-batch", str(max(users, 128)), "--out-dir", tmp, "--no-progress",
                   "--server-arg=--device=cuda", "--server-arg=--dtype=bfloat16"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 300)
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        reports = [f for f in os.listdir(tmp) if f.startswith("results-") and f.endswith(".json")]
        if done.returncode != 0 or not reports:
            return {"error": f"bench_serve.py exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
        with open(os.path.join(tmp, reports[0])) as f:
            report = json.load(f)
    return {"users": users, "new_tokens": new_tokens, "report": report}


def train_section(data_dir: str, iters: int) -> dict:
    if not os.path.isfile(os.path.join(data_dir, "train.bin")):
        return {"skipped": f"{data_dir}/train.bin missing (run make data, or carry data/)"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "config/train_code_assistant.py",
                   f"--out_dir={tmp}", f"--max_iters={iters}", f"--eval_interval={iters * 10}", "--eval_iters=1",
                   "--log_interval=5", "--batch_size=16", "--block_size=1024", "--gradient_accumulation_steps=1",
                   f"--data_dir={os.path.dirname(os.path.abspath(data_dir))}",
                   f"--dataset={os.path.basename(os.path.abspath(data_dir))}"]  # MFU: train.py's H100/H200 peak
        done = subprocess.run(command, capture_output=True, text=True, timeout=480)
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        log_path = os.path.join(tmp, "log.jsonl")
        records = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    steps = [r for r in records if r.get("kind") == "train"][2:]  # the first ones include compilation
    if done.returncode != 0 or not steps:
        return {"error": f"train.py exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    last = steps[-1]
    return {"command": " ".join(command), "tok_s": last["tok_per_s"], "mfu": last["mfu"],
            "ms_per_iter": last["ms_per_iter"], "tokens_per_iter": 16 * 1024}


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="decode,hf,http,train", help="comma-separated subset")
    p.add_argument("--data-dir", default="data/python_code")
    p.add_argument("--out-dir", default="bench")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the plumbing, measures nothing")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {"decode", "hf", "http", "train"}
    if unknown:
        raise GpuCheckError(f"unknown sections {sorted(unknown)}")
    if not args.smoke and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device here: make gpu-check measures a GPU (--smoke checks the script on CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    config, dtype = (TOY, torch.float32) if args.smoke else (GPT2_124M, torch.bfloat16)
    name = gpu_name(device)
    result = {"gpu": name, "torch": torch.__version__, "started": datetime.now(timezone.utc).isoformat(),
              "model": vars(config).copy(), "smoke": args.smoke}
    if "decode" in sections:
        batches, contexts = ([1, 4], [32, 96]) if args.smoke else ([1, 32, 128, 256], [320, 1024])
        result["decode"] = decode_section(config, device, dtype, batches, contexts, 3 if args.smoke else 50)
    if "hf" in sections:
        result["hf_generate"] = hf_section(config, device, dtype, 4 if args.smoke else 128,
                                           16 if args.smoke else 256, 4 if args.smoke else 64)
    if "http" in sections and not args.smoke:
        result["http"] = http_section(config, args.data_dir, 128, 64, 30.0)
    if "train" in sections and not args.smoke:
        result["train"] = train_section(args.data_dir, 40)
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out_dir, f"gpu-{name}-{stamp}.json")
    with tempfile.NamedTemporaryFile("w", dir=args.out_dir, suffix=".tmp", delete=False) as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GpuCheckError as exc:
        print(f"gpu_check.py: {exc}", file=sys.stderr)
        sys.exit(2)
