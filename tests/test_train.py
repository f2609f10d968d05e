"""train.py: loss falls, exact resume, preemption, DDP equivalence, strict config, bad input.

Runs train.py as a subprocess on tiny fabricated datasets (1-layer, 32-wide models over a
small vocabulary), so the whole file takes about a minute on two busy cores.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402
from model import load_checkpoint  # noqa: E402
from tokenizer import TOKENIZER_NAME  # noqa: E402

VOCAB = 96  # the test models' vocab_size; data tokens stay below it
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        f"--vocab_size={VOCAB}", "--compile=False", "--dtype=float32", "--device=cpu",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3"]
# One thread per process: faster on shared cores, and the same for every run compared.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def make_dataset(root, name="tiny", vocab=VOCAB - 6, n_train=30_000, n_val=5_000):
    """Tokens from a noisy chain (mostly next = 7*prev + 3 mod vocab): learnable in a few steps."""
    rng = np.random.default_rng(0)
    path = os.path.join(root, name)
    os.makedirs(path)
    for split, n in (("train", n_train), ("val", n_val)):
        tokens = np.empty(n, dtype=np.uint16)
        tokens[0] = 1
        noise = rng.random(n) < 0.1
        for i in range(1, n):
            tokens[i] = rng.integers(vocab) if noise[i] else (7 * tokens[i - 1] + 3) % vocab
        tokens.tofile(os.path.join(path, f"{split}.bin"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"tokenizer": TOKENIZER_NAME, "vocab_size": vocab, "fingerprint": "f00d"}, f)
    return str(root)


def run_train(*args, launcher=(sys.executable,), timeout=120):
    return subprocess.run([*launcher, "train.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        events = [json.loads(line) for line in f]
    return ([e for e in events if e["kind"] == "train"], [e for e in events if e["kind"] == "eval"])


@pytest.fixture
def data_dir(tmp_path):
    return make_dataset(tmp_path / "data")


def check_ok(result):
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- training behaviour


def test_loss_falls_and_outputs_are_written(data_dir, tmp_path):
    out = str(tmp_path / "out")
    check_ok(run_train(*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}",
                       "--max_iters=40", "--eval_interval=20"))
    steps, evals = read_log(out)
    assert [e["iter"] for e in steps] == list(range(1, 41))
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert all(e["tok_per_s"] > 0 and e["mfu"] > 0 for e in steps)
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    model, best = load_checkpoint(os.path.join(out, "best.pt"))  # what serving loads
    assert "optimizer" not in best and best["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert best["tokenizer"] == TOKENIZER_NAME and model.config.vocab_size == VOCAB
    os.remove(os.path.join(out, "loss.png"))  # the plot can be redrawn from the log alone (make plot)
    assert train.main(["--plot_only=True", f"--out_dir={out}"]) == 0
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_and_resumed_run_equals_uninterrupted(data_dir, tmp_path, optimizer):
    # dropout > 0: the resumed run must also continue the dropout RNG stream exactly; Muon's
    # momentum and AdamW's moments must come back from ckpt.pt exactly too
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--max_iters=20", "--eval_interval=10",
            "--dropout=0.1", f"--optimizer={optimizer}"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    check_ok(run_train(*args, f"--out_dir={whole}"))
    check_ok(run_train(*args, f"--out_dir={parts}", "--stop_at_iter=13"))
    assert torch.load(os.path.join(parts, "ckpt.pt"), weights_only=True)["iter_num"] == 13
    assert read_log(parts)[0][-1]["iter"] == 13
    with open(os.path.join(parts, "log.jsonl"), "a") as f:  # as if killed after its last checkpoint:
        f.write('{"kind": "train", "iter": 14, "loss": 9.0, "lr": 0.0}\n{"kind": "tra')  # stale + torn lines
    check_ok(run_train(*args, f"--out_dir={parts}", "--init_from=resume"))
    (steps_a, evals_a), (steps_b, evals_b) = read_log(whole), read_log(parts)
    assert [e["iter"] for e in steps_b] == list(range(1, 21))  # no step logged twice
    assert [e["loss"] for e in steps_b] == [e["loss"] for e in steps_a]
    assert [e["lr"] for e in steps_b] == [e["lr"] for e in steps_a]
    assert [(e["iter"], e["val_loss"]) for e in evals_b] == [(e["iter"], e["val_loss"]) for e in evals_a]


def test_sigterm_finishes_the_step_saves_and_exits_zero(data_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", "--dataset=tiny",
                             f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.time() + 90, 0
        while time.time() < deadline and seen < 3:
            time.sleep(0.2)
            if os.path.exists(os.path.join(out, "log.jsonl")):
                seen = max([e["iter"] for e in read_log(out)[0]], default=0)
        assert seen >= 3, "training made no progress"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    _, ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] >= seen
    assert ckpt["iter_num"] == read_log(out)[0][-1]["iter"]  # the step in flight finished and was saved
    assert "optimizer" in ckpt and ckpt["rng"]["data"].dtype == torch.uint8  # resumable


def test_two_process_ddp_matches_one_process(data_dir, tmp_path):
    """2 ranks x 2 micro-batches must reproduce 1 process x 4 micro-batches: same data, same
    gradients, same (globally averaged) logged losses."""
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--max_iters=4", "--eval_interval=2",
            "--batch_size=2", "--gradient_accumulation_steps=4"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    check_ok(run_train(*args, f"--out_dir={single}"))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    check_ok(run_train(*args, f"--out_dir={ddp}", launcher=torchrun, timeout=180))
    with open(os.path.join(ddp, "log.jsonl")) as f:
        assert json.loads(f.readline())["world_size"] == 2
    (steps_1, evals_1), (steps_2, evals_2) = read_log(single), read_log(ddp)
    assert [e["iter"] for e in steps_2] == [1, 2, 3, 4]
    for a, b in zip(steps_1, steps_2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    for a, b in zip(evals_1, evals_2, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
    assert steps_1[-1]["loss"] != pytest.approx(steps_1[0]["loss"], abs=1e-3)  # it did train


# ----------------------------------------------------------------------------- bad input


def test_wrong_type_is_a_one_line_error_naming_the_key():
    result = run_train("--batch_size=abc")
    assert result.returncode != 0
    assert "batch_size" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, key", [
    (["--compile=maybe"], "compile"),
    (["--learning_rate=fast"], "learning_rate"),
    (["--batch_size=4.0"], "batch_size"),
    (["--batch_size=True"], "batch_size"),
    (["--batch_sz=4"], "batch_sz"),
    (["--max_iters"], "--max_iters"),
    (["--dtype=float64"], "dtype"),
    (["--optimizer=sgd"], "optimizer"),
    (["--muon_lr_scale=0"], "muon_lr_scale"),
])
def test_config_errors_name_the_key(args, key, capsys):
    assert train.main(args) != 0
    assert key in capsys.readouterr().err


def test_config_file_unknown_key_names_key_and_file(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text("batch_size = 4\nlearning_rat = 1e-3\n")
    assert train.main([str(path)]) != 0
    err = capsys.readouterr().err
    assert "learning_rat" in err and "bad.py" in err and "learning_rate" in err  # with a suggestion


def test_config_file_values_overrides_and_ignored_names(tmp_path):
    path = tmp_path / "ok.py"
    path.write_text("import math\n_scale = 2\nbatch_size = 3 * _scale\nlearning_rate = 1\ncompile = False\n")
    cfg = train.parse_args([str(path), "--batch_size=5", "--out_dir=out-x", "--init_from='resume'"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.compile, cfg.out_dir) == (5, 1.0, False, "out-x")
    assert isinstance(cfg.learning_rate, float) and cfg.init_from == "resume"


def test_accumulation_must_divide_by_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.TrainError, match="gradient_accumulation_steps=3"):
        train.setup_runtime(train.TrainConfig(gradient_accumulation_steps=3, device="cpu"))


def test_shipped_configs():
    gpu = train.parse_args([os.path.join(REPO, "config/train_code_assistant.py")])
    ddp = train.parse_args([os.path.join(REPO, "config/train_code_assistant_ddp.py")])
    cpu = train.parse_args([os.path.join(REPO, "config/train_code_assistant_cpu.py")])
    assert (gpu.n_layer, gpu.n_embd, gpu.block_size, gpu.init_from) == (12, 768, 512, "scratch")
    assert (ddp.n_layer, ddp.block_size, ddp.out_dir) == (12, 512, gpu.out_dir)  # inherited
    # the seed's arithmetic: 16 sequences x 2 micro-steps x 4 GPUs = 8 x 4 x 4
    assert ddp.batch_size * ddp.gradient_accumulation_steps == gpu.batch_size * gpu.gradient_accumulation_steps * 4
    assert ddp.gradient_accumulation_steps % 4 == 0
    assert cpu.max_minutes > 0 and (cpu.n_layer, cpu.n_embd) == (2, 128)
    assert (cpu.optimizer, gpu.optimizer) == ("muon", "adamw")


# ----------------------------------------------------------------------------- optimizer


def test_orthogonalize_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    for shape in [(384, 128), (128, 512), (32, 96)]:  # not square: a random square matrix is near-singular
        update = torch.randn(shape) * torch.logspace(-1, 1, shape[1])  # columns scaled 0.1 .. 10
        out = train.orthogonalize(update)
        assert out.shape == update.shape
        singular = torch.linalg.svdvals(out)
        assert singular.min() > 0.5 and singular.max() < 1.25, singular  # Muon's quintic: ~0.7..1.2


def test_muon_adamw_groups_without_muon_are_adamw():
    torch.manual_seed(0)
    ours, ref = torch.nn.Parameter(torch.randn(50, 16)), torch.nn.Parameter(torch.randn(50, 16))
    ref.data.copy_(ours.data)
    opt = train.MuonAdamW([{"params": [ours], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(10):
        grad = torch.randn(50, 16)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step(), ref_opt.step()
    assert torch.allclose(ours, ref, atol=1e-6) and not torch.allclose(ours, torch.zeros(50, 16))


def test_muon_update_is_orthogonal_and_scaled():
    torch.manual_seed(0)
    start, grad = torch.randn(384, 128), torch.randn(384, 128)
    deltas = []
    for lr_scale in (1.0, 2.0):
        p = torch.nn.Parameter(start.clone())
        opt = train.MuonAdamW([{"params": [p], "muon": True, "lr_scale": lr_scale}], lr=1e-2, betas=(0.9, 0.95))
        p.grad = grad.clone()
        opt.step()
        deltas.append(start - p.detach())
    # RMS-matched: lr x 0.2 x sqrt(384) times a matrix of singular values ~1 (RMS ~1/sqrt(384))
    assert deltas[0].pow(2).mean().sqrt() == pytest.approx(1e-2 * 0.2, rel=0.25)
    assert torch.allclose(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-6)  # p ~ 1: fp32 rounding ~1e-7


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = train.parse_args(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=96",
                            "--optimizer=muon"])
    model = train.GPT(train.GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32))
    muon, matrices, vectors = train.build_optimizer(cfg, model, "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon["muon"] and not matrices["muon"] and not vectors["muon"]
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert {names[id(p)] for p in matrices["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert vectors["weight_decay"] == 0.0 and muon["weight_decay"] == matrices["weight_decay"] == cfg.weight_decay
    n_in_groups = sum(p.numel() for g in (muon, matrices, vectors) for p in g["params"])
    assert n_in_groups == model.num_params(non_embedding=False)  # the tied matrix once


def test_missing_dataset_names_make_data(tmp_path):
    result = run_train(*TINY, f"--data_dir={tmp_path}", "--dataset=nope", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "make data" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_wrong_tokenizer_is_refused(data_dir, tmp_path, capsys):
    meta_path = os.path.join(data_dir, "tiny", "meta.json")
    with open(meta_path, "w") as f:
        json.dump({"tokenizer": "gpt2", "vocab_size": 50257}, f)
    assert train.main([*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={tmp_path}/o"]) != 0
    assert "gpt2" in capsys.readouterr().err


def test_corrupt_checkpoint_on_resume_is_an_error_and_untouched(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    garbage = os.urandom(4096)
    (out / "ckpt.pt").write_bytes(garbage)
    (out / "log.jsonl").write_text('{"kind": "train", "iter": 7, "loss": 1.0}\n')
    result = run_train(*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--init_from=resume")
    assert result.returncode != 0
    assert "ckpt.pt" in result.stderr and "Traceback" not in result.stderr
    assert (out / "ckpt.pt").read_bytes() == garbage
    assert (out / "log.jsonl").read_text() == '{"kind": "train", "iter": 7, "loss": 1.0}\n'
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl"]


# ----------------------------------------------------------------------------- schedule


def test_time_budget_counts_from_the_end_of_start_up(data_dir, tmp_path):
    # Compilation (in the first evaluation and step) is start-up: the clock of max_minutes
    # starts after the first step, so a fresh machine trains as long as a warm one.
    out = str(tmp_path / "out")
    check_ok(run_train(*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}",
                       "--max_minutes=0.02", "--eval_iters=100", "--eval_interval=1000000"))
    with open(os.path.join(out, "log.jsonl")) as f:
        events = [json.loads(line) for line in f]
    (startup,) = [e for e in events if e["kind"] == "startup"]
    steps, evals = read_log(out)
    assert startup["iter"] == 1 and startup["startup_s"] >= evals[0]["eval_s"] > 0
    assert steps[0]["iter"] == 1 and steps[0]["elapsed_s"] < 0.05  # the clock has just started
    assert evals[-1]["elapsed_s"] >= 0.02 * 60  # and the run used its whole budget after that


def test_learning_rate_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    warmup = [train.learning_rate(cfg, it, 0.0) for it in range(10)]
    assert warmup == sorted(warmup) and warmup[-1] < 1.0
    assert train.learning_rate(cfg, 10, 0.0) == pytest.approx(1.0)
    assert train.learning_rate(cfg, 60, 0.0) == pytest.approx(0.55)  # halfway down the cosine
    assert train.learning_rate(cfg, 110, 0.0) == pytest.approx(0.1)
    timed = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_minutes=5.0)
    # with a time budget the iteration count no longer matters, the elapsed fraction does
    assert train.learning_rate(timed, 10_000, 0.5) == pytest.approx(0.55)
    assert train.learning_rate(timed, 20, 1.3) == pytest.approx(0.1)
    assert train.learning_rate(train.TrainConfig(decay_lr=False, learning_rate=0.3), 5, 0.9) == 0.3
    assert math.isclose(train.learning_rate(cfg, 0, 0.0), 1 / 11)
