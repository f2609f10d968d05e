"""Evaluate a checkpoint (float or int8) on held-out code, generating through engine.Engine
exactly as the server does, so what is measured is what is served.

    python evaluate.py --ckpt out-code-assistant/best.pt [--compare out-code-assistant/ckpt_int8.pt]
                       [--data-dir data/python_code | --src DIR] [--samples 200] [--fim-samples 200]
                       [--seed 0] [--out FILE]

Measures, per checkpoint (METHOD below says how):
  validation loss and bits per character; line completion and single-line infilling (exact
  match, edit similarity); latency at batch 1 and throughput of the batched runs.
Writes out_dir/eval.json (out_dir = the checkpoint's directory) and prints a table.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from engine import Engine, EngineConfig, SamplingParams, build_prompt_ids
from model import CheckpointError, GPT, evenly_spaced_windows, load_checkpoint, mean_loss, resolve_output_dtype
from tokenizer import DEFAULT_FIM_LAYOUT, EOT_ID, FIM_LAYOUTS, TOKENIZER_NAME, TokenizerError, load_tokenizer

LOSS_BATCH = 8
METHOD = """\
  val loss / bpc   mean nats per token over evenly spaced block_size windows of val.bin (each
                   window's tokens predicted from the window's earlier tokens), and bits per
                   character = nats/token x tokens/char / ln 2, tokens/char of the whole split:
                   val.bin's length (one <|endoftext|> per file included: it encodes where a
                   file ends) over meta.json's val character count. With --src the files are
                   tokenized here the same way.
  line completion  CodeXGLUE line-level style: at sampled line starts, after the indentation,
                   the prompt is the preceding code (left-truncated to the context minus the
                   generation budget) and ends with that indentation; greedy generation until
                   end of line; exact match and edit similarity against the true line with its
                   trailing whitespace stripped. Token healing stays on, as served.
  FIM              the same lines, with the code after the line given as the suffix through
                   the FIM tokens (engine.build_prompt_ids).
  latency          p50/p95 seconds per completion at batch 1 (a fresh engine, one request at a
                   time), and tokens/s of the batched runs.
