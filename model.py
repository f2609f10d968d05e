"""The GPT model: architecture, training loss, KV-cache inference and the one checkpoint loader.

A GPT-2-shaped decoder (pre-LayerNorm blocks, learned positions, tied input/output
embeddings). Two things differ from a textbook GPT because of where it runs:

* Training loss is computed in chunks of positions, so the (batch*time, 50304) fp32
  logits are never materialised at once; on a CPU that tensor and its softmax are a
  large share of a small model's step.
* Inference goes through a static, position-indexed KV cache with one slot per
  concurrent sequence, so the serving engine can batch rows of different lengths
  (continuous batching), prefill prompts in chunks and reuse cached prefixes.
"""

import contextlib
import itertools
import logging
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

CHECKPOINT_FORMAT = 1
IGNORE_INDEX = -1
# Rows of the output projection handled at once by the chunked loss: big enough for
# efficient matmuls, small enough that one chunk's logits (rows x 50304 fp32 = 200 MB
# at 1024 rows) stay modest.
LOSS_CHUNK_ROWS = 256  # measured: 256 rows 1.18 s vs 1024 rows 1.62 s per compiled 8x256 bf16 step (1 thread)
# On a GPU each chunk re-reads the (vocab, C) weight three times and adds to an fp32 copy of
# its gradient, ~0.55 GB of traffic per chunk at 124M: 256-row chunks would make the loss of
# a 16x1024 batch memory-bound (64 chunks, ~35 GB; counted, not timed). 8192 rows: two chunks,
# 1.6 GB of fp32 logits (the H100 run in README, "GPU", used this).
LOSS_CHUNK_ROWS_GPU = 8192


# Attention over the KV cache (prefill, decode) keeps cuDNN's kernel out: cuDNN builds an
# execution plan for every new shape, ~2.5 ms of host time per call (H200, torch 2.11: 17.4 s
# of a 19.3 s engine run under cProfile; README, "GPU"), and serving shapes change at every
# step. These kernels take any shape at no setup cost. The choice is made
# once per model call (_hidden_states), not per attention call: entering sdpa_kernel costs
# ~37 us of host time (H100 host, profiled), 12 layers x every sequence of a prefill. The
# switch is process-wide; two engines in one process (tests) could race on it, which would
# change a kernel's speed, never the function computed.
CACHED_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# PyTorch's own choice among every kernel, cuDNN's included: for decode steps captured in a
# CUDA graph, where each shape's plan is built once, at capture (cuda_graphs.py; measured
# faster there on an H100, though not side by side: README, "GPU").
ANY_ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *CACHED_ATTENTION_BACKENDS]


