"""gpu_check.py's plumbing on CPU (--smoke: toy sizes); the measurements themselves need a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_a_report_with_every_section_field(tmp_path, capsys):
    """Each section runs in its own process (a CUDA error must not take the others down)."""
    assert gpu_check.main(["--smoke", "--sections", "decode,greedy,engine,hf", "--out-dir", str(tmp_path),
                           "--ckpt", str(tmp_path / "none.pt"), "--data-dir", str(tmp_path)]) == 0
    [report_file] = [f for f in os.listdir(tmp_path) if f.startswith("gpu-cpu-") and f.endswith(".json")]
    report = json.loads((tmp_path / report_file).read_text())
    assert report["smoke"] is True and report["gpu"] == "cpu"
    rows = report["decode"]["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 32), (1, 96), (4, 32), (4, 96)]
    for row in rows:
        assert row["eager_ms"] > 0 and row["floor_ms"] > 0
        assert row["eager_tok_s"] == pytest.approx(row["batch"] * 1000 / row["eager_ms"], rel=1e-3)
        assert "graphs_ms" not in row  # no graphs without CUDA
    assert report["decode"]["copy_bandwidth_gb_s"] > 0
    hf = report["hf_generate"]
    assert hf["batch"] == 4 and hf["ms_per_step"] > 0
    greedy = report["greedy"]
    assert greedy["model"] == "random toy weights" and greedy["prompts"] == "random ids"
    assert greedy["float32"] == {"graphs": False, "graphs_vs_eager_identical": 4, "alone_vs_batched_identical": 4,
                                 "graphs_any_sdpa_vs_eager_identical": 4, "of": 4}
    engine = report["engine"]
    assert (engine["in_flight"], engine["requests"], engine["new_tokens"], engine["prefill_chunk"]) == (4, 8, 4, 512)
    for variant in ("default", "prefill_chunk_512", "no_prefix_cache", "no_graphs"):  # each request ran to its limit
        assert engine[variant]["tokens"] == 8 * 4 and engine[variant]["tok_s"] > 0 and engine[variant]["steps"] >= 4
        assert engine[variant]["prepare_s"] >= 0
    assert all(report[name]["section_s"] > 0 for name in ("decode", "greedy", "engine", "hf_generate"))
    printed = capsys.readouterr().out
    assert "decode b4    ctx96" in printed and "greedy: " in printed


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    done = subprocess.run([sys.executable, "gpu_check.py", "--smoke", "--sections", "greedy,hf", "--out-dir",
                           str(tmp_path), "--ckpt", __file__, "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [report_file] = os.listdir(tmp_path)
    report = json.loads((tmp_path / report_file).read_text())
    assert report["greedy"]["error"] == "exited 1"  # a .py file is no checkpoint
    assert "CheckpointError" in report["greedy"]["stderr_tail"]
    assert report["hf_generate"]["ms_per_step"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path):
    done = subprocess.run([sys.executable, "gpu_check.py", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check.py: no CUDA device here: make gpu-check measures a GPU "
                                   "(--smoke checks the script on CPU)")
    assert os.listdir(tmp_path) == []


def test_unknown_sections_are_refused():
    with pytest.raises(gpu_check.GpuCheckError, match="unknown sections"):
        gpu_check.main(["--smoke", "--sections", "decode,warp-drive"])
