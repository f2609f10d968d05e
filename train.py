"""Train the code-completion GPT: one process, or several under torchrun (DDP).

    python train.py [config/file.py ...] [--key=value ...]

A config file is plain Python assignments to keys of TrainConfig (below); files and
--key=value overrides apply left to right. Every key is typed: an unknown key or a value
of the wrong type stops the run with a one-line error naming the key.

    python train.py config/train_code_assistant_cpu.py            # no GPU: ~10 minutes
    python train.py config/train_code_assistant.py                # one GPU
    torchrun --standalone --nproc_per_node=4 train.py config/train_code_assistant_ddp.py
    python train.py config/train_code_assistant_cpu.py --init_from=resume
    python train.py config/train_code_assistant_cpu.py --plot_only=True   # redraw loss.png

Multi-node: the same command on every node, with torchrun's rendezvous instead of --standalone:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-id=JOB --rdzv-backend=c10d \
             --rdzv-endpoint=HOST:29500 train.py config/train_code_assistant_ddp.py
Only global rank 0 writes files, so for resume out_dir must be on rank 0's node or shared.
DDP uses NCCL on CUDA and gloo on CPU.

Outputs in out_dir: ckpt.pt (latest full state, for --init_from=resume), best.pt (weights with
the best validation loss, for serving), log.jsonl (one JSON object per event), loss.png.
SIGTERM or SIGINT: the current step finishes, ckpt.pt is written and the exit status is 0.
"""

import ast
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT, CheckpointError, GPTConfig, load_checkpoint, model_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    # output and evaluation
    out_dir: str = "out"
    eval_interval: int = 500  # iterations between evaluations; each writes ckpt.pt
    eval_iters: int = 100  # batches per split per evaluation
    log_interval: int = 10
    plot_only: bool = False  # only redraw out_dir/loss.png from log.jsonl
    init_from: str = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt) | 'gpt2*' or a local HF dir
    # data
    data_dir: str = "data"  # the dataset is data_dir/dataset/{train,val}.bin + meta.json
    dataset: str = "python_code"
    batch_size: int = 8  # sequences per micro-batch, per process
    block_size: int = 1024
    gradient_accumulation_steps: int = 1  # micro-batches per step over ALL processes
    # model (resuming: must match the checkpoint; from GPT-2: the weights decide, bar dropout)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    vocab_size: int = 50304  # p50k_edit's 50284 ids padded to a multiple of 64
    # optimizer and schedule
    optimizer: str = "adamw"  # 'adamw' | 'muon' (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr_scale: float = 1.0  # Muon's learning rate as a multiple of learning_rate (same schedule)
    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 = max_iters
    min_lr: float = 6e-5
    max_iters: int = 5000
    max_minutes: float = 0.0  # > 0: a time budget (start-up excluded: see start_clock); the cosine follows it
    stop_at_iter: int = 0  # > 0: checkpoint and exit at this iteration as if preempted (schedule unchanged)
    # system
    device: str = "auto"  # 'auto' = cuda if available else cpu
    dtype: str = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16'
    compile: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0 = default_peak_flops()
    seed: int = 1337


