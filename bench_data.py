"""Benchmark of stage 1: wall time of collect_code.py on the default corpus (the standard
library), and tokens per character of our Codex tokenizer against GPT-2's on the same files.

    python bench_data.py [--workers N]      (make bench-data)

Prints a table and writes bench/data-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import tiktoken

import collect_code
from tokenizer import EOT_ID, build_p50k_ranks, load_tokenizer


def gpt2_encoding(p50k: tiktoken.Encoding) -> tiktoken.Encoding:
    """GPT-2's own encoding = p50k's ranks without the whitespace runs (same files, same hash
    check), so the comparison needs no download either."""
    ranks = {tok: rank for tok, rank in build_p50k_ranks().items() if rank < EOT_ID}
    return tiktoken.Encoding("gpt2", pat_str=p50k._pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID})


def kept_texts(roots: list[str]) -> list[str]:
    texts, seen = [], set()
    for path, _ in collect_code.list_files(roots):
        with open(path, "rb") as f:
            reason, text = collect_code.reject_reason(f.read())
        if reason is None and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    roots = collect_code.default_roots()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        meta = collect_code.collect(roots, os.path.join(tmp, "ds"), collect_code.Settings(fim_rate=0.0),
                                    args.workers)
        wall = time.perf_counter() - started
    texts = kept_texts(roots)
    p50k = load_tokenizer()
    chars = sum(map(len, texts))
    ours = sum(map(len, p50k.encode_ordinary_batch(texts, num_threads=args.workers)))
    gpt2 = sum(map(len, gpt2_encoding(p50k).encode_ordinary_batch(texts, num_threads=args.workers)))
    result = {"workers": args.workers, "collect_wall_s": round(wall, 2), "files": meta["files_kept"],
              "chars": chars, "p50k_tokens": ours, "gpt2_tokens": gpt2,
              "p50k_tokens_per_char": round(ours / chars, 4), "gpt2_tokens_per_char": round(gpt2 / chars, 4),
              "p50k_over_gpt2": round(ours / gpt2, 3)}
    for key, value in result.items():
        print(f"{key:>22}  {value:,}" if isinstance(value, int) else f"{key:>22}  {value}")
    os.makedirs("bench", exist_ok=True)
    path = time.strftime("bench/data-%Y%m%d-%H%M%S.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