"""
SKIPPED_DIRS = {".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules", "build", "dist", ".tox"}


class EvalError(Exception):
    """Bad input; one line for the CLI."""


# ----------------------------------------------------------------------------- metrics


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(prediction: str, target: str) -> float:
    """1 - Levenshtein / max(len): 1.0 for equal strings (two empty ones included), 0.0 when
    nothing is shared."""
    longest = max(len(prediction), len(target))
    return 1.0 if longest == 0 else 1.0 - levenshtein(prediction, target) / longest


def exact_match(prediction: str, target: str) -> bool:
    return prediction.rstrip() == target.rstrip()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ----------------------------------------------------------------------------- held-out code


@dataclass
class Document:
    path: str
    text: str


@dataclass
class LineCase:
    """One evaluation line: prefix ends with the line's indentation; target is the rest of
    the line without trailing whitespace; suffix is everything after the line (from its '\\n')."""

    path: str
    line: int  # 1-based
    prefix: str
    target: str
    suffix: str


def read_val_docs(path: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, row in enumerate(f, 1):
            try:
                obj = json.loads(row)
                docs.append(Document(str(obj["path"]), str(obj["text"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise EvalError(f"{path}:{n}: not a {{'path', 'text'}} JSON object ({exc})") from None
    return docs


def read_source_tree(root: str) -> list[Document]:
    """The .py files under root (sorted, so the sample is stable), skipping VCS/venv/build dirs
    and files that are not UTF-8."""
    if not os.path.isdir(root):
        raise EvalError(f"--src {root}: not a directory")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                if text.strip():
                    docs.append(Document(os.path.relpath(path, root), text))
    if not docs:
        raise EvalError(f"--src {root}: no readable .py files")
    return docs


def line_starts(text: str) -> list[int]:
    """Offsets where a line's code begins (after its indentation): lines with code, and with
    some code before them, since a prompt must have something to continue."""
    starts, offset, code_before = [], 0, False
    for line in text.split("\n"):  # not splitlines(): it also splits at form feeds and the like
        content = line.lstrip(" \t\x0c")  # a form feed counts as indentation in Python
        if content.strip():
            if code_before:
                starts.append(offset + len(line) - len(content))
            code_before = True
        offset += len(line) + 1
    return starts


def make_case(doc: Document, start: int) -> LineCase:
    end = doc.text.find("\n", start)
    end = len(doc.text) if end < 0 else end
    return LineCase(doc.path, doc.text.count("\n", 0, start) + 1, doc.text[:start],
                    doc.text[start:end].rstrip(), doc.text[end:])


def sample_cases(docs: list[Document], n: int, seed: int) -> list[LineCase]:
    """n line starts drawn uniformly (without replacement) from every line of every document."""
    candidates = [(d, s) for d, doc in enumerate(docs) for s in line_starts(doc.text)]
    if not candidates:
        raise EvalError("no lines to evaluate in the held-out files")
    picked = random.Random(seed).sample(candidates, min(n, len(candidates)))
    return [make_case(docs[d], s) for d, s in picked]


# ----------------------------------------------------------------------------- loss


@dataclass
class TokenStream:
    tokens: np.ndarray
    tokens_per_char: float
    source: str


def dataset_stream(data_dir: str) -> TokenStream:
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("tokenizer") != TOKENIZER_NAME:
        raise EvalError(f"{data_dir} was tokenized with {meta.get('tokenizer')!r}, not {TOKENIZER_NAME!r}")
    tokens = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    return TokenStream(tokens, len(tokens) / max(1, meta["chars"]["val"]), os.path.join(data_dir, "val.bin"))


def docs_stream(docs: list[Document], enc, source: str) -> TokenStream:
    """The documents tokenized as collect_code.py does for val.bin: each followed by <|endoftext|>."""
    ids = []
    for doc in docs:
        ids += enc.encode_ordinary(doc.text) + [EOT_ID]
    return TokenStream(np.asarray(ids, dtype=np.int64), len(ids) / sum(len(d.text) for d in docs), source)


def loss_windows(stream: TokenStream, block_size: int, max_tokens: int) -> torch.Tensor:
    """Evenly spaced (n, T + 1) windows, T = block_size (less for a tiny stream)."""
    length = min(block_size, len(stream.tokens) - 1)
    if length < 1:
        raise EvalError(f"{stream.source}: too few tokens to measure a loss")
    return evenly_spaced_windows(stream.tokens, length, max_tokens)


# ----------------------------------------------------------------------------- generation


@dataclass
class Settings:
    max_new_tokens: int = 48
    max_batch: int = 32
    fim_layout: str = DEFAULT_FIM_LAYOUT
    latency_samples: int = 8


def line_prompts(cases: list[LineCase], enc, max_prompt_tokens: int, fim: bool, layout: str) -> list[list[int]]:
    return [build_prompt_ids(enc, c.prefix, c.suffix if fim else None, max_prompt_tokens, layout) for c in cases]


def greedy_line_params(settings: Settings) -> SamplingParams:
    return SamplingParams(max_tokens=settings.max_new_tokens, temperature=0.0, stop=("\n",))


def make_engine(model: GPT, enc, device, settings: Settings, max_batch: int) -> Engine:
    # Queue waits unbounded: an offline run submits far more than the server admits at once.
    config = EngineConfig(max_batch=max_batch, max_context=model.config.block_size, max_queue_wait_s=1e9)
    return Engine(model, config, enc=enc, device=device).start()


def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams, desc: str, progress: bool):
    """Completions in order, submitted all at once (the engine batches them), with a progress bar."""
    handles, done = [], []
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for prompt in prompts:
            while engine.num_waiting >= engine.config.max_waiting:
                _collect(handles, done, bar, block=True)
            handles.append(engine.submit(prompt, params))
            _collect(handles, done, bar, block=False)
        while len(done) < len(prompts):
            _collect(handles, done, bar, block=True)
    failed = [c.error for c in done if c.error]
    if failed:
        raise EvalError(f"{len(failed)} completions failed in the engine: {failed[0]}")
    return done


def _collect(handles, done, bar, block: bool) -> None:
    """Move finished completions, in submission order, from handles to done."""
    index = len(done)
    while index < len(handles) and (handles[index].done or block):
        done.append(handles[index].result())
        bar.update(1)
        index += 1
        block = False


def score(cases: list[LineCase], completions) -> dict:
    predictions = [c.text.rstrip() for c in completions]
    em = [exact_match(p, c.target) for p, c in zip(predictions, cases)]
    es = [edit_similarity(p, c.target) for p, c in zip(predictions, cases)]
    return dict(n=len(cases), exact_match=sum(em) / len(cases), edit_similarity=sum(es) / len(cases),
                predictions=predictions)


def measure_latency(model, enc, device, prompts, params, settings) -> dict:
    """Batch-1 seconds per completion: one request at a time through a fresh engine."""
    engine = make_engine(model, enc, device, settings, max_batch=1)
    try:
        latencies = [engine.generate([p], params)[0].latency_s for p in prompts[: settings.latency_samples]]
    finally:
        engine.shutdown()
    return dict(samples=len(latencies), p50_s=percentile(latencies, 50), p95_s=percentile(latencies, 95))


def completion_task(model, enc, device, cases, prompts, settings, name, progress) -> dict:
    params = greedy_line_params(settings)
    engine = make_engine(model, enc, device, settings, settings.max_batch)
    try:
        start = time.perf_counter()
        completions = generate(engine, prompts, params, name, progress)
        wall = time.perf_counter() - start
    finally:
        engine.shutdown()
    result = score(cases, completions)
    result.update(wall_s=wall, completion_tokens=sum(c.completion_tokens for c in completions),
                  prompt_tokens=sum(c.prompt_tokens for c in completions))
    result["tokens_per_s"] = result["completion_tokens"] / wall if wall > 0 else float("nan")
    return result


# ----------------------------------------------------------------------------- one checkpoint


def evaluate_checkpoint(path: str, args, docs_source: dict, device, progress: bool) -> dict:
    model, ckpt = load_checkpoint(path, device)
    if ckpt.get("tokenizer", TOKENIZER_NAME) != TOKENIZER_NAME:
        raise EvalError(f"{path}: tokenizer {ckpt['tokenizer']!r}, this code speaks {TOKENIZER_NAME!r}")
    model.set_output_dtype(resolve_output_dtype(args.output_dtype, model, device))  # as serve_api.py serves it
    enc = load_tokenizer()
    settings = Settings(args.max_new_tokens, args.batch, args.fim_layout, args.latency_samples)
    block_size = model.config.block_size
    max_prompt = block_size - settings.max_new_tokens
    if max_prompt < 8:
        raise EvalError(f"block_size {block_size} leaves no room for prompts with --max-new-tokens "
                        f"{settings.max_new_tokens}")
    cases = docs_source["cases"]
    line_cases, fim_cases = cases[: args.samples], cases[: args.fim_samples]
    stream = docs_source["stream"] or docs_stream(docs_source["docs"], enc, args.src)
    windows = loss_windows(stream, block_size, args.val_tokens)
    bar = functools.partial(tqdm, desc="val loss", leave=False) if progress else None
    loss = mean_loss(model, windows, device, LOSS_BATCH, bar)
    line_prompt_ids = line_prompts(line_cases, enc, max_prompt, False, settings.fim_layout)
    fim_prompt_ids = line_prompts(fim_cases, enc, max_prompt, True, settings.fim_layout)
    params = greedy_line_params(settings)
    result = dict(
        checkpoint=path, quantization=ckpt.get("quantization") or "none", device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), model_args=ckpt["model_args"],
        output_dtype=model.output_dtype_name,
        val=dict(loss=loss, bpc=loss * stream.tokens_per_char / math.log(2), tokens=int(windows[:, 1:].numel()),
                 tokens_per_char=stream.tokens_per_char, source=stream.source),
        latency=measure_latency(model, enc, device, line_prompt_ids, params, settings),
        line=completion_task(model, enc, device, line_cases, line_prompt_ids, settings, "line", progress),
        fim=completion_task(model, enc, device, fim_cases, fim_prompt_ids, settings, "fim", progress))
    return result


def held_out(args, ckpt_path: str) -> dict:
    """The held-out documents, the sampled cases and (for a dataset) the val.bin stream."""
    if args.src:
        docs = read_source_tree(args.src)
        stream = None  # tokenized per run (cheap) once the tokenizer is loaded
    else:
        data_dir = args.data_dir or dataset_dir_of(ckpt_path)
        for name in ("val_docs.jsonl", "val.bin", "meta.json"):
            if not os.path.isfile(os.path.join(data_dir, name)):
                raise EvalError(f"{os.path.join(data_dir, name)} not found (run `make data`, "
                                f"or pass --data-dir or --src)")
        docs = read_val_docs(os.path.join(data_dir, "val_docs.jsonl"))
        stream = dataset_stream(data_dir)
    cases = sample_cases(docs, max(args.samples, args.fim_samples), args.seed)
    return dict(docs=docs, stream=stream, cases=cases)


def dataset_dir_of(ckpt_path: str) -> str:
    """data/<dataset> as recorded by train.py (read without building the model)."""
    if not os.path.isfile(ckpt_path):
        raise EvalError(f"checkpoint not found: {ckpt_path}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - load_checkpoint gives the detailed reason later
        raise EvalError(f"{ckpt_path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise EvalError(f"{ckpt_path}: not a model checkpoint")
    config = ckpt.get("config") or {}
    dataset = ckpt.get("dataset") or config.get("dataset")
    if not dataset:
        raise EvalError(f"{ckpt_path} does not name its dataset; pass --data-dir or --src")
    return os.path.join(config.get("data_dir", "data"), dataset)


# ----------------------------------------------------------------------------- report


def print_table(runs: list[dict]) -> None:
    names = [os.path.basename(r["checkpoint"]) + ("" if r["quantization"] == "none" else f" ({r['quantization']})")
             for r in runs]
    rows = [
        ("val loss (nats/token)", lambda r: f"{r['val']['loss']:.4f}"),
        ("val bits/char", lambda r: f"{r['val']['bpc']:.4f}"),
        ("line exact match", lambda r: f"{100 * r['line']['exact_match']:.1f}%"),
        ("line edit similarity", lambda r: f"{100 * r['line']['edit_similarity']:.1f}"),
        ("FIM exact match", lambda r: f"{100 * r['fim']['exact_match']:.1f}%"),
        ("FIM edit similarity", lambda r: f"{100 * r['fim']['edit_similarity']:.1f}"),
        ("latency p50 / p95 (batch 1)", lambda r: f"{1e3 * r['latency']['p50_s']:.0f} / "
                                                  f"{1e3 * r['latency']['p95_s']:.0f} ms"),
        ("throughput (batched, tok/s)",
         lambda r: f"{r['line']['tokens_per_s']:,.0f} / {r['fim']['tokens_per_s']:,.0f}"),
    ]
    width = max(22, *(len(n) for n in names))
    print(f"\n{'':30}" + "".join(f"{n:>{width + 2}}" for n in names))
    for label, cell in rows:
        print(f"{label:30}" + "".join(f"{cell(r):>{width + 2}}" for r in runs))
    first = runs[0]
    print(f"({first['line']['n']} line / {first['fim']['n']} FIM samples, {first['val']['tokens']:,} loss tokens, "
          f"device {first['device']}; throughput = line / FIM runs)")


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run(args) -> dict:
    if min(args.samples, args.fim_samples, args.val_tokens, args.latency_samples, args.batch) < 1:
        raise EvalError("--samples, --fim-samples, --val-tokens, --latency-samples and --batch must be >= 1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    source = held_out(args, args.ckpt)
    paths = [args.ckpt] + ([args.compare] if args.compare else [])
    runs = [evaluate_checkpoint(p, args, source, device, progress=not args.quiet) for p in paths]
    cases = source["cases"]
    report = dict(
        settings=dict(samples=args.samples, fim_samples=args.fim_samples, seed=args.seed, src=args.src,
                      max_new_tokens=args.max_new_tokens, fim_layout=args.fim_layout, batch=args.batch,
                      val_tokens=args.val_tokens, torch=torch.__version__),
        method=METHOD,
        runs=runs,
        cases=[dict(path=c.path, line=c.line, target=c.target) for c in cases])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json")
    write_json(out, report)
    report["out"] = out
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint to evaluate (float or int8)")
    p.add_argument("--compare", help="a second checkpoint, evaluated on the same samples (e.g. the int8 one)")
    p.add_argument("--data-dir", help="dataset dir (val.bin, val_docs.jsonl, meta.json); default data/<its dataset>")
    p.add_argument("--src", help="evaluate on the .py files under this directory instead")
    p.add_argument("--samples", type=int, default=200, help="line-completion samples (default 200)")
    p.add_argument("--fim-samples", type=int, default=None, help="FIM samples (default: --samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report JSON (default: eval.json beside --ckpt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--output-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="output layer of the generation runs, as serve_api.py --output-dtype (the loss is "
                        "always computed in the weights' dtype)")
    p.add_argument("--val-tokens", type=int, default=32768, help="tokens for the loss (default 32768)")
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    p.add_argument("--batch", type=int, default=Settings.max_batch, help="engine max_batch for the batched runs")
    p.add_argument("--fim-layout", choices=FIM_LAYOUTS, default=Settings.fim_layout)
    p.add_argument("--latency-samples", type=int, default=Settings.latency_samples)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.fim_samples is None:
        args.fim_samples = args.samples
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (EvalError, CheckpointError, TokenizerError) as exc:
        print(f"evaluate.py: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print_table(report["runs"])
    print(f"wrote {report['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