class TrainError(Exception):
    """Bad input (config, dataset, checkpoint): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------- configuration


def parse_args(argv: list[str]) -> TrainConfig:
    """Config files and --key=value overrides, applied left to right, typed and validated."""
    values = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise TrainError(f"expected --key=value, got {arg!r}")
            values[key] = _typed(key, _parse_value(text, _key_type(key, arg)), arg)
        else:
            values.update({key: _typed(key, value, arg) for key, value in read_config_file(arg).items()})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def read_config_file(path: str) -> dict:
    """Names a config file assigns. Private names (_x), modules, functions and classes are
    skipped so a file may import helpers; inheritance is an explicit
    `from config.<parent> import *` at the top."""
    if not os.path.isfile(path):
        raise TrainError(f"config file not found: {path}")
    namespace = {"__file__": path, "__name__": "__train_config__"}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as exc:  # a broken config file is bad input, not a crash
        raise TrainError(f"{path}: {type(exc).__name__}: {exc}") from exc
    skipped = (types.ModuleType, types.FunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skipped)}


def _key_type(key: str, source: str) -> type:
    types_by_key = {f.name: f.type for f in fields(TrainConfig)}
    if key not in types_by_key:
        close = difflib.get_close_matches(key, types_by_key, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TrainError(f"unknown config key '{key}' in {source}{hint}")
    return types_by_key[key]


def _parse_value(text: str, want: type):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare words (--dataset=python_code) are strings; _coerce rejects them elsewhere
    return text if want is str and not isinstance(value, str) else value


def _typed(key: str, value, source: str):
    want = _key_type(key, source)
    if want is bool:
        ok = isinstance(value, bool)
    elif want is float:  # ints are welcome where a float is wanted (lr=1 is fine)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:  # bool is an int subclass: --batch_size=True must not pass as 1
        ok = isinstance(value, want) and not isinstance(value, bool)
    if not ok:
        raise TrainError(f"config key '{key}' must be {want.__name__}, got {value!r} (in {source})")
    return float(value) if want is float else value


def validate(cfg: TrainConfig) -> None:
    positive = ["batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head",
                "n_embd", "vocab_size", "eval_interval", "eval_iters", "log_interval", "learning_rate",
                "muon_lr_scale"]
    non_negative = ["max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay",
                    "grad_clip", "max_minutes", "stop_at_iter", "peak_flops", "dropout"]
    for key in positive + non_negative:
        value = getattr(cfg, key)
        if value < 0 or (value == 0 and key in positive):
            raise TrainError(f"config key '{key}' must be {'> 0' if key in positive else '>= 0'}, got {value}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise TrainError(f"config key 'dtype' must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainError(f"config key 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.dropout >= 1:
        raise TrainError(f"config key 'dropout' must be < 1, got {cfg.dropout}")
    if cfg.init_from == "scratch" and cfg.n_embd % cfg.n_head:
        raise TrainError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if not (cfg.init_from in ("scratch", "resume") or cfg.init_from.startswith("gpt2")
            or os.path.isdir(cfg.init_from)):
        raise TrainError(f"init_from must be scratch, resume, gpt2* or a local model directory, "
                         f"got {cfg.init_from!r}")


# ----------------------------------------------------------------------------- device, precision, processes


@dataclass
class Runtime:
    device: str
    device_type: str  # 'cuda' | 'cpu' | ...: what torch.autocast wants
    dtype: str  # resolved: float32 | bfloat16 | float16
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        self.ddp, self.master = self.world_size > 1, self.rank == 0  # master: logs and writes files


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Pick device and dtype, and join the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # torch.cuda.set_device wants an index (torch 2.11 refuses a bare "cuda")
        device = f"cuda:{local_rank}"
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays fp32
    if world_size > 1:
        if cfg.gradient_accumulation_steps % world_size:
            raise TrainError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not "
                             f"divisible by the world size {world_size}")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Runtime(device, device_type, resolve_dtype(cfg.dtype, device_type), rank, local_rank, world_size)


def resolve_dtype(requested: str, device_type: str) -> str:
    """bf16 autocast where the hardware does it natively (on this project's CPUs bf16 matmuls
    are ~3-4x fp32); fp16 + GradScaler only on GPUs without bf16."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu":
        return "bfloat16" if _cpu_has_native_bf16() else "float32"
    return "float32"


def _cpu_has_native_bf16() -> bool:
    if not os.path.exists("/proc/cpuinfo"):  # Linux only; elsewhere fp32 is the safe guess
        return False
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_peak_flops(rt: Runtime) -> float:
    """The denominator of MFU. CUDA: H100/H200 dense bf16 (989 TFLOP/s; TF32 half that).
    CPU: per thread, the best large-matmul throughput measured on the 2-core AVX-512-BF16 build
    machine (about 0.7 TFLOP/s bf16 and 0.25 fp32 over 2 threads): a practical peak, not the
    datasheet's, so CPU MFU reads as 'fraction of what one big matmul gets here'."""
    half = rt.dtype in ("bfloat16", "float16")
    if rt.device_type == "cuda":
        return 989e12 if half else 494e12
    return (3.5e11 if half else 1.25e11) * torch.get_num_threads()


