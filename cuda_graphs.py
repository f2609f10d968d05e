"""CUDA-graph decoding: one captured decode step per (layout, rows bucket, window bucket).

On a GPU a decode step of a small model is bound by the CPU launching kernels, not by the
GPU running them (Hugging Face generate: 6.8 ms per step at batch 128 on an H200, where
reading the weights and live KV takes ~0.4 ms). Replaying a captured graph launches the
whole step at once.

A graph fixes every shape and address, so each step is fitted to a bucket:
  - window: attention reads the cache up to a window bucket (multiples of window_step) at or
    above the furthest live position, not the whole allocated context: at large batch the
    KV reads, not the weights, dominate the step;
  - layout "in_place": the step computes one row per cache slot 0..span-1 (span: the slot
    bucket holding every live slot), so row i's attention reads slot i's keys where they
    lie. Rows whose slot is not in the batch are padding. This is the layout of a busy
    server, where the live slots fill the low buckets;
  - layout "gather": the step computes the live rows padded up to a batch bucket, and
    attention reads a copy of each row's window. The copy triples the KV traffic (read,
    write, read again), so it is only chosen when the slot span is over twice the batch
    bucket: a few requests in scattered slots;
  - padding rows decode a dummy token at position 0 and write their K/V into one spare slot
    (the cache's last) that no request owns, so they never touch a live or cached prefix;
  - inputs go through static device buffers, filled by one host-to-device copy per step.

The same bucketed path runs without graphs (capture=False): on CPU, where it is what the
tests check, and as the eager reference on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import ANY_ATTENTION_BACKENDS, CACHED_ATTENTION_BACKENDS, KVCache

IN_PLACE, GATHER = "in_place", "gather"
# The SDPA kernels a captured step may use: "portable" is what every other path uses; "any"
# adds cuDNN's, whose per-shape plan a graph pays once, at capture.
GRAPH_ATTENTION = {"portable": CACHED_ATTENTION_BACKENDS, "any": ANY_ATTENTION_BACKENDS}


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


def window_buckets(max_len: int, step: int) -> list[int]:
    """step, 2*step, ... below max_len, then max_len itself."""
    if step < 1 or max_len < 1:
        raise ValueError(f"window step {step} and max_len {max_len} must be >= 1")
    return list(range(step, max_len, step)) + [max_len]


def smallest_at_least(value: int, buckets: list[int]) -> int:
    """The first bucket >= value (buckets ascending)."""
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepShape:
    """What one captured graph computes: `rows` rows in `layout`, attention over `window`."""
    layout: str
    rows: int
    window: int


class DecodeGraphs:
    """Bucketed decode over a KV cache with one spare slot (the last) for padding rows.

    decode(tokens, slots, positions) takes host lists, so choosing the shape needs no device
    sync; it returns float32 logits (len(tokens), V) on the model's device, row i for input
    i. With capture=True (CUDA only) each shape is captured on first use, or ahead of time
    by capture_all(), and replayed after. in_place=False keeps to the gather layout (the
    benchmark's comparison). attention: the SDPA kernels the steps may use, one of
    GRAPH_ATTENTION.
    """

    def __init__(self, model, cache: KVCache, max_batch: int, window_step: int = 64, capture: bool = True,
                 in_place: bool = True, attention: str = "portable"):
        if attention not in GRAPH_ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(GRAPH_ATTENTION)}, not {attention!r}")
        if cache.n_slots < max_batch + 1:
            raise ValueError(f"the cache needs a spare slot for padding rows: {cache.n_slots} slots "
                             f"for max_batch {max_batch}")
        device = cache.k.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.model, self.cache, self.capture, self.in_place = model, cache, capture, in_place
        self.attention_backends = GRAPH_ATTENTION[attention]
        self.max_batch = max_batch
        self.batch_sizes = batch_buckets(max_batch)
        self.windows = window_buckets(cache.max_len, window_step)
        self.padding_slot = cache.n_slots - 1
        # Rows: tokens, the slot each row writes to, positions, and which output row answers
        # input i. Filled on the host (two pinned buffers, so one can be filled while the
        # other's copy is still queued), copied to the device in one transfer per step.
        pinned = device.type == "cuda"
        self._inputs = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self._staging = [torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def plan(self, slots: list[int], positions: list[int]) -> StepShape:
        """The shape for a live batch in these slots at these positions."""
        if not positions:
            raise ValueError("decode of an empty batch")
        if min(positions) < 0:
            raise ValueError("decode positions must be >= 0")
        if self.padding_slot in slots:
            raise ValueError(f"slot {self.padding_slot} is the padding slot; no sequence may own it")
        window = smallest_at_least(max(positions) + 1, self.windows)
        batch = smallest_at_least(len(slots), self.batch_sizes)
        if self.in_place and max(slots) < self.max_batch:
            span = smallest_at_least(max(slots) + 1, self.batch_sizes)
            if span <= 2 * batch:
                return StepShape(IN_PLACE, span, window)
        return StepShape(GATHER, batch, window)

    def shapes(self) -> list[StepShape]:
        """Every shape plan() can return, largest first (so smaller captures fit in the
        memory the first one reserved). A gather batch of at least half max_batch never
        happens: its span is at most twice its size, which is in place."""
        shapes = [StepShape(IN_PLACE, rows, w) for rows in self.batch_sizes for w in self.windows] \
            if self.in_place else []
        shapes += [StepShape(GATHER, rows, w) for rows in self.batch_sizes for w in self.windows
                   if not self.in_place or 2 * rows < self.max_batch]
        return sorted(shapes, key=lambda s: (s.rows, s.window), reverse=True)

    def decode(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        shape = self.plan(slots, positions)
        if not self.capture:
            self._stage(shape, tokens, slots, positions)
            return self._select(self._run(shape), shape, len(tokens))
        if shape not in self._graphs:  # before staging: capturing overwrites the input buffers
            self._graphs[shape] = self._capture(shape)
        self._stage(shape, tokens, slots, positions)
        graph, logits = self._graphs[shape]
        graph.replay()
        return self._select(logits, shape, len(tokens))

    def capture_all(self, progress=None) -> None:
        """Capture every shape now, instead of on first use while serving."""
        if not self.capture:
            return
        for shape in self.shapes():
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(shape)
            if progress is not None:
                progress.update(1)

    def _stage(self, shape: StepShape, tokens: list[int], slots: list[int], positions: list[int]) -> None:
        """Padding everywhere (dummy token 0 at position 0 of the padding slot), then the live
        rows: at their slot's row (in place) or first, in input order (gather)."""
        staging, copied = self._staging[self._turn], self._copied[self._turn]
        if copied is not None:
            copied.synchronize()  # its previous copy must have left before we overwrite it
        n = len(tokens)
        staging[0].zero_(), staging[1].fill_(self.padding_slot), staging[2].zero_()
        slots_t = torch.tensor(slots)
        rows = slots_t if shape.layout == IN_PLACE else torch.arange(n)
        staging[0, rows], staging[1, rows], staging[2, rows] = torch.tensor(tokens), slots_t, torch.tensor(positions)
        staging[3, :n] = rows
        self._inputs.copy_(staging, non_blocking=True)
        if staging.is_pinned():
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
        self._turn = 1 - self._turn

    def _select(self, logits: torch.Tensor, shape: StepShape, n: int) -> torch.Tensor:
        """Row i of the result answers input i."""
        if shape.layout == GATHER:
            return logits[:n]
        return logits.index_select(0, self._inputs[3, :n])

    def _run(self, shape: StepShape) -> torch.Tensor:
        rows = shape.rows
        tokens, slots, positions = self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows]
        slot_range = (0, rows) if shape.layout == IN_PLACE else None  # in place: row i reads cache row i
        return self.model.decode(tokens, self.cache, slots, positions, window=shape.window, slot_range=slot_range,
                                 backends=self.attention_backends)

    def _capture(self, shape: StepShape) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (first calls allocate and pick kernels), then capture.
        The warm-up runs the step for real, so the inputs are all padding rows first."""
        self._inputs[0].zero_(), self._inputs[1].fill_(self.padding_slot), self._inputs[2].zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(shape)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(shape)
        return graph, logits