def host_to_device(values: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on device without a sync: a copy from pageable memory makes the
    host wait for the GPU's queued work; from pinned memory it is queued behind it."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def cached_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | CausalBias | None) -> torch.Tensor:
    """SDPA for the inference paths: causal when mask is None, else the mask or bias."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)


def prompt_mask(n_new: int, end: int) -> CausalBias | None:
    """Attention of n_new prompt tokens at positions end-n_new..end-1 over keys 0..end-1:
    query i sees keys 0..end-n_new+i. None (SDPA's own causal mask) when nothing is cached
    before them; else a lower-right causal bias, which the GPU's flash and memory-efficient
    kernels apply without a mask tensor (a boolean mask is built, converted and expanded for
    every sequence and layer, and rules flash out). On CPU it becomes the same boolean mask."""
    return None if n_new == end else causal_lower_right(n_new, end)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # p50k_edit has 50284 ids; padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


# ----------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Keys and values of every layer for n_slots sequences, indexed by absolute position.

    Static (allocated once, never resized) so memory use is known up front and a
    sequence's entries never move: slot s, position p always lives at [:, s, :, p].
    """

    k: torch.Tensor  # (n_layer, n_slots, n_head, max_len, head_dim)
    v: torch.Tensor

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def store_span(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v of shape (n_head, T, head_dim) at positions start..start+T-1 of one slot."""
        end = start + k.shape[1]
        self.k[layer, slot, :, start:end] = k
        self.v[layer, slot, :, start:end] = v

    def span(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, n_head, end, head_dim) of one slot's positions 0..end-1 (no copy)."""
        return self.k[layer, slot : slot + 1, :, :end], self.v[layer, slot : slot + 1, :, :end]

    def store_tokens(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per row: k, v of shape (B, n_head, head_dim) at (slots[i], positions[i])."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def window(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..length-1 of the given slots, (B, n_head, length, head_dim): a copy.

        Only the live window is read: at large batch the KV reads, not the weights,
        dominate a decode step, so reading the whole allocated max_len would waste most
        of the step on empty positions.
        """
        # index_select: 2-5x faster than advanced indexing on this strided view (CPU).
        return (self.k[layer, :, :, :length].index_select(0, slots),
                self.v[layer, :, :, :length].index_select(0, slots))

    def run_window(self, layer: int, rows: slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..length-1 of the consecutive slots `rows`: a view, no copy."""
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]

    @torch.inference_mode()
    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy positions 0..length-1 of src_slot into dst_slot (prefix reuse)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"prefix length {length} outside 0..{self.max_len}")
        self.k[:, dst_slot, :, :length] = self.k[:, src_slot, :, :length]
        self.v[:, dst_slot, :, :length] = self.v[:, src_slot, :, :length]


# ----------------------------------------------------------------------------- layers


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attend=None) -> torch.Tensor:
        """attend(q, k, v) -> y lets the inference paths swap in cached attention;
        without it this is plain causal attention over x."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if attend is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # The tanh approximation is GPT-2's own ("gelu_new"); exact GELU would make
        # pretrained GPT-2 weights drift from their reference outputs.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attend=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- chunked loss


def _chunk_loss(hidden, weight, targets, n_valid, want_grads):
    """Summed loss of one chunk divided by n_valid, and (if asked) its gradients.

    The gradient of mean cross-entropy w.r.t. the logits is (softmax - onehot) / n_valid;
    computing it here, while the chunk's logits are in hand, means they never have to
    be kept for the backward pass or recomputed there. Written as pure functions so the
    compiler fuses the fp32 upcast, logsumexp, exp and downcast into two passes over the
    logits (measured: 35 ms vs 83 ms per 256-row chunk with the earlier in-place version);
    the one-hot term is a scatter into the result, never a (rows, vocab) one-hot tensor.
    """
    logits = hidden @ weight.t()
    logits_fp32 = logits.float()
    lse = torch.logsumexp(logits_fp32, dim=1)
    safe_targets = targets.clamp(min=0)  # ignored rows are weighted 0 below
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
    row_weights = (targets != IGNORE_INDEX) / n_valid  # 1/n_valid for counted rows, 0 for ignored
    loss = ((lse - target_logits) * row_weights).sum()
    if not want_grads:
        return loss, None, None
    grad_logits = (torch.exp(logits_fp32 - lse[:, None]) * row_weights[:, None]).to(weight.dtype)
    rows = torch.arange(len(targets), device=targets.device)
    grad_logits = grad_logits.index_put((rows, safe_targets), -row_weights.to(weight.dtype), accumulate=True)
    return loss, grad_logits @ weight, grad_logits.t() @ hidden


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross_entropy(hidden @ weight.T, targets) with gradients computed chunk by chunk
    during forward; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)  # fp32 accumulator
        hidden_c, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_loss, g_hidden, g_weight = _chunk_loss(hidden_c[rows], weight_c, targets[rows], n_valid, True)
            loss += chunk_loss
            grad_hidden[rows] = g_hidden
            grad_weight += g_weight
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of (N, C) hidden states projected by weight (V, C) against
    (N,) targets, ignoring targets == -1; equals F.cross_entropy on the full logits."""
    # Under autocast, cast the (vocab, C) matrix once here: left to autocast, every chunk's
    # three matmuls would each cast it again (24 casts of 6.4M values per 8x256 step; with
    # them the loss took ~400 ms of a 455 ms step).
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else weight.dtype)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype)
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        chunks = range(0, hidden.shape[0], chunk_rows)
        return sum(_chunk_loss(hidden[s : s + chunk_rows], weight, targets[s : s + chunk_rows], n_valid, False)[0]
                   for s in chunks)