def autocast_context(rt: Runtime):
    if rt.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device_type, dtype=getattr(torch, rt.dtype))


def agree_across_ranks(rt: Runtime, stop: bool, elapsed: float) -> tuple[bool, float]:
    """All ranks must take the same decision to stop and use the same elapsed time (which
    drives the LR in time-budget mode), else they would diverge or hang: take the max."""
    if not rt.ddp:
        return stop, elapsed
    t = torch.tensor([float(stop), elapsed], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item()), float(t[1].item())


def install_stop_handlers() -> dict:
    """SIGTERM/SIGINT only set a flag, checked between steps: the step in flight finishes and
    its state is saved. A second signal gets the default behaviour (kill) back."""
    stop = {"requested": False}

    def handler(signum, frame):
        stop["requested"] = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# ----------------------------------------------------------------------------- data


class TokenWindows:
    """Random windows of block_size + 1 tokens from one flat uint16 .bin file."""

    def __init__(self, path: str, block_size: int):
        self.path, self.block_size = path, block_size
        self.n_tokens = os.path.getsize(path) // 2
        if self.n_tokens <= block_size + 1:
            raise TrainError(f"{path} has {self.n_tokens} tokens, too few for block_size {block_size}")

    def sample_offsets(self, generator: torch.Generator, shape: tuple) -> torch.Tensor:
        return torch.randint(self.n_tokens - self.block_size, shape, generator=generator)

    def read(self, offsets: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        # A fresh memmap per batch: one kept open for the whole run grows the process's
        # resident memory as pages are touched (the known np.memmap leak).
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        rows = torch.from_numpy(np.stack([data[i : i + self.block_size + 1] for i in offsets.tolist()])
                                .astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if rt.device_type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
            return x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        return x.to(rt.device), y.to(rt.device)


def open_dataset(cfg: TrainConfig) -> tuple[dict, dict]:
    """({'train': TokenWindows, 'val': TokenWindows}, meta) after checking the files exist and
    were made with our tokenizer."""
    root = os.path.join(cfg.data_dir, cfg.dataset)
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.isfile(os.path.join(root, name)):
            raise TrainError(f"dataset not found: {os.path.join(root, name)} is missing (run `make data` first)")
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    from tokenizer import TOKENIZER_NAME  # the vocabulary is defined in exactly one place

    if meta.get("tokenizer") != TOKENIZER_NAME:
        raise TrainError(f"{root} was tokenized with {meta.get('tokenizer')!r}, not {TOKENIZER_NAME!r} "
                         f"(rebuild it with `make data`)")
    splits = {s: TokenWindows(os.path.join(root, f"{s}.bin"), cfg.block_size) for s in ("train", "val")}
    return splits, meta


def step_offsets(windows: TokenWindows, generator: torch.Generator, cfg: TrainConfig, rt: Runtime):
    """This rank's micro-batch offsets for one optimizer step.

    Every rank draws the whole step's (accumulation x batch) offsets from the same generator and
    keeps its own rows: the global micro-batch index alone decides the sample, so N processes
    with accumulation A/N see exactly the data of one process with A, and the generator's state
    (identical on all ranks) is all a checkpoint needs to continue the stream."""
    per_rank = cfg.gradient_accumulation_steps // rt.world_size
    offsets = windows.sample_offsets(generator, (cfg.gradient_accumulation_steps, cfg.batch_size))
    return offsets[rt.rank * per_rank : (rt.rank + 1) * per_rank]


# ----------------------------------------------------------------------------- schedule


def learning_rate(cfg: TrainConfig, it: int, time_fraction: float) -> float:
    """Linear warmup over warmup_iters, then cosine to min_lr. The cosine's progress is
    iterations in the usual mode, or the elapsed fraction of max_minutes with a time budget:
    machine speed drifts 10-25% here, so a clock-driven schedule still ends at min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.max_minutes > 0:
        progress = time_fraction
    else:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- model and checkpoints


def build_model(cfg: TrainConfig, rt: Runtime) -> tuple[GPT, dict | None]:
    """(model on rt.device, the resume checkpoint or None)."""
    if cfg.init_from == "resume":
        model, ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device=rt.device)
        check_resumable(cfg, ckpt)
        return model.train(), ckpt
    if cfg.init_from == "scratch":
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, dropout=cfg.dropout, bias=cfg.bias)
        return GPT(GPTConfig(**model_args)).to(rt.device), None
    try:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
    except (ImportError, OSError, ValueError) as exc:
        raise TrainError(f"init_from={cfg.init_from}: {str(exc).strip().splitlines()[0]}") from exc
    if cfg.block_size > model.config.block_size:
        raise TrainError(f"block_size {cfg.block_size} exceeds {cfg.init_from}'s {model.config.block_size}")
    return model.to(rt.device), None


def check_resumable(cfg: TrainConfig, ckpt: dict) -> None:
    if "optimizer" not in ckpt or "rng" not in ckpt:
        raise TrainError("ckpt.pt holds no training state (optimizer, RNG): it cannot be resumed")
    saved = ckpt.get("config", {})
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dataset"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise TrainError(f"resume: {key}={getattr(cfg, key)!r} differs from the checkpoint's {saved[key]!r}")


def rng_states(rt: Runtime, data_gen: torch.Generator) -> dict:
    """RNG states of every rank (dropout draws differ per rank), gathered for rank 0 to save."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device_type == "cuda" else None}
    every = [mine]
    if rt.ddp:
        every = [None] * rt.world_size
        dist.all_gather_object(every, mine)
    return {"ranks": every, "data": data_gen.get_state()}


def restore_rng(rt: Runtime, saved: dict, data_gen: torch.Generator, seed: int) -> None:
    data_gen.set_state(saved["data"])
    if len(saved["ranks"]) != rt.world_size:  # another world size: the stream goes on, dropout reseeds
        torch.manual_seed(seed + rt.rank + 1)
        return
    mine = saved["ranks"][rt.rank]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and rt.device_type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], rt.device)


