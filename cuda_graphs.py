"""CUDA-graph decoding: one captured decode step per (batch bucket, window bucket).

On a GPU a decode step of a small model is bound by the CPU launching kernels, not by the
GPU running them (Hugging Face generate: 6.8 ms per step at batch 128 on an H200, where
reading the weights and live KV takes ~0.4 ms). Replaying a captured graph launches the
whole step at once.

A graph fixes every shape and address, so:
  - the live batch is padded up to a batch bucket (powers of two up to max_batch); the
    padding rows decode a dummy token at position 0 of a spare KV slot that no request
    owns, so they never touch a live sequence's cache;
  - attention reads the cache up to a window bucket (multiples of window_step) at or
    above the furthest live position, not the whole allocated context: at large batch
    the KV reads, not the weights, dominate the step;
  - inputs go through static buffers, filled by one host-to-device copy per step.

The same padded, bucketed path runs without graphs (capture=False): on CPU, where it is
what the tests check, and as the eager reference on a GPU.
"""
from __future__ import annotations

import torch

from model import KVCache


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


class DecodeGraphs:
    """Bucketed decode over a KV cache with one spare slot (the last) for padding rows.

    decode(tokens, slots, positions) takes host lists, so choosing the buckets needs no
    device sync; it returns float32 logits (len(tokens), V) on the model's device. With
    capture=True (CUDA only) each bucket pair is captured on first use, or ahead of time
    by capture_all(), and replayed after.
    """

    def __init__(self, model, cache: KVCache, max_batch: int, window_step: int = 64, capture: bool = True):
        if cache.n_slots < max_batch + 1:
            raise ValueError(f"the cache needs a spare slot for padding rows: {cache.n_slots} slots "
                             f"for max_batch {max_batch}")
        device = cache.k.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_sizes = batch_buckets(max_batch)
        self.windows = window_buckets(cache.max_len, window_step)
        self.padding_slot = cache.n_slots - 1
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._slots = torch.full((max_batch,), self.padding_slot, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        # Staging on the host; pinned memory lets the copy run without blocking the host.
        self._staging = torch.zeros(3, max_batch, dtype=torch.long, pin_memory=device.type == "cuda")
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def buckets_for(self, positions: list[int]) -> tuple[int, int]:
        """(batch bucket, window bucket) for a live batch at these positions."""
        if not positions:
            raise ValueError("decode of an empty batch")
        return (smallest_at_least(len(positions), self.batch_sizes),
                smallest_at_least(max(positions) + 1, self.windows))

    def decode(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        batch, window = self.buckets_for(positions)
        if min(positions) < 0:
            raise ValueError("decode positions must be >= 0")
        if self.padding_slot in slots:
            raise ValueError(f"slot {self.padding_slot} is the padding slot; no sequence may own it")
        if not self.capture:
            self._stage(tokens, slots, positions, batch)
            return self._run(batch, window)[: len(tokens)]
        key = (batch, window)
        if key not in self._graphs:  # before staging: capturing overwrites the input buffers
            self._graphs[key] = self._capture(batch, window)
        self._stage(tokens, slots, positions, batch)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[: len(tokens)]

    def capture_all(self, progress=None) -> None:
        """Capture every bucket pair now (largest batch first, so smaller graphs fit in the
        memory the first one reserved), instead of on first use while serving."""
        if not self.capture:
            return
        for batch in reversed(self.batch_sizes):
            for window in reversed(self.windows):
                if (batch, window) not in self._graphs:
                    self._graphs[(batch, window)] = self._capture(batch, window)
                if progress is not None:
                    progress.update(1)

    def _stage(self, tokens: list[int], slots: list[int], positions: list[int], batch: int) -> None:
        """Live rows first, then padding rows (dummy token 0 at position 0 of the padding slot)."""
        n = len(tokens)
        staging = self._staging[:, :batch]
        staging[0, :n], staging[1, :n], staging[2, :n] = (torch.tensor(tokens), torch.tensor(slots),
                                                          torch.tensor(positions))
        staging[0, n:], staging[1, n:], staging[2, n:] = 0, self.padding_slot, 0
        for buffer, row in zip((self._tokens, self._slots, self._positions), staging):
            buffer[:batch].copy_(row, non_blocking=True)

    def _run(self, batch: int, window: int) -> torch.Tensor:
        return self.model.decode(self._tokens[:batch], self.cache, self._slots[:batch],
                                 self._positions[:batch], window=window)

    def _capture(self, batch: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (first calls allocate and pick kernels), then capture.
        Capture runs the step once for real, so the inputs point at the padding slot."""
        self._tokens[:batch].zero_()
        self._slots[:batch].fill_(self.padding_slot)
        self._positions[:batch].zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(batch, window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(batch, window)
        return graph, logits