# ----------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tied: one matrix embeds tokens and scores them, saving vocab*n_embd parameters.
        self.transformer.wte.weight = self.lm_head.weight
        # The inference paths' output-layer dtype when it should differ from the weights'
        # (set_output_dtype); training and forward() always use the weights as they are.
        self.output_dtype: torch.dtype | None = None
        self._output_weight, self._output_weight_key = None, None
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, except the projections that write into the
        residual stream, scaled by 1/sqrt(2*n_layer) so its variance does not grow with depth."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out the position table. The token table
        stays in: it is also the output layer, so it does real compute."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # ---- training

    def _hidden_states(self, idx: torch.Tensor, positions: torch.Tensor, attend_for_layer=None,
                       backends: list[SDPBackend] | None = None) -> torch.Tensor:
        """Final hidden states; attend_for_layer(layer) gives the inference paths' cached
        attention, which runs on `backends` (default CACHED_ATTENTION_BACKENDS)."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        with sdpa_kernel(backends or CACHED_ATTENTION_BACKENDS) if attend_for_layer else contextlib.nullcontext():
            for layer, block in enumerate(self.transformer.h):
                x = block(x, attend_for_layer(layer) if attend_for_layer else None)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Training (targets given): (None, mean loss). Otherwise: (last-position logits (B, 1, V), None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        x = self._hidden_states(idx, torch.arange(T, device=idx.device))
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if isinstance(self.lm_head, Int8Linear):  # an inference model: the loss of what is served
            return None, _int8_head_loss(self.lm_head, x.reshape(B * T, -1), targets.reshape(B * T))
        chunk_rows = LOSS_CHUNK_ROWS if x.device.type == "cpu" else LOSS_CHUNK_ROWS_GPU
        loss = chunked_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T), chunk_rows)
        return None, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """[matrices, vectors]: decay matrices (weights, embeddings) only; biases and
        LayerNorm gains are not scales worth shrinking towards zero."""
        params = [p for p in self.parameters() if p.requires_grad]  # the tied matrix appears once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, tokens_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved / peak, counting 6N flops per token for the
        weights plus 12*L*n_embd*T for attention over a full block (PaLM, appendix B)."""
        cfg = self.config
        flops_per_token = 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        return flops_per_token * tokens_per_iter / dt / peak_flops

    # ---- inference (the serving engine's path)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the model computes in. Read off the final LayerNorm, which stays
        float in INT8 models too (their linear weights are int8 buffers)."""
        return self.transformer.ln_f.weight.dtype

    def allocate_kv_cache(self, n_slots: int, max_len: int, dtype: torch.dtype | None = None,
                          device=None) -> KVCache:
        dtype = dtype or self.dtype
        if dtype != self.dtype:
            raise ValueError(f"KV cache dtype {dtype} differs from the model's dtype {self.dtype}")
        if not 0 < max_len <= self.config.block_size:
            raise ValueError(f"max_len {max_len} must be in 1..block_size ({self.config.block_size})")
        cfg = self.config
        shape = (cfg.n_layer, n_slots, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        device = device if device is not None else self.transformer.ln_f.weight.device
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int, start_pos: int) -> torch.Tensor:
        """Run tokens (T,) at positions start_pos.. of one slot, attending to that slot's
        cached positions 0..start_pos-1 and causally to themselves; store their K/V.
        Returns float32 logits (V,) of the last token."""
        T = tokens.shape[0]
        end = start_pos + T
        if T == 0 or start_pos < 0 or end > cache.max_len:
            raise ValueError(f"prefill of {T} tokens at {start_pos} does not fit a cache of max_len {cache.max_len}")
        positions = torch.arange(start_pos, end, device=tokens.device)
        mask = prompt_mask(T, end)

        def attend_for_layer(layer):
            def attend(q, k, v):
                cache.store_span(layer, slot, start_pos, k[0], v[0])
                keys, values = cache.span(layer, slot, end)
                return cached_attention(q, keys, values, mask)
            return attend

        x = self._hidden_states(tokens[None, :], positions, attend_for_layer)
        return self._output_logits(x[0, -1:])[0]

    @torch.inference_mode()
    def prefill_batch(self, tokens: list[torch.Tensor], cache: KVCache, slots: list[int],
                      start_positions: list[int]) -> torch.Tensor:
        """prefill() of several sequences (distinct slots) in one model call; float32 logits
        (n, V) of each sequence's last token.

        Serving prompts are short after prefix-cache hits, so one call per prompt pays
        per-call overhead and runs the linear layers on few rows. The sequences are packed
        into one (1, sum T) row for everything but attention, which runs per sequence over
        its own slot: one SDPA over all slots' keys with a block-diagonal mask was measured
        3x slower, as most of its work is on masked-out pairs.
        """
        if len(tokens) == 1:  # nothing to pack: the single-sequence path, bit for bit
            return self.prefill(tokens[0], cache, slots[0], start_positions[0])[None]
        lengths = [t.shape[0] for t in tokens]
        ends = [s + n for s, n in zip(start_positions, lengths)]
        if min(lengths) == 0 or min(start_positions) < 0 or max(ends) > cache.max_len:
            raise ValueError(f"prefill of {lengths} tokens at {start_positions} does not fit a cache "
                             f"of max_len {cache.max_len}")
        device = tokens[0].device
        # Index tensors are built on the host and copied in once each: no device round trip
        # (repeat_interleave with device counts, or a pageable copy, would wait for the GPU).
        offsets = [0, *itertools.accumulate(lengths)]
        positions = host_to_device(torch.cat([torch.arange(s, e) for s, e in zip(start_positions, ends)]), device)
        slot_ids = host_to_device(torch.tensor(slots).repeat_interleave(torch.tensor(lengths)), device)
        last = host_to_device(torch.tensor(offsets[1:]) - 1, device)  # each sequence's last packed token
        spans = list(zip(slots, offsets[:-1], lengths, start_positions, ends))
        masks = [prompt_mask(n, end) for _, _, n, _, end in spans]

        def attend_for_layer(layer):
            def attend(q, k, v):
                # (1, H, N, D) -> (N, H, D): one (slot, position) entry per packed token.
                cache.store_tokens(layer, slot_ids, positions, k[0].transpose(0, 1), v[0].transpose(0, 1))
                outputs = []
                for (slot, off, n, _, end), mask in zip(spans, masks):
                    keys, values = cache.span(layer, slot, end)
                    outputs.append(cached_attention(q[:, :, off : off + n], keys, values, mask))
                return torch.cat(outputs, dim=2)
            return attend

        x = self._hidden_states(torch.cat(tokens)[None, :], positions, attend_for_layer)
        return self._output_logits(x[0, last])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
               window: int | None = None, slot_range: tuple[int, int] | None = None,
               backends: list[SDPBackend] | None = None) -> torch.Tensor:
        """One new token per row: row i is tokens[i] at position positions[i] of slot slots[i].
        Rows may be at different positions. Returns float32 logits (B, V). backends: the
        SDPA kernels attention may use (default CACHED_ATTENTION_BACKENDS).

        Attention reads cache positions 0..window-1 of each row's slot. Left out, window is
        the live part, max(positions) + 1, at the cost of one host sync; a caller that knows
        the positions on the host passes it (any window > max(positions) gives the same
        result), which keeps the call free of syncs, as CUDA-graph capture requires.
        slot_range=(lo, hi), when given, says that slots are ascending and all in lo..hi-1
        (the caller checked): attention then reads those cache rows in place instead of
        gathering a copy of each row's window (the copy cost 2/3 of the attention time at 64
        rows x 200 positions, CPU). Rows of the run not in the batch get a dummy query whose
        output is dropped, so a run much wider than the batch costs more than the copy.
        When the batch has exactly hi - lo rows, row i reads cache row lo + i and writes its
        new K/V at slots[i]: a padding row (cuda_graphs.py) writes to a spare slot outside
        the run, and its output is dropped.
        """
        if window is None:
            window = int(positions.max()) + 1
            if int(positions.min()) < 0:
                raise ValueError(f"decode positions must be in 0..{cache.max_len - 1}")
        if not 0 < window <= cache.max_len:
            raise ValueError(f"decode window {window} outside 1..{cache.max_len}")
        rows, offsets, row_positions = None, None, positions
        if slot_range is not None:
            rows = slice(*slot_range)
            if slot_range[1] - slot_range[0] != slots.shape[0]:  # gaps: the batch is a subset of the run
                offsets = slots - slot_range[0]
                # A dummy row attends to position 0 only: finite, and dropped afterwards.
                row_positions = positions.new_zeros(slot_range[1] - slot_range[0]).index_copy(0, offsets, positions)
        # (rows, 1, 1, window): each row sees its own slot's positions 0..positions[i] only.
        mask = (torch.arange(window, device=tokens.device)[None, :] <= row_positions[:, None])[:, None, None, :]

        def attend_for_layer(layer):
            def attend(q, k, v):
                cache.store_tokens(layer, slots, positions, k[:, :, 0], v[:, :, 0])
                keys, values = cache.window(layer, slots, window) if rows is None else \
                    cache.run_window(layer, rows, window)
                if offsets is None:
                    return cached_attention(q, keys, values, mask)
                q_rows = q.new_zeros((keys.shape[0],) + q.shape[1:]).index_copy(0, offsets, q)
                return cached_attention(q_rows, keys, values, mask).index_select(0, offsets)
            return attend

        x = self._hidden_states(tokens[:, None], positions[:, None], attend_for_layer, backends)
        return self._output_logits(x[:, 0])

    def set_output_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the inference output layer in `dtype` (None: the weights' dtype).

        For serving fp32 models on a CPU with native bf16 (AVX512-BF16, AMX): the output
        layer is most of a small model's decode step, and alone it ran 2.4-2.5x faster in bf16
        than in fp32 at 1, 8 and 64 rows on this project's build machine (README, serving),
        while the rest of the model stays fp32, which is faster than bf16 at batch 1."""
        if isinstance(self.lm_head, Int8Linear) and dtype is not None:
            raise ValueError("an int8 output layer has its own kernel; it takes no output dtype")
        self.output_dtype = dtype

    @property
    def output_dtype_name(self) -> str:
        """What the inference output layer computes in: 'int8', 'bfloat16', 'float32', ..."""
        if isinstance(self.lm_head, Int8Linear):
            return "int8"
        return str(self.output_dtype or self.lm_head.weight.dtype).removeprefix("torch.")

    def _output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, V) of final hidden states x (B, C) for the inference paths.

        On CPU in fp32, MKL computes x @ W.T for a (V, C) weight as a dot product per row,
        which for a narrow model (C = 128) runs at a third of memory speed: the output
        layer alone took 4 ms of a 5 ms decode step at batch 1. A (C, V) copy of the
        weight streams instead (1.2 ms). bf16 and GPUs show no such gap, so they skip
        the copy and its memory. Derived weights are rebuilt whenever the weight changes.
        """
        if isinstance(self.lm_head, Int8Linear):  # int8 has its own CPU kernel (no float weight)
            return self.lm_head(x).float()
        weight = self.lm_head.weight
        if self.output_dtype is not None and self.output_dtype != weight.dtype:
            cast = self._derived_output_weight(lambda w: w.to(self.output_dtype))
            return F.linear(x.to(self.output_dtype), cast).float()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return self.lm_head(x).float()
        return x @ self._derived_output_weight(lambda w: w.t().contiguous())

    def _derived_output_weight(self, derive) -> torch.Tensor:
        """derive(weight), kept until the weight (or the output dtype) changes."""
        weight = self.lm_head.weight
        key = (weight.data_ptr(), weight._version, self.output_dtype)
        if self._output_weight_key != key:
            self._output_weight, self._output_weight_key = derive(weight.detach()), key
        return self._output_weight

    # ---- pretrained weights

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0) -> "GPT":
        """GPT-2 weights from Hugging Face ('gpt2', 'gpt2-medium', ... or a local directory)."""
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as exc:
            raise ImportError("GPT.from_pretrained needs the optional package 'transformers' "
                              "(pip install transformers)") from exc
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        hf_cfg = hf_model.config
        if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{name_or_path}: activation {hf_cfg.activation_function!r} is not GPT-2's tanh GELU")
        if hf_cfg.n_inner not in (None, 4 * hf_cfg.n_embd):
            raise ValueError(f"{name_or_path}: MLP width {hf_cfg.n_inner} is not 4 * n_embd")
        config = GPTConfig(block_size=hf_cfg.n_positions, n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head,
                           n_embd=hf_cfg.n_embd, dropout=dropout, bias=True)
        if hf_cfg.vocab_size > config.vocab_size:
            raise ValueError(f"{name_or_path}: vocabulary of {hf_cfg.vocab_size} exceeds {config.vocab_size}")
        model = cls(config)
        model._copy_hf_weights(hf_model.state_dict())
        return model

    @torch.no_grad()
    def _copy_hf_weights(self, hf_state: dict) -> None:
        # Hugging Face's GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
        conv1d_suffixes = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        own = self.state_dict()
        for name, target in own.items():
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight, copied there
            source = hf_state[name]
            if name.endswith(conv1d_suffixes):
                source = source.t()
            if name == "transformer.wte.weight":
                # Rows past GPT-2's vocabulary (the padding and p50k's extra tokens) keep
                # their fresh N(0, 0.02) init.
                target[: source.shape[0]].copy_(source)
            else:
                target.copy_(source)


# ----------------------------------------------------------------------------- INT8 weights

INT8_WEIGHT_ONLY = "int8-weight-only"  # checkpoint["quantization"] of quantize_model.py's output


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row: weight ~= q * scale[:, None], q in -127..127.
    Scales are bf16 (fp32 ones cost 3% more bytes at width 128; bf16 is what CUDA computes
    in), rounded *up* so no weight needs over 127 steps; q is computed against the stored
    scale, so |w - q * scale| <= scale / 2 holds exactly on every device."""
    w = weight.detach().float()
    exact = w.abs().amax(dim=1) / 127
    scales = exact.to(torch.bfloat16)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    scales = scales.clamp(min=torch.finfo(torch.bfloat16).tiny)  # an all-zero row still divides safely
    return torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A Linear layer or embedding table with int8 weights and a float scale per row.
    forward(float x) is the layer, forward(integer ids) a lookup: one module is both token
    table and output layer, tied as in the float model. Kernels (use_int8_kernel picks):
      dynamic-int8  CPU: weights prepacked for the quantized engine (fbgemm on x86), inputs
                    quantized per call with one range per tensor (so a row's result depends
                    slightly on its batch-mates). Measured faster than fp32 and bf16 when
                    decoding here, the 50k-row output layer most.
      weight-only   F.linear(x, w.to(x.dtype)) * scale: on CUDA torch.compile fuses the int8
                    -> float conversion into the matmul (eager converts every call: slow)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel, self._packed = "weight-only", None  # the packed weights are never saved

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        layer = cls(weight.shape[1], weight.shape[0], bias is not None)
        layer.weight_int8, scales = quantize_rows_int8(weight)
        layer.scales = scales.float()
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, made per call: for inspection (dtype, shape), not compute."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def use_kernel(self, kernel: str) -> None:
        self._packed = self._prepack() if kernel == "dynamic-int8" else None
        self.kernel = kernel

    def _prepack(self):
        # At every load, from int8 + scales: weights_only=True cannot read a packed object.
        with warnings.catch_warnings():  # quantized tensors warn they are deprecated
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight_int8.cpu(), self.scales.detach().double().cpu(),
                torch.zeros(self.out_features, dtype=torch.long), 0)
            bias = None if self.bias is None else self.bias.detach().float().cpu()
            return torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            return self.weight_int8[x].to(self.scales.dtype) * self.scales[x].unsqueeze(-1)
        if self._packed is not None and x.device.type == "cpu":
            # reduce_range=True: 7-bit activations, so CPUs without VNNI cannot overflow their
            # 16-bit partial sums (the setting of torch's own dynamic quantization on x86).
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model: GPT) -> GPT:
    """Every Linear and both embedding tables become Int8Linear, in place; LayerNorms and
    biases stay float."""
    _swap_in_int8(model, lambda m: Int8Linear.from_float(m.weight, getattr(m, "bias", None)))
    return model