# ----------------------------------------------------------------------------- log and plot


class RunLog:
    """out_dir/log.jsonl (rank 0 writes; other ranks' calls are no-ops) and console lines."""

    def __init__(self, out_dir: str, enabled: bool):
        self.path, self.enabled = os.path.join(out_dir, "log.jsonl"), enabled

    def start(self, keep_through_iter: int | None) -> None:
        """New run: empty the log. Resume: keep records up to the checkpoint's iteration, so
        steps a killed run took after its last checkpoint do not appear twice."""
        if not self.enabled:
            return
        kept = [] if keep_through_iter is None else read_events(self.path)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept if e.get("iter", 0) <= keep_through_iter)
        os.replace(self.path + ".tmp", self.path)

    def record(self, **event) -> None:
        if self.enabled:
            with open(self.path, "a") as f:  # reopened per event: a killed run loses nothing
                f.write(json.dumps(event) + "\n")

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)


def read_events(path: str) -> list[dict]:
    """The records of a log.jsonl; a line cut short by a hard kill is skipped."""
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def plot_loss(out_dir: str) -> str:
    """Draw out_dir/loss.png from out_dir/log.jsonl; returns the image path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    events = read_events(os.path.join(out_dir, "log.jsonl"))
    if not events:
        raise TrainError(f"nothing to plot in {out_dir}/log.jsonl: train first (make train)")
    steps = [e for e in events if e["kind"] == "train"]
    evals = [e for e in events if e["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([e["iter"] for e in steps], [e["loss"] for e in steps], lw=0.8, alpha=0.6, label="train (batch)")
    for key, marker in (("train_loss", "o"), ("val_loss", "s")):
        ax.plot([e["iter"] for e in evals], [e[key] for e in evals], marker=marker, label=key.replace("_", " "))
    ax.set(xlabel="iteration", ylabel="loss (nats/token)", title=os.path.basename(os.path.abspath(out_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- optimizer


OPTIMIZERS = ("adamw", "muon")


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `update`, roughly: a quintic Newton-Schulz
    iteration that pushes every singular value towards ~1 without an SVD. The coefficients
    are Keller Jordan's (Muon), tuned to converge fast from a Frobenius-normalised start."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update / (update.norm() + 1e-7)
    wide = x.shape[0] > x.shape[1]
    x = x.T if wide else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if wide else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon (momentum, then orthogonalised) for groups with muon=True, AdamW for the others.

    One optimizer object, so the LR schedule, gradient clipping, GradScaler and checkpoints
    treat it like AdamW. A Muon update is scaled by 0.2 * sqrt(max(rows, cols)) so its RMS
    matches a typical AdamW update: the learning rate and weight decay tuned for AdamW carry
    over (Moonshot AI, "Muon is Scalable for LLM Training", 2025)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float = 0.95):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=1e-8, weight_decay=0.0, muon=False,
                                      lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                (self._muon if group["muon"] else self._adamw)(p, group, self.state[p])
        return loss

    @staticmethod
    def _muon(p: torch.Tensor, group: dict, state: dict) -> None:
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(group["momentum"]).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=group["momentum"])
        scale = 0.2 * math.sqrt(max(p.shape))
        p.add_(orthogonalize(nesterov.float()).to(p.dtype), alpha=-group["lr"] * group["lr_scale"] * scale)

    @staticmethod
    def _adamw(p: torch.Tensor, group: dict, state: dict) -> None:
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        (beta1, beta2), state["step"] = group["betas"], state["step"] + 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** state["step"]))


def build_optimizer(cfg: TrainConfig, model: GPT, device_type: str) -> torch.optim.Optimizer:
    """AdamW as in nanoGPT, or Muon for the transformer blocks' weight matrices (the
    embedding, which is also the output layer, LayerNorms and biases stay on AdamW)."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas, device_type)
    matrices, vectors = model.optimizer_groups(cfg.weight_decay)
    blocks = {id(p) for p in model.transformer.h.parameters()}
    muon = [p for p in matrices["params"] if id(p) in blocks]
    matrices["params"] = [p for p in matrices["params"] if id(p) not in blocks]
    return MuonAdamW([{**matrices, "params": muon, "muon": True, "lr_scale": cfg.muon_lr_scale}, matrices, vectors],
                     lr=cfg.learning_rate, betas=betas)


