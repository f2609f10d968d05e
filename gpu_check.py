"""`make gpu-check`: every GPU measurement in one call, written to bench/gpu-<gpu>-<time>.json.

Sections (each timed on the same device in the same run, so the figures compare):
  decode   ms/step and tokens/s of the 124M architecture (random bf16 weights) at batch 1,
           32, 128, 256 and contexts ~320 and ~1024: eager, CUDA graphs with gathered KV
           windows, CUDA graphs reading the KV in place, and the same with any SDPA kernel
           (cuDNN's included); beside the memory floor (weight bytes + live KV bytes, over
           the measured device copy bandwidth)
  greedy   the engine's greedy outputs on held-out prompts: graphs vs eager, each prompt
           alone vs in a full batch, and graphs with any SDPA kernel vs eager, in fp32 and
           bf16 (token-for-token identical counts)
  engine   the serving engine alone (no HTTP), 128 requests in flight (closed loop), prompts of
           128-512 held-out tokens, 64 new tokens: tokens/s, ms per step and graph-capture
           time, with the server's defaults, a 512-token prefill chunk, without the prefix
           cache, and without graphs
  hf       Hugging Face `generate` on the same architecture and batch (the reference)
  http     serve_api.py + bench_serve.py: 128 concurrent users, 64 new tokens, p50/p95, TTFT
  train    train.py under torchrun on one GPU, the 124M config: tokens/s and MFU

Each section runs in its own process under a time limit, so a crash, a CUDA error (which
poisons the process's context) or a hang costs that section only; the report is rewritten
after each one, so an interrupted run keeps what it measured. A section that cannot run
(a package missing on the machine, no dataset) records why. `--smoke` runs the decode, greedy,
engine and hf sections at toy sizes on CPU: that is how the tests check the plumbing without a GPU.
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

import numpy as np
import torch

from cuda_graphs import DecodeGraphs
from model import GPT, GPTConfig, load_checkpoint, model_checkpoint, save_checkpoint
from tokenizer import N_VOCAB, TOKENIZER_NAME

GPT2_124M = GPTConfig()  # the defaults are GPT-2 124M (12 x 768, context 1024, padded vocab)
TOY = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)
SECTIONS = ("decode", "greedy", "engine", "hf", "http", "train")
SECTION_TIMEOUT_S = {"decode": 120, "greedy": 100, "engine": 120, "hf": 90, "http": 180, "train": 240}
HERE = os.path.dirname(os.path.abspath(__file__))


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
    src = torch.randn(n_bytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), 10, device)
    return 2 * n_bytes / (ms / 1000)


def random_model(config: GPTConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    return GPT(config).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- sections


def decode_variants(device: torch.device) -> dict[str, dict]:
    """DecodeGraphs settings compared per row; graphs need CUDA."""
    variants = {"eager": dict(capture=False, in_place=True)}
    if device.type == "cuda":
        variants.update(graphs_gather=dict(capture=True, in_place=False), graphs=dict(capture=True, in_place=True),
                        graphs_any_sdpa=dict(capture=True, in_place=True, attention="any"))
    return variants


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
            for key, options in decode_variants(device).items():
                runner = DecodeGraphs(model, cache, batch, **options)
                ms = timed_ms(lambda: runner.decode(tokens, slots, positions), iters, device)
                row[f"{key}_ms"], row[f"{key}_tok_s"] = round(ms, 4), round(batch * 1000 / ms, 1)
            floor_s = (weight_bytes + batch * context * kv_per_token) / bandwidth
            row["floor_ms"] = round(floor_s * 1000, 4)
            rows.append(row)
            print(f"decode batch {batch:4d} context {context:5d}: " +
                  ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith(("_ms", "_tok_s"))), flush=True)
        del cache
    return {"dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "rows": rows}


def held_out_prompts(data_dir: str, n: int, lengths: tuple[int, int], seed: int = 0) -> tuple[list[list[int]], str]:
    """(n prompts of lengths in the range from seeded random places in val.bin, where they
    came from); random token ids when there is no val.bin."""
    rng = np.random.default_rng(seed)
    path = os.path.join(data_dir, "val.bin")
    if os.path.isfile(path):
        tokens, source = np.memmap(path, dtype=np.uint16, mode="r"), path
    else:
        tokens, source = rng.integers(0, N_VOCAB, 100_000).astype(np.uint16), "random ids"
    sizes = rng.integers(lengths[0], lengths[1] + 1, n)
    starts = rng.integers(0, len(tokens) - lengths[1], n)
    return [tokens[s : s + k].astype(np.int64).tolist() for s, k in zip(starts, sizes)], source


def greedy_outputs(model, prompts: list[list[int]], new_tokens: int, graphs: bool, alone: bool,
                   graph_attention: str = "portable") -> list[list[int]]:
    """Greedy completions from one engine: all prompts batched together, or one at a time."""
    from engine import Engine, EngineConfig, SamplingParams
    engine = Engine(model, EngineConfig(max_batch=len(prompts), cuda_graphs=graphs, prefix_cache=False,
                                        graph_attention=graph_attention))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    try:
        if alone:
            return [engine.generate([p], params)[0].token_ids for p in prompts]
        return [c.token_ids for c in engine.generate(prompts, params)]
    finally:
        engine.shutdown()


def greedy_section(ckpt: str, data_dir: str, device: torch.device, dtypes: list[torch.dtype], n_prompts: int,
                   new_tokens: int) -> dict:
    if os.path.isfile(ckpt):
        model, _ = load_checkpoint(ckpt, device)
        source = ckpt
    else:
        model, source = random_model(TOY, device, torch.float32), "random toy weights"
    length = min(192, model.config.block_size // 2)
    prompts, prompt_source = held_out_prompts(data_dir, n_prompts, (length, length))
    result = {"model": source, "prompts": prompt_source, "n_prompts": n_prompts, "new_tokens": new_tokens}
    graphs = device.type == "cuda"
    for dtype in dtypes:
        model = model.to(dtype)
        batched = greedy_outputs(model, prompts, new_tokens, graphs, alone=False)
        eager = greedy_outputs(model, prompts, new_tokens, False, alone=False)
        alone = greedy_outputs(model, prompts, new_tokens, graphs, alone=True)
        any_sdpa = greedy_outputs(model, prompts, new_tokens, graphs, alone=False, graph_attention="any")
        same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
        result[str(dtype).removeprefix("torch.")] = {
            "graphs": graphs, "graphs_vs_eager_identical": same(batched, eager),
            "alone_vs_batched_identical": same(alone, batched),
            "graphs_any_sdpa_vs_eager_identical": same(any_sdpa, eager), "of": n_prompts}
        print(f"greedy {dtype}: {result[str(dtype).removeprefix('torch.')]}", flush=True)
    return result


def closed_loop_tokens_per_s(model, config, prompts: list[list[int]], in_flight: int, new_tokens: int) -> dict:
    """The engine driven step by step (as engine_process.py does), keeping `in_flight`
    requests running until the prompts run out."""
    from engine import Engine, SamplingParams
    engine = Engine(model, config)
    started = time.perf_counter()
    engine.prepare()  # the graph captures, timed: the server's start-up pays them
    prepare_s = time.perf_counter() - started
    params, waiting = SamplingParams(max_tokens=new_tokens, temperature=0.0), list(prompts)
    running = [engine.submit(waiting.pop(), params) for _ in range(min(in_flight, len(waiting)))]
    tokens, steps, started = 0, 0, time.perf_counter()
    while not engine.idle:
        engine.step()
        steps += 1
        for handle in [h for h in running if h.done]:
            tokens += handle.result().completion_tokens
            running.remove(handle)
            if waiting:
                running.append(engine.submit(waiting.pop(), params))
    seconds = time.perf_counter() - started
    return {"tok_s": round(tokens / seconds, 1), "ms_per_step": round(seconds * 1000 / steps, 3), "steps": steps,
            "tokens": tokens, "prepare_s": round(prepare_s, 2)}


def engine_section(config: GPTConfig, device: torch.device, dtype: torch.dtype, data_dir: str, in_flight: int,
                   n_requests: int, new_tokens: int) -> dict:
    from engine import EngineConfig, default_prefill_chunk
    model = random_model(config, device, dtype)
    longest = min(512, config.block_size - new_tokens)  # 128-512 tokens, as make bench sends; less on a toy model
    prompts, _ = held_out_prompts(data_dir, n_requests, (min(128, longest // 2), longest))
    base = dict(max_batch=in_flight, max_waiting=n_requests, max_queue_wait_s=600.0,
                prefill_chunk=default_prefill_chunk(device))
    result = {"in_flight": in_flight, "requests": n_requests, "new_tokens": new_tokens,
              "prefill_chunk": base["prefill_chunk"]}
    for name, options in {"default": {}, "prefill_chunk_512": dict(prefill_chunk=512),
                          "no_prefix_cache": dict(prefix_cache=False), "no_graphs": dict(cuda_graphs=False)}.items():
        options = {**base, **options}
        result[name] = closed_loop_tokens_per_s(model, EngineConfig(**options), prompts, in_flight, new_tokens)
        print(f"engine {name}: {result[name]}", flush=True)
    return result


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
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 200, cwd=HERE)
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        reports = [f for f in os.listdir(tmp) if f.startswith("results-") and f.endswith(".json")]
        if done.returncode != 0 or not reports:
            return {"error": f"bench_serve.py exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
        with open(os.path.join(tmp, reports[0])) as f:
            report = json.load(f)
    return {"users": users, "new_tokens": new_tokens, "command": " ".join(command[1:]), "report": report}


def train_section(data_dir: str, iters: int) -> dict:
    if not os.path.isfile(os.path.join(data_dir, "train.bin")):
        return {"skipped": f"{data_dir}/train.bin missing (run make data, or carry data/)"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                   "config/train_code_assistant.py", f"--out_dir={tmp}", f"--max_iters={iters}",
                   f"--eval_interval={iters * 10}", "--eval_iters=1", "--log_interval=5", "--batch_size=16",
                   "--block_size=1024", "--gradient_accumulation_steps=1",
                   f"--data_dir={os.path.dirname(os.path.abspath(data_dir))}",
                   f"--dataset={os.path.basename(os.path.abspath(data_dir))}"]  # MFU: train.py's H100/H200 peak
        done = subprocess.run(command, capture_output=True, text=True, timeout=SECTION_TIMEOUT_S["train"] - 20,
                              cwd=HERE)
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", flush=True)
        log_path = os.path.join(tmp, "log.jsonl")
        records = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    steps = [r for r in records if r.get("kind") == "train"][2:]  # the first ones include compilation
    if done.returncode != 0 or not steps:
        return {"error": f"train.py exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    last = steps[-1]
    return {"command": " ".join(command[1:]), "tok_s": last["tok_per_s"], "mfu": last["mfu"],
            "ms_per_iter": last["ms_per_iter"], "tokens_per_iter": 16 * 1024}


def run_section(name: str, args) -> dict:
    """One section, in this process."""
    device = torch.device("cpu" if args.smoke else "cuda")
    config, dtype = (TOY, torch.float32) if args.smoke else (GPT2_124M, torch.bfloat16)
    if name == "decode":
        batches, contexts = ([1, 4], [32, 96]) if args.smoke else ([1, 32, 128, 256], [320, 1024])
        return decode_section(config, device, dtype, batches, contexts, 3 if args.smoke else 50)
    if name == "greedy":
        dtypes = [torch.float32] if args.smoke else [torch.float32, torch.bfloat16]
        return greedy_section(args.ckpt, args.data_dir, device, dtypes, 4 if args.smoke else 16,
                              4 if args.smoke else 48)
    if name == "engine":
        return engine_section(config, device, dtype, args.data_dir, 4 if args.smoke else 128,
                              8 if args.smoke else 256, 4 if args.smoke else 64)
    if name == "hf":
        return hf_section(config, device, dtype, 4 if args.smoke else 128, 16 if args.smoke else 256,
                          4 if args.smoke else 64)
    if name == "http":
        return {"skipped": "smoke run"} if args.smoke else http_section(config, args.data_dir, 128, 64, 20.0)
    return {"skipped": "smoke run"} if args.smoke else train_section(args.data_dir, 30)


def run_isolated(name: str, args) -> dict:
    """One section in a child process under its time limit; its failure is recorded, not raised."""
    limit = SECTION_TIMEOUT_S[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "section.json")
        command = [sys.executable, os.path.join(HERE, "gpu_check.py"), "--child-section", name, "--child-out", out,
                   "--data-dir", args.data_dir, "--ckpt", args.ckpt] + (["--smoke"] if args.smoke else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=HERE)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-2000:]
            return {"error": f"timed out after {limit} s",
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        print(done.stdout, end="", flush=True)
        if done.returncode != 0 or not os.path.isfile(out):
            print(done.stderr[-3000:], file=sys.stderr, flush=True)
            return {"error": f"exited {done.returncode}", "stderr_tail": done.stderr[-2000:]}
        with open(out) as f:
            result = json.load(f)
    result["section_s"] = round(time.perf_counter() - started, 1)
    return result


def write_json(path: str, data: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2)
    os.replace(f.name, path)


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")


def summary(result: dict) -> str:
    """The lines people read first: a table of the decode rows, then one line per section."""
    lines = []
    decode = result.get("decode", {})
    for row in decode.get("rows", []):
        lines.append(f"decode b{row['batch']:<4d} ctx{row['context']:<5d} " + "  ".join(
            f"{k.removesuffix('_tok_s')} {v:>10,.0f} tok/s" for k, v in row.items() if k.endswith("_tok_s"))
            + f"  floor {row['floor_ms']:.3f} ms")
    for name in ("greedy", "engine", "hf_generate", "http", "train"):
        section = dict(result.get(name, {}))
        if name == "http" and "report" in section:
            level = section.pop("report")["servers"]["engine"]["levels"][0]
            section = {k: level.get(k) for k in ("users", "ok", "errors", "rejected", "tokens_per_s", "latency_ms",
                                                 "ttft_ms", "client_procs", "client_bound")}
        section.pop("stderr_tail", None)
        lines.append(f"{name}: {json.dumps(section)[:600]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, run in this order")
    p.add_argument("--data-dir", default="data/python_code")
    p.add_argument("--ckpt", default="out-code-assistant/best.pt", help="the greedy section's model, if present")
    p.add_argument("--out-dir", default="bench")
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the plumbing, measures nothing")
    p.add_argument("--child-section", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_section:
        write_json(args.child_out, run_section(args.child_section, args))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise GpuCheckError(f"unknown sections {sorted(unknown)}")
    if not args.smoke and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device here: make gpu-check measures a GPU (--smoke checks the script on CPU)")
    name = gpu_name(torch.device("cpu" if args.smoke else "cuda"))
    result = {"gpu": name, "torch": torch.__version__, "started": datetime.now(timezone.utc).isoformat(),
              "model": vars(TOY if args.smoke else GPT2_124M).copy(), "smoke": args.smoke}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"gpu-{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    for section in sections:
        print(f"== {section}", flush=True)
        result["hf_generate" if section == "hf" else section] = run_isolated(section, args)
        write_json(path, result)  # after each section: an interrupted run keeps what it measured
    print(summary(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GpuCheckError as exc:
        print(f"gpu_check.py: {exc}", file=sys.stderr)
        sys.exit(2)