def _swap_in_int8(model: GPT, make) -> None:
    linears = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name in linears:
        setattr(parent, name, make(getattr(parent, name)))
    model.transformer.wte = model.lm_head  # still tied: one int8 table in both roles
    model.transformer.wpe = make(model.transformer.wpe)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it bf16
    matmuls are emulated and slower than fp32. Linux's /proc/cpuinfo; elsewhere, no."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_output_dtype(name: str, model: GPT, device) -> torch.dtype | None:
    """The output-layer dtype for serving ('auto' | 'float32' | 'bfloat16'; None: the weights').
    auto: bf16 for an fp32 model on a CPU with native bf16, else the weights' own dtype."""
    if name not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"output dtype must be auto, float32 or bfloat16, got {name!r}")
    if isinstance(model.lm_head, Int8Linear):
        return None
    if name != "auto":
        return getattr(torch, name)
    fp32_on_cpu = torch.device(device).type == "cpu" and model.lm_head.weight.dtype == torch.float32
    return torch.bfloat16 if fp32_on_cpu and cpu_has_native_bf16() else None


def use_int8_kernel(model: nn.Module, device) -> str:
    """Prepare the kernel measured fastest on device (see Int8Linear); a CPU build without a
    quantized engine falls back to the much slower weight-only one, with a warning."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    kernel = "dynamic-int8" if torch.device(device).type == "cpu" else "weight-only"
    try:
        for layer in layers:
            layer.use_kernel(kernel)
        if kernel == "dynamic-int8" and layers:  # a kernel that cannot run must fail here, not mid-request
            layers[0](torch.zeros(1, layers[0].in_features))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        logging.getLogger(__name__).warning("int8: CPU kernel unavailable (%s); falling back to the slower "
                                            "weight-only kernel", _first_line(exc))
        kernel = "weight-only"
        for layer in layers:
            layer.use_kernel(kernel)
    return kernel


def _int8_head_loss(head: Int8Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy through the int8 output layer's own kernel, in chunks of rows."""
    chunks = range(0, len(targets), LOSS_CHUNK_ROWS)
    total = sum(F.cross_entropy(head(hidden[s : s + LOSS_CHUNK_ROWS]).float(), targets[s : s + LOSS_CHUNK_ROWS],
                                ignore_index=IGNORE_INDEX, reduction="sum") for s in chunks)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def _load_int8(path: str, ckpt: dict, device) -> GPT:
    """The int8 model with its kernel for device; float tensors (scales, LayerNorms, biases)
    in fp32 on CPU and bf16 on CUDA, the fast dtype there."""
    try:
        model = GPT(_config_from_checkpoint(path, ckpt))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_args: {_first_line(exc)}") from exc
    _swap_in_int8(model, lambda m: Int8Linear(*m.weight.shape[::-1], bias=getattr(m, "bias", None) is not None))
    try:
        model.load_state_dict(_strip_wrapper_prefixes(ckpt["model"]), strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: int8 weights do not match model_args: {_first_line(exc)}") from exc
    model = model.to(device).to(torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    use_int8_kernel(model, device)
    return model.eval()


# ----------------------------------------------------------------------------- validation loss


def evenly_spaced_windows(tokens: np.ndarray, length: int, max_tokens: int) -> torch.Tensor:
    """(n, length + 1) windows spread evenly over a token array, n = max_tokens // length (at
    least 1): a fixed, deterministic sample, so two models are measured on the same tokens."""
    n = max(1, min(max_tokens // length, (len(tokens) - 1) // length))
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length + 1]) for s in starts]).astype(np.int64))