# ----------------------------------------------------------------------------- training


class Trainer:
    """One run's state (model, optimizer, data stream, counters) and what is done with it."""

    def __init__(self, cfg: TrainConfig, rt: Runtime):
        self.cfg, self.rt, self.log = cfg, rt, RunLog(cfg.out_dir, rt.master)
        self.splits, self.meta = open_dataset(cfg)
        self.raw_model, ckpt = build_model(cfg, rt)
        if self.meta.get("vocab_size", 0) > self.raw_model.config.vocab_size:
            raise TrainError(f"the dataset's vocabulary ({self.meta['vocab_size']}) does not fit the model's "
                             f"vocab_size {self.raw_model.config.vocab_size}")
        self.optimizer = build_optimizer(cfg, self.raw_model, rt.device_type)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # same seed on every rank: see step_offsets
        self.iter_num, self.best_val, self.prior_s, self.last_eval = 0, float("inf"), 0.0, -1
        if ckpt is not None:
            self.restore(ckpt)
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        if rt.ddp:
            self.model = DDP(self.model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size

    def restore(self, ckpt: dict) -> None:
        fingerprint = self.meta.get("fingerprint")
        if ckpt.get("dataset_fingerprint") not in (None, fingerprint):
            raise TrainError(f"resume: the dataset changed since ckpt.pt was written (fingerprint "
                             f"{fingerprint} vs {ckpt['dataset_fingerprint']}): use a new out_dir")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # empty when saved without fp16
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(self.rt, ckpt["rng"], self.data_gen, self.cfg.seed)
        self.iter_num, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        self.prior_s, self.last_eval = ckpt["elapsed_s"], ckpt["last_eval_iter"]

    def save(self, elapsed: float, new_best: bool = False) -> None:
        """ckpt.pt (everything a resume needs) and, on a new best, best.pt (what serving needs).
        Collective: every rank calls, rank 0 writes."""
        rng = rng_states(self.rt, self.data_gen)
        if not self.rt.master:
            return
        cfg = self.cfg
        common = model_checkpoint(self.raw_model, self.meta["tokenizer"], config=asdict(cfg), dataset=cfg.dataset,
                                  dataset_fingerprint=self.meta.get("fingerprint"), iter_num=self.iter_num)
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
            common, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), rng=rng,
            best_val_loss=self.best_val, elapsed_s=elapsed, last_eval_iter=self.last_eval,
            world_size=self.rt.world_size))
        if new_best:
            save_checkpoint(os.path.join(cfg.out_dir, "best.pt"), dict(common, val_loss=self.best_val))

    @torch.no_grad()
    def estimate_loss(self) -> dict:
        """Mean loss over eval_iters batches per split. The batches come from a generator seeded
        afresh each time, so every evaluation scores the same windows (evaluations compare
        models, not samples) and the training stream is untouched. Ranks share the batches."""
        cfg, rt = self.cfg, self.rt
        model = self.model.module if rt.ddp else self.model  # no gradient sync needed
        model.eval()
        losses = {}
        for i, (name, windows) in enumerate(self.splits.items()):
            offsets = windows.sample_offsets(torch.Generator().manual_seed(cfg.seed + 1 + i),
                                             (cfg.eval_iters, cfg.batch_size))
            total = torch.zeros((), device=rt.device)
            for k in range(rt.rank, cfg.eval_iters, rt.world_size):
                with autocast_context(rt):
                    total += model(*windows.read(offsets[k], rt))[1].float()
            if rt.ddp:
                dist.all_reduce(total)
            losses[name] = total.item() / cfg.eval_iters
        model.train()
        return losses

    def evaluate(self, elapsed: float) -> None:
        started = time.time()
        losses = self.estimate_loss()
        new_best = losses["val"] < self.best_val
        self.best_val, self.last_eval = min(self.best_val, losses["val"]), self.iter_num
        self.log.record(kind="eval", iter=self.iter_num, train_loss=losses["train"], val_loss=losses["val"],
                        elapsed_s=round(elapsed, 2), eval_s=round(time.time() - started, 2))
        self.log.say(f"eval {self.iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                     + (" (best; wrote best.pt)" if new_best else ""))
        self.save(elapsed, new_best)

    def step(self, lr: float) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; the mean loss comes back as a
        tensor, so there is no host sync here."""
        cfg, rt, model = self.cfg, self.rt, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        offsets = step_offsets(self.splits["train"], self.data_gen, cfg, rt)
        step_loss = torch.zeros((), device=rt.device)
        for m, micro_offsets in enumerate(offsets):
            x, y = self.splits["train"].read(micro_offsets, rt)
            # DDP all-reduces gradients during backward; only the last micro-step needs that.
            last = m == len(offsets) - 1
            with contextlib.nullcontext() if last or not rt.ddp else model.no_sync():
                with autocast_context(rt):
                    loss = model(x, y)[1] / len(offsets)
                self.scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return step_loss

    def report(self, loss_sum: torch.Tensor, n_steps: int, seconds: float, lr: float, elapsed: float) -> None:
        if self.rt.ddp:  # every rank's share, so the number is the global batch's loss
            dist.all_reduce(loss_sum)
            loss_sum /= self.rt.world_size
        loss = loss_sum.item() / n_steps  # the host sync: at log points only
        dt = seconds / n_steps
        peak = self.cfg.peak_flops or default_peak_flops(self.rt)
        mfu = self.raw_model.estimate_mfu(self.tokens_per_iter // self.rt.world_size, dt, peak)
        self.log.record(kind="train", iter=self.iter_num, loss=loss, lr=lr,
                        tok_per_s=round(self.tokens_per_iter / dt, 1), mfu=round(mfu, 5),
                        ms_per_iter=round(dt * 1000, 2), elapsed_s=round(elapsed, 2))
        self.log.say(f"iter {self.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {self.tokens_per_iter / dt:,.0f} tok/s, "
                     f"mfu {mfu * 100:.1f}%, {dt * 1000:.0f} ms/iter")

    def start_clock(self, process_start: float) -> float:
        """The time budget counts from the end of this process's first step. Everything before
        it is start-up: compiling the evaluation and the training graphs took ~55 s on a fresh
        machine and ~20 s once inductor's cache is warm, so counting it made a 10-minute run on
        a new machine ~100 iterations shorter than the same run repeated (README, training)."""
        startup_s = time.time() - process_start
        self.log.record(kind="startup", iter=self.iter_num, startup_s=round(startup_s, 2))
        self.log.say(f"start-up (compilation, first evaluation and step) took {startup_s:.1f} s"
                     + ("; the time budget starts now" if self.cfg.max_minutes else ""))
        return time.time()

    def run(self) -> None:
        cfg, rt, log = self.cfg, self.rt, self.log
        stop = install_stop_handlers()  # from here on a signal means "save and exit"
        if rt.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
        log.start(self.iter_num if cfg.init_from == "resume" else None)
        log.say(f"{self.raw_model.num_params() / 1e6:.2f}M parameters | {rt.world_size} x {rt.device} {rt.dtype} | "
                f"{self.tokens_per_iter:,} tokens/iter | compile {cfg.compile} | from iter {self.iter_num} to "
                + (f"{cfg.max_minutes} min" if cfg.max_minutes else f"{cfg.max_iters}"))
        log.record(kind="start", iter=self.iter_num, device=rt.device, dtype=rt.dtype, world_size=rt.world_size,
                   params=self.raw_model.num_params(), tokens_per_iter=self.tokens_per_iter,
                   model_args=asdict(self.raw_model.config))
        budget_s, t0, start_iter = cfg.max_minutes * 60, time.time(), self.iter_num
        loss_sum, n_steps, t_mark = torch.zeros((), device=rt.device), 0, t0
        while True:
            want_stop = stop["requested"] or 0 < cfg.stop_at_iter <= self.iter_num
            stopping, elapsed = agree_across_ranks(rt, want_stop, self.prior_s + time.time() - t0)
            finished = self.iter_num >= cfg.max_iters or 0 < budget_s <= elapsed
            if stopping and not finished:  # preempted: save fast, skip evaluation
                self.save(elapsed)
                log.say(f"stopped at iter {self.iter_num}: wrote {cfg.out_dir}/ckpt.pt "
                        "(continue with --init_from=resume)")
                return
            if finished or (self.iter_num % cfg.eval_interval == 0 and self.iter_num != self.last_eval):
                t_eval = time.time()
                self.evaluate(elapsed)
                t_mark += time.time() - t_eval  # evaluation time is not training throughput
            if finished:
                break
            lr = learning_rate(cfg, self.iter_num, elapsed / budget_s if budget_s else 0.0)
            loss_sum += self.step(lr)
            n_steps += 1
            if self.iter_num == start_iter + 1:
                t0 = self.start_clock(t0)
            if self.iter_num % cfg.log_interval == 0 or self.iter_num == start_iter + 1:
                self.report(loss_sum, n_steps, time.time() - t_mark, lr, self.prior_s + time.time() - t0)
                loss_sum, n_steps, t_mark = torch.zeros((), device=rt.device), 0, time.time()
        if rt.master:
            log.say(f"done at iter {self.iter_num}: best val loss {self.best_val:.4f} ({cfg.out_dir}/best.pt), "
                    f"plot {plot_loss(cfg.out_dir)}")


def main(argv: list[str]) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.plot_only:
            print(plot_loss(cfg.out_dir))
            return 0
        rt = setup_runtime(cfg)
        torch.manual_seed(cfg.seed + rt.rank)  # dropout differs per rank; DDP broadcasts rank 0's init
        Trainer(cfg, rt).run()
        if rt.ddp:
            dist.barrier()  # every rank leaves together, after rank 0 has written its files
        return 0
    except (TrainError, CheckpointError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    # No dist.destroy_process_group(): on CPU/gloo with torch 2.13 it made a rank abort at exit
    # ("terminate called without an active exception", exit -6) in ~1 of 8 two-process runs on
    # a loaded machine, even after a barrier; 0 of 16 without it. Process exit releases it.


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
