"""Tests for evaluate.py: the metrics on hand-made cases, line sampling, prompt assembly, and
the CLI end to end on a tiny random model."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from evaluate import (Document, edit_similarity, exact_match, levenshtein, line_prompts, line_starts,
                      make_case, sample_cases)
from model import GPT, GPTConfig, load_checkpoint, model_checkpoint, quantize_int8, save_checkpoint
from tokenizer import EOT_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, TOKENIZER_NAME, load_tokenizer

SOURCE = '''import os


def walk(root):
    """Yield files."""
    for name in os.listdir(root):
\tif name.startswith("."):
            continue
        yield name   
'''


# ----------------------------------------------------------------------------- metrics


def test_levenshtein_and_edit_similarity_on_known_pairs():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2  # difflib's ratio would say otherwise
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "") == 1.0  # an empty line predicted empty is right
    assert edit_similarity("", "return x") == 0.0 and edit_similarity("return x", "") == 0.0
    assert edit_similarity("abc", "xyz") == 0.0 and edit_similarity("return x", "return x") == 1.0


def test_exact_match_ignores_only_trailing_whitespace():
    assert exact_match("return x  ", "return x")
    assert not exact_match(" return x", "return x")  # an extra indentation space is wrong
    assert not exact_match("return", "return x") and exact_match("", "")


# ----------------------------------------------------------------------------- line sampling


def test_line_starts_are_after_the_indentation_of_code_lines_with_code_before():
    starts = line_starts(SOURCE)
    lines = [SOURCE[s:].split("\n", 1)[0] for s in starts]
    # The first line has nothing before it; blank lines are never targets.
    assert lines == ["def walk(root):", '"""Yield files."""', "for name in os.listdir(root):",
                     'if name.startswith("."):', "continue", "yield name   "]
    assert all(SOURCE[s - 1] in " \t\n" for s in starts)
    assert line_starts("x = 1\n\x0cy = 2\u2028z\n") == [7]  # only "\n" ends a line; \f indents


def test_a_case_is_prefix_with_indentation_target_and_suffix():
    doc = Document("walk.py", SOURCE)
    start = SOURCE.index("continue")
    case = make_case(doc, start)
    assert case.prefix.endswith('"."):\n            ') and case.target == "continue"
    assert case.suffix.startswith("\n        yield") and case.line == 8
    assert case.prefix + "continue" + case.suffix == SOURCE
    last = make_case(doc, SOURCE.index("yield"))
    assert last.target == "yield name" and last.suffix == "\n"  # trailing whitespace stripped


def test_sampling_is_seeded_and_without_replacement():
    docs = [Document(f"f{i}.py", SOURCE) for i in range(5)]
    a, b = sample_cases(docs, 20, seed=1), sample_cases(docs, 20, seed=1)
    assert [(c.path, c.line) for c in a] == [(c.path, c.line) for c in b]
    assert len({(c.path, c.line) for c in a}) == 20
    assert [(c.path, c.line) for c in sample_cases(docs, 20, seed=2)] != [(c.path, c.line) for c in a]
    assert len(sample_cases(docs, 1000, seed=0)) == 30  # capped at what exists


# ----------------------------------------------------------------------------- prompts


def test_line_prompt_is_the_left_truncated_prefix_and_fim_prompts_hold_the_markers_in_order():
    enc = load_tokenizer()
    case = make_case(Document("walk.py", SOURCE), SOURCE.index("continue"))
    prefix_ids, suffix_ids = enc.encode_ordinary(case.prefix), enc.encode_ordinary(case.suffix)

    [plain] = line_prompts([case], enc, 10, fim=False, layout="spm")
    assert plain == prefix_ids[-10:]
    assert not {FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID} & set(plain)

    [spm] = line_prompts([case], enc, 200, fim=True, layout="spm")
    assert spm == [FIM_PREFIX_ID, FIM_SUFFIX_ID, *suffix_ids, FIM_MIDDLE_ID, *prefix_ids]
    [psm] = line_prompts([case], enc, 200, fim=True, layout="psm")
    assert psm == [FIM_PREFIX_ID, *prefix_ids, FIM_SUFFIX_ID, *suffix_ids, FIM_MIDDLE_ID]
    # Truncated, a FIM prompt keeps its markers and the text nearest the cursor.
    [short] = line_prompts([case], enc, 24, fim=True, layout="spm")
    assert len(short) <= 24 and short[:2] == [FIM_PREFIX_ID, FIM_SUFFIX_ID] and short[-1] == prefix_ids[-1]
    assert short.index(FIM_MIDDLE_ID) > 1


# ----------------------------------------------------------------------------- the CLI


def write_dataset(data_dir, docs: list[str]) -> None:
    os.makedirs(data_dir, exist_ok=True)
    enc = load_tokenizer()
    tokens = []
    with open(os.path.join(data_dir, "val_docs.jsonl"), "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"path": f"doc{i}.py", "text": text}) + "\n")
            tokens += enc.encode_ordinary(text) + [EOT_ID]
    np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(data_dir, "val.bin"))
    meta = {"tokenizer": "p50k_edit", "chars": {"val": sum(map(len, docs))}, "val_tokens": len(tokens)}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    docs = [SOURCE.replace("walk", f"walk{i}") * 3 for i in range(6)]
    write_dataset(root / "data" / "tiny", docs)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).eval()
    ckpt = model_checkpoint(model, TOKENIZER_NAME, dataset="tiny",
                            config={"dataset": "tiny", "data_dir": str(root / "data")})
    save_checkpoint(str(root / "best.pt"), ckpt)
    int8 = quantize_int8(model)
    save_checkpoint(str(root / "int8.pt"), {**ckpt, "model": int8.state_dict(), "quantization": "int8-weight-only"})
    rc = evaluate.main(["--ckpt", str(root / "best.pt"), "--compare", str(root / "int8.pt"), "--samples", "6",
                        "--fim-samples", "4", "--max-new-tokens", "6", "--latency-samples", "2", "--quiet"])
    assert rc == 0
    return root, json.loads((root / "eval.json").read_text())


def test_cli_report_covers_both_checkpoints_on_the_same_cases(tiny_run):
    _, report = tiny_run
    fp32, int8 = report["runs"]
    assert fp32["quantization"] == "none" and int8["quantization"] == "int8-weight-only"
    assert len(report["cases"]) == 6
    for run in (fp32, int8):
        assert run["line"]["n"] == 6 and run["fim"]["n"] == 4
        assert len(run["line"]["predictions"]) == 6 and run["latency"]["samples"] == 2
        assert run["latency"]["p95_s"] >= run["latency"]["p50_s"] > 0 and run["line"]["tokens_per_s"] > 0
        # The scores are those of the predictions shown.
        targets = [c["target"] for c in report["cases"]]
        em = np.mean([p == t for p, t in zip(run["line"]["predictions"], targets)])
        es = np.mean([edit_similarity(p, t) for p, t in zip(run["line"]["predictions"], targets)])
        assert run["line"]["exact_match"] == pytest.approx(em) and run["line"]["edit_similarity"] == pytest.approx(es)


def test_cli_val_loss_and_bits_per_character(tiny_run):
    root, report = tiny_run
    fp32 = report["runs"][0]
    tokens = np.fromfile(root / "data" / "tiny" / "val.bin", dtype=np.uint16).astype(np.int64)
    meta = json.loads((root / "data" / "tiny" / "meta.json").read_text())
    model, _ = load_checkpoint(str(root / "best.pt"))
    # The whole (small) split fits: windows of block_size, evenly spaced from start to end.
    n = (len(tokens) - 1) // 128
    starts = np.linspace(0, len(tokens) - 129, n).astype(int)
    with torch.no_grad():
        losses = [F.cross_entropy(model.lm_head(model._hidden_states(torch.tensor(tokens[s : s + 128])[None],
                                                                     torch.arange(128)))[0],
                                  torch.tensor(tokens[s + 1 : s + 129])) for s in starts]
    expected = float(torch.stack(losses).mean())
    assert fp32["val"]["loss"] == pytest.approx(expected, rel=1e-4)
    assert fp32["val"]["bpc"] == pytest.approx(expected * len(tokens) / meta["chars"]["val"] / math.log(2), rel=1e-4)
    assert abs(report["runs"][1]["val"]["loss"] - expected) / expected < 0.01


def test_cli_on_a_source_tree(tmp_path, tiny_run):
    root, _ = tiny_run
    (tmp_path / "repo" / "pkg").mkdir(parents=True)
    (tmp_path / "repo" / ".venv").mkdir()
    (tmp_path / "repo" / "pkg" / "walk.py").write_text(SOURCE)
    (tmp_path / "repo" / ".venv" / "vendored.py").write_text("x = 1\n" * 50)
    (tmp_path / "repo" / "notes.txt").write_text("not python\n")
    out = tmp_path / "eval.json"
    assert evaluate.main(["--ckpt", str(root / "best.pt"), "--src", str(tmp_path / "repo"), "--samples", "3",
                          "--max-new-tokens", "4", "--latency-samples", "1", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert {c["path"] for c in report["cases"]} == {os.path.join("pkg", "walk.py")}
    assert report["runs"][0]["val"]["source"] == str(tmp_path / "repo")


def test_bad_inputs_exit_nonzero_with_one_line(tmp_path, tiny_run, capsys):
    root, _ = tiny_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"nope")
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], "not found"),
        (["--ckpt", str(garbage)], "not a readable checkpoint"),
        (["--ckpt", str(root / "best.pt"), "--data-dir", str(tmp_path)], "val_docs.jsonl not found"),
        (["--ckpt", str(root / "best.pt"), "--src", str(tmp_path / "empty")], "not a directory"),
    ]
    for args, message in cases:
        assert evaluate.main(args + ["--out", str(tmp_path / "eval.json"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "eval.json").exists()