@torch.inference_mode()
def mean_loss(model: "GPT", windows: torch.Tensor, device, batch_size: int = 8, progress=None) -> float:
    """Mean cross-entropy (nats/token) of next-token prediction over (n, T + 1) windows.
    progress: an optional wrapper for the batch iterator (e.g. a tqdm partial)."""
    batches = windows.split(batch_size)
    total = 0.0
    for batch in (progress(batches) if progress else batches):
        batch = batch.to(device)
        total += model(batch[:, :-1], batch[:, 1:])[1].item() * len(batch)
    return total / len(windows)


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one line fit for a CLI."""


def unwrapped_state_dict(model: nn.Module) -> dict:
    """model.state_dict() with the prefixes added by DDP ('module.') and torch.compile
    ('_orig_mod.') removed, so checkpoints load into a bare GPT."""
    return _strip_wrapper_prefixes(model.state_dict())


def _strip_wrapper_prefixes(state: dict) -> dict:
    prefixes = ("module.", "_orig_mod.")
    stripped = {}
    for key, value in state.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def model_checkpoint(model: "GPT", tokenizer: str, **extra) -> dict:
    """The fields load_checkpoint needs to rebuild a model (format, weights, architecture) and
    the tokenizer it was trained with, plus extra fields."""
    return dict(format=CHECKPOINT_FORMAT, model=unwrapped_state_dict(model), model_args=asdict(model.config),
                tokenizer=tokenizer, **extra)


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash or error mid-save leaves any previous file at path intact
    (the temp file lives in the same directory so os.replace is a rename, not a copy)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; a server under another user must read it
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint(path: str, device="cpu") -> tuple[GPT, dict]:
    """(model in eval mode, checkpoint dict). Raises CheckpointError on anything unusable."""
    ckpt = _read_checkpoint(path, device)
    quantization = ckpt.get("quantization")
    if quantization is not None:
        if quantization == INT8_WEIGHT_ONLY:
            return _load_int8(path, ckpt, device), ckpt
        raise CheckpointError(f"{path}: unknown quantization {quantization!r}")
    try:
        model = GPT(_config_from_checkpoint(path, ckpt)).to(device)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_args: {_first_line(exc)}") from exc
    try:
        model.load_state_dict(_strip_wrapper_prefixes(ckpt["model"]), strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not match model_args: {_first_line(exc)}") from exc
    return model.eval(), ckpt


def _read_checkpoint(path: str, device) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated or "
                              f"holds non-tensor objects): {_first_line(exc)}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with 'model' and 'model_args')")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this code reads {CHECKPOINT_FORMAT}")
    return ckpt


def _config_from_checkpoint(path: str, ckpt: dict) -> GPTConfig:
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: model_args is not a dict")
    unknown = sorted(set(args) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown model_args {unknown}")
    return GPTConfig(**args)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
