"""The serving engine: requests in, streamed completions out, one model shared by all.

An `Engine` owns the model and its KV cache and runs a loop in a background thread. Each
loop iteration is one *step*: waiting requests join the batch when a KV slot is free
(continuous batching), the running rows decode one token each in a single batched model
call, and new prompts are prefilled in chunks bounded by a per-step token budget, so a
long prompt delays everyone's next token by one chunk, never by the whole prompt.

The parts, each small and owned by the loop thread unless said otherwise:
  Vocabulary    every token's bytes and which ids end generation, computed once
  TokenHealer   which tokens may start a completion whose prompt ended inside a token
  Detokenizer   token ids -> text pieces that are safe to stream (UTF-8, stop strings)
  Sampler       greedy / temperature / top-k / top-p over the whole batch at once
  ModelRunner   the KV cache, the prefix cache (prefix_cache.py: earlier prompts' KV in blocks,
                copied into a new request's slot so only the rest of its prompt is prefilled),
                and the model calls
  Scheduler     waiting queue, slot assignment (a free slot holding the prompt's start first),
                prefill budget
  RequestHandle the caller's side of one request (any thread, or an asyncio loop)
"""
from __future__ import annotations

import asyncio
import bisect
import codecs
import collections
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from cuda_graphs import GRAPH_ATTENTION, DecodeGraphs
from model import host_to_device
from prefix_cache import PrefixCache
from tokenizer import DEFAULT_FIM_LAYOUT, EOT_ID, FIM_LAYOUTS, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, fim_ids, load_tokenizer

log = logging.getLogger(__name__)

# How long the idle loop sleeps on its condition before beating again: short enough that
# a health check sees a fresh heartbeat, long enough to cost nothing.
IDLE_WAIT_S = 0.25
FIM_MARKER_TOKENS = 3
MAX_TRUNCATION_STEP = 64  # tokens; see truncation_step


# ----------------------------------------------------------------------------- public types


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    heal: bool = True  # token healing of a prompt that ends inside a token

    def validate(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class EngineConfig:
    max_batch: int = 32  # KV-cache slots = max concurrently running requests
    max_context: int = 0  # 0 = the model's block_size
    max_waiting: int = 256  # bounded waiting queue
    max_queue_wait_s: float = 10.0
    prefill_chunk: int = 512  # prompt tokens prefilled per engine step, across requests
    # Prefix caching: a prompt starts from the KV of earlier prompts that began the same way
    # (the free slot holding the longest beginning, and the block pool of prefix_cache.py).
    prefix_cache: bool = True
    prefix_block_tokens: int = 16  # tokens per cached block: a hit covers whole blocks
    prefix_cache_mb: float = 512.0  # memory bound of the block pool (MiB)
    prefix_cache_blocks: int = 0  # 0: as many blocks as prefix_cache_mb holds
    # CUDA devices only (cuda_graphs.py): decode steps replayed from captured graphs, per
    # batch bucket and per attention-window bucket of graph_window_step positions.
    cuda_graphs: bool = True
    graph_window_step: int = 64
    # The SDPA kernels captured decode steps may use (cuda_graphs.GRAPH_ATTENTION): "portable"
    # (flash, memory-efficient, math: what every other path uses) or "any" (PyTorch's own
    # choice, cuDNN's included). gpu_check.py measures both; "any" waits for a side-by-side
    # figure and a greedy check on a GPU.
    graph_attention: str = "portable"


def default_prefill_chunk(device) -> int:
    """Prompt tokens per engine step. A step's decode rows wait for its prefill, so the chunk
    is what one step can prefill in about the time of a few decode steps: 512 tokens on a
    CPU; a GPU prefills 4096 tokens of the 124M model in a few ms, and with 512 a server at
    128 users admits fewer requests per step than finish (prompts of ~300 tokens)."""
    return 4096 if torch.device(device).type == "cuda" else 512


class QueueFull(Exception):
    """The waiting queue is at max_waiting."""


class EngineDraining(Exception):
    """The engine takes no new work (draining or shut down)."""


class EngineFailed(EngineDraining):
    """The engine loop died; a subclass of EngineDraining so callers that map 'not taking
    work' to 503 need no extra case."""


@dataclass
class StreamEvent:
    text: str  # new text since the previous event ('' allowed on the final one)
    finish_reason: str | None = None  # None | 'stop' | 'length' | 'abort' | 'error'
    error: str | None = None  # e.g. 'queue_timeout', 'engine_failed'
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    error: str | None = None
    queue_s: float = 0.0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens not prefilled: reused by prefix caching


class EngineObserver:
    """No-op hooks, called from the engine thread (on_submit/on_reject from submit's caller)."""

    def on_submit(self): ...
    def on_reject(self, reason: str): ...
    def on_first_token(self, ttft_s: float, queue_s: float): ...
    def on_finish(self, completion: Completion): ...
    def on_step(self, batch_size: int, prefill_tokens: int, decode_tokens: int, step_s: float): ...
    def on_prefix_lookup(self, query_tokens: int, hit_tokens: int): ...  # at admission, cache on or off
    def on_prefix_evict(self, blocks: int): ...


def raise_for_rejection(rejection: str | None, max_waiting: int, failure) -> None:
    """The exception for an admission check's refusal ('queue_full' | 'draining' | 'failed')."""
    if rejection == "queue_full":
        raise QueueFull(f"{max_waiting} requests already waiting")
    if rejection == "draining":
        raise EngineDraining("the engine is draining and takes no new requests")
    if rejection == "failed":
        raise EngineFailed(f"the engine has failed: {failure!r}")


def prefix_cache_stats(cache: PrefixCache | None) -> dict[str, int]:
    """Blocks and bytes a prefix cache holds now, its capacity, evictions so far (all 0 when
    there is none): plain ints, so any thread may read them."""
    if cache is None:
        return dict(blocks_used=0, blocks_capacity=0, bytes_used=0, bytes_capacity=0, evictions=0)
    return dict(blocks_used=cache.blocks_used, blocks_capacity=cache.capacity_blocks, bytes_used=cache.bytes_used,
                bytes_capacity=cache.capacity_blocks * cache.bytes_per_block, evictions=cache.evictions)


def check_request(prompt: list[int], params: SamplingParams, max_context: int, vocab_size: int) -> None:
    """ValueError naming what is wrong with a request, before it is queued anywhere."""
    params.validate()
    if not prompt:
        raise ValueError("prompt is empty: nothing to complete")
    if len(prompt) >= max_context:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_context {max_context} "
                         f"(at most {max_context - 1})")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must be in 0..{vocab_size - 1}")


# ----------------------------------------------------------------------------- prompts

_FIM_MARKER = re.compile(r"<(fim_(?:prefix|suffix|middle))>|<\|(fim_(?:prefix|suffix|middle))\|>")


def split_fim_prompt(prompt: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt rendered with textual FIM markers (PSM or SPM order,
    `<fim_x>` or `<|fim_x|>`), or None when it has no suffix marker. Text after the middle
    marker is the start of the middle, contiguous with the prefix, so it joins the prefix."""
    marks = list(_FIM_MARKER.finditer(prompt))
    kinds = [m.group(1) or m.group(2) for m in marks]
    if "fim_suffix" not in kinds:
        return None
    prefix, suffix, section, pos = [], [], "fim_prefix", 0
    for mark, kind in zip(marks, kinds):
        (suffix if section == "fim_suffix" else prefix).append(prompt[pos : mark.start()])
        section, pos = kind, mark.end()
    (suffix if section == "fim_suffix" else prefix).append(prompt[pos:])
    return "".join(prefix), "".join(suffix)


def truncation_step(budget: int) -> int:
    """Granularity of prompt truncation: at most 1/16 of the budget (64 tokens) given up so
    that the prompt's start moves once per `step` typed tokens, not at every keystroke."""
    return max(1, min(MAX_TRUNCATION_STEP, budget // 16))


def tokens_to_drop(length: int, budget: int) -> int:
    """How many leading tokens to cut so `length` tokens fit `budget`: a multiple of the
    truncation step. Cutting exactly the excess would move the start of the prompt with
    every keystroke as the text grows at its end, and a moved start is a prefix-cache miss
    for the whole prompt; cutting on a grid keeps consecutive requests' starts equal."""
    if length <= budget:
        return 0
    step = truncation_step(budget)
    return -(-(length - budget) // step) * step


def truncate_fim(prefix: list[int], suffix: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Keep the END of the prefix and the START of the suffix (the text nearest the cursor);
    the suffix gets at most a quarter of the budget unless the prefix leaves it more. Both
    cuts move in steps (see tokens_to_drop): in SPM the suffix comes first, so a suffix cut
    that shrank with every typed token would make every request a cache miss."""
    if len(prefix) + len(suffix) <= budget:
        return prefix, suffix
    step = truncation_step(budget)
    room_beside_prefix = (budget - len(prefix)) // step * step
    suffix_budget = min(len(suffix), max(budget // 4, room_beside_prefix))
    return prefix[tokens_to_drop(len(prefix), budget - suffix_budget) :], suffix[:suffix_budget]


def build_prompt_ids(enc, prompt: str, suffix: str | None, max_prompt_tokens: int,
                     fim_layout: str = DEFAULT_FIM_LAYOUT) -> list[int]:
    """Token ids for a completion request. User text never yields special tokens except
    through the FIM markers; a FIM prompt (markers, or `suffix` given) uses `fim_layout`."""
    if fim_layout not in FIM_LAYOUTS:
        raise ValueError(f"unknown FIM layout {fim_layout!r}; expected one of {FIM_LAYOUTS}")
    parts = split_fim_prompt(prompt)
    if parts is not None:
        prefix, fim_suffix = parts[0], parts[1] + (suffix or "")
    elif suffix is not None:
        prefix, fim_suffix = _FIM_MARKER.sub("", prompt), suffix
    else:
        text = _FIM_MARKER.sub("", prompt)
        if not text:
            raise ValueError("prompt is empty: nothing to complete")
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        ids = enc.encode_ordinary(text)
        return ids[tokens_to_drop(len(ids), max_prompt_tokens) :]
    if not prefix and not fim_suffix:
        raise ValueError("prompt and suffix are both empty: nothing to complete")
    budget = max_prompt_tokens - FIM_MARKER_TOKENS
    if budget < 1:
        raise ValueError(f"max_prompt_tokens {max_prompt_tokens} leaves no room for a FIM prompt")
    pre, suf = truncate_fim(enc.encode_ordinary(prefix), enc.encode_ordinary(fim_suffix), budget)
    return fim_ids(pre, suf, fim_layout)


# ----------------------------------------------------------------------------- vocabulary


class Vocabulary:
    """What the engine needs of the tokenizer, precomputed once per engine."""

    def __init__(self, enc, model_vocab_size: int):
        # Ids the model may emit: the padded rows past the tokenizer's vocabulary are not tokens.
        self.size = min(enc.n_vocab, model_vocab_size)
        self.token_bytes = [self._bytes(enc, i) for i in range(enc.n_vocab)]
        special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
        # <|endoftext|> ends a document and a FIM middle; a FIM marker in the output means
        # the model has left the middle, so every special token ends generation.
        self.stop_ids = frozenset(special | {EOT_ID, FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID})
        self.ordinary_ids = [i for i in range(self.size) if i not in self.stop_ids and self.token_bytes[i]]

    @staticmethod
    def _bytes(enc, token_id: int) -> bytes:
        try:
            return enc.decode_single_token_bytes(token_id)
        except KeyError:  # a hole in the id space: never a real token
            return b""


# ----------------------------------------------------------------------------- token healing


class TokenHealer:
    """Token healing: a prompt that ends inside a token (above all in trailing indentation)
    sits on a token boundary the model never saw in training, e.g. '\\n' + '    ' where
    training text always has '\\n' + '   ' + ' if'. We back off the last token and constrain
    the output to bytes consistent with it: each token must either start with the backed-off
    bytes still to match, or be a prefix of them (so '   ' then ' if' is reachable).

    Tokens are kept sorted by their bytes, so those extending a prefix form one contiguous
    range found by bisection: no scan of the vocabulary per request."""

    def __init__(self, vocab: Vocabulary, device):
        order = sorted(vocab.ordinary_ids, key=vocab.token_bytes.__getitem__)
        self._keys = [vocab.token_bytes[i] for i in order]
        self._sorted_ids = torch.tensor(order, dtype=torch.long, device=device)
        self._id_of = {vocab.token_bytes[i]: i for i in vocab.ordinary_ids}
        self._token_bytes = vocab.token_bytes
        self._device = device

    def extension_range(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi) in sorted order of the tokens whose bytes start with prefix."""
        lo = bisect.bisect_left(self._keys, prefix)
        stem = prefix.rstrip(b"\xff")  # the smallest byte string above every extension
        hi = len(self._keys) if not stem else bisect.bisect_left(self._keys, stem[:-1] + bytes([stem[-1] + 1]))
        return lo, hi

    def backoff(self, prompt: list[int]) -> bytes:
        """Bytes of the last prompt token if healing applies (an ordinary token that other
        tokens extend, not the only token), else b''."""
        if len(prompt) < 2 or self._id_of.get(self._token_bytes[prompt[-1]]) != prompt[-1]:
            return b""
        lo, hi = self.extension_range(self._token_bytes[prompt[-1]])
        return self._token_bytes[prompt[-1]] if hi - lo > 1 else b""

    def allowed_ids(self, remaining: bytes) -> torch.Tensor:
        """Ids of the tokens consistent with the bytes still to match."""
        lo, hi = self.extension_range(remaining)
        prefixes = [self._id_of[remaining[:n]] for n in range(1, len(remaining)) if remaining[:n] in self._id_of]
        if not prefixes:
            return self._sorted_ids[lo:hi]
        return torch.cat([self._sorted_ids[lo:hi], host_to_device(torch.tensor(prefixes), self._device)])

    def advance(self, remaining: bytes, token_id: int) -> bytes:
        """The bytes still to match after token_id (which allowed_ids admitted)."""
        data = self._token_bytes[token_id]
        return b"" if data.startswith(remaining) else remaining[len(data) :]


# ----------------------------------------------------------------------------- detokenizer


class Detokenizer:
    """Turns one request's token ids into text pieces that are safe to stream: a multi-byte
    UTF-8 character split across tokens is held until complete, and text that could be the
    start of a stop string is held until it is known not to be one (then flushed)."""

    def __init__(self, token_bytes: list[bytes], stop: tuple[str, ...] = (), skip_bytes: int = 0):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._held = ""
        self._skip = skip_bytes  # healed bytes: already in the prompt, not to be returned again
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Text released by one more token ('' while held back)."""
        data = self._token_bytes[token_id]
        if self._skip:
            cut = min(self._skip, len(data))
            data, self._skip = data[cut:], self._skip - cut
        self._held += self._utf8.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held, at the end of generation."""
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            text, self._held = self._held[: min(hits)], ""
            return text
        keep = 0 if final else self._stop_prefix_len()
        text, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return text

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the held text that begins some stop string."""
        longest = max((len(s) for s in self._stops), default=1) - 1
        for n in range(min(longest, len(self._held)), 0, -1):
            tail = self._held[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


# ----------------------------------------------------------------------------- requests


class EventOutbox:
    """Stream events on their way to asyncio consumers, handed over once per engine step:
    one wake-up of each event loop per step, not one per token per request (at 128 streams
    the per-event wake-ups, each a write to the loop's self-pipe, cost the loop and the
    engine thread more than the events themselves)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StreamEvent]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: StreamEvent) -> None:
        with self._lock:
            self._pending.setdefault(loop, []).append((queue, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumers' loop is closed: nobody is listening
                pass


def _deliver(items: list[tuple[asyncio.Queue, StreamEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class RequestHandle:
    """The caller's side of one request. Events come from the engine thread; result()
    blocks a thread, stream() serves an asyncio loop, cancel() works from anywhere."""

    def __init__(self, request_id: str, wake_engine, outbox: EventOutbox):
        self.request_id = request_id
        self._wake_engine = wake_engine
        self._outbox = outbox
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._backlog: list[StreamEvent] = []  # events before stream() subscribed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._completion: Completion | None = None
        self.cancelled = False

    def cancel(self) -> None:
        if not self._done.is_set() and not self.cancelled:
            self.cancelled = True
            self._wake_engine()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return self._completion

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Events until the final one; leaving early (client gone) cancels the request."""
        queue = self._subscribe(asyncio.get_running_loop())
        finished, held = False, None
        try:
            while not finished:
                event, held = held or await queue.get(), None
                # Whatever else is queued joins this event (one yield, not one per token) —
                # except a failure, which must not swallow the text before it.
                while event.finish_reason is None and not queue.empty():
                    later = queue.get_nowait()
                    if later.finish_reason in ("abort", "error"):
                        held = later
                        break
                    event = StreamEvent(event.text + later.text, later.finish_reason, later.error,
                                        later.prompt_tokens, later.completion_tokens)
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.cancel()

    def _subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        with self._lock:
            if self._queue is not None:
                raise RuntimeError(f"request {self.request_id} is already being streamed")
            self._queue, self._loop = asyncio.Queue(), loop
            for event in self._backlog:
                self._queue.put_nowait(event)
            self._backlog = []
            return self._queue

    def take_events(self) -> list[StreamEvent]:
        """For a consumer that polls instead of streaming (the engine process forwards
        events this way): the events so far, oldest first, each returned once."""
        with self._lock:
            events, self._backlog = self._backlog, []
            return events

    # The producer's side: the engine loop, or engine_process.py's receiver in the HTTP process.

    def deliver(self, event: StreamEvent) -> None:
        with self._lock:
            if self._loop is None:
                self._backlog.append(event)
                return
            self._outbox.put(self._loop, self._queue, event)

    def complete(self, event: StreamEvent, completion: Completion) -> None:
        self._completion = completion
        self.deliver(event)
        self._done.set()


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it. `prompt` is what is fed to the model (healing may
    have backed off its last token); the KV slot holds (prompt + output)[:num_cached]."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int
    prompt_tokens: int  # as submitted, for usage
    detok: Detokenizer
    handle: RequestHandle
    generator: torch.Generator | None
    heal_remaining: bytes
    submitted_at: float
    slot: int = -1
    num_cached: int = 0
    reused_tokens: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished: bool = False
    output_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    @property
    def prefill_left(self) -> int:
        return max(0, len(self.prompt) - self.num_cached)

    def prefilled_prompt(self) -> list[int]:
        """The prompt tokens whose KV prefill has put in the slot. Generated tokens' KV is
        never reused: decode computes it with other kernels than a prefill of the same
        tokens would, and a cache hit must attend to exactly what prefill produces."""
        return self.prompt[: self.num_cached]


# ----------------------------------------------------------------------------- sampler


class Sampler:
    """Next tokens for a batch of rows in one pass: greedy rows by argmax, sampled rows by
    inverse-CDF with one uniform per row from the request's own generator, so a seeded
    request draws the same numbers whatever else is in the batch."""

    def __init__(self, vocab: Vocabulary, healer: TokenHealer):
        self._vocab = vocab
        self._healer = healer

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        logits = self._constrain(logits, seqs)
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        tokens = (first_argmax(logits) if len(sampled) < len(seqs)
                  else torch.zeros(len(seqs), dtype=torch.long, device=logits.device))
        plain = [i for i in sampled if self._is_plain(seqs[i].params)]
        filtered = [i for i in sampled if not self._is_plain(seqs[i].params)]
        for rows in (plain, filtered):
            if rows:
                index = host_to_device(torch.tensor(rows), logits.device)
                tokens[index] = self._sample_rows(logits[index], [seqs[i] for i in rows])
        return tokens.tolist()  # the step's one device-to-host sync

    @staticmethod
    def _is_plain(params: SamplingParams) -> bool:
        return params.top_k == 0 and params.top_p >= 1.0

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if logits.shape[-1] > self._vocab.size:
            logits[:, self._vocab.size :] = float("-inf")
        for row, seq in enumerate(seqs):
            if seq.heal_remaining:
                allowed = self._healer.allowed_ids(seq.heal_remaining)
                kept = logits[row, allowed]
                logits[row] = float("-inf")
                logits[row, allowed] = kept
        return logits

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, then top-k and top-p on the sorted candidates (sorted only when some
        row filters: a full sort of the vocabulary is the expensive part)."""
        device = logits.device
        temps = host_to_device(torch.tensor([s.params.temperature for s in seqs]), device)[:, None]
        uniforms = host_to_device(torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float64)
                                             for s in seqs]), device)
        if all(self._is_plain(s.params) for s in seqs):
            return _inverse_cdf(torch.softmax(logits / temps, dim=-1), uniforms)
        ks = [s.params.top_k for s in seqs]
        width = logits.shape[-1] if 0 in ks else min(max(ks), logits.shape[-1])
        values, ids = logits.topk(width, dim=-1)  # before temperature, which keeps the order
        values = values / temps
        row_k = host_to_device(torch.tensor([k or width for k in ks]), device)
        values = values.masked_fill(torch.arange(width, device=device)[None, :] >= row_k[:, None], float("-inf"))
        probs = torch.softmax(values, dim=-1)
        top_p = host_to_device(torch.tensor([s.params.top_p for s in seqs]), device)
        # Keep the smallest head whose mass reaches top_p: drop a token when the mass
        # before it already does (so the most likely token always stays).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
        choice = _inverse_cdf(probs, uniforms)
        return ids.gather(1, choice[:, None])[:, 0]


def first_argmax(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """logits.argmax(-1), ties to the first index as argmax does, in two passes: the max of
    each block of `block` ids, then the argmax inside the winning block. On CPU argmax over a
    50,304-wide row is scalar code while max is vectorized: 2.6 ms -> 0.24 ms at 64 rows."""
    rows, width = logits.shape
    if logits.device.type != "cpu" or width % block:
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, width // block, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # the first block holding the row's max
    return best * block + blocks[torch.arange(rows), best].argmax(dim=-1)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index per row where the cumulative mass first exceeds u * total (u in [0, 1))."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = (uniforms[:, None] * total).to(cdf.dtype)
    # u * total can round up to total, which would select a zero-mass tail entry.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


# ----------------------------------------------------------------------------- model runner


class ModelRunner:
    """The KV cache (one slot per running request), the prefix cache that outlives the
    requests (None when off), and the model calls that fill them."""

    def __init__(self, model, config: EngineConfig, max_context: int, device):
        self.model = model
        self.device = device
        use_graphs = config.cuda_graphs and torch.device(device).type == "cuda"
        # Graph replays pad the batch with rows that write to one spare slot no request owns.
        n_slots = config.max_batch + int(use_graphs)
        self.cache = model.allocate_kv_cache(n_slots, max_context, device=device)  # model's dtype
        self.graphs = (DecodeGraphs(model, self.cache, config.max_batch, config.graph_window_step,
                                    attention=config.graph_attention) if use_graphs else None)
        self.prefix_cache = None
        if config.prefix_cache and self.cache is not None:  # None: a stand-in model without KV
            self.prefix_cache = PrefixCache.sized(self.cache, config.prefix_block_tokens, config.prefix_cache_mb,
                                                  config.prefix_cache_blocks)

    def prepare(self) -> None:
        """Capture every decode graph before the first request (seconds, once), so no user
        waits for a capture."""
        if self.graphs is not None:
            started = time.perf_counter()
            self.graphs.capture_all()
            log.info("captured %d decode graphs in %.1f s", self.graphs.num_captured, time.perf_counter() - started)

    def restore_prefix(self, seq: Sequence) -> None:
        """Start a newly admitted sequence from the longest cached beginning of its prompt
        (the slot may hold some of it already: seq.num_cached)."""
        if self.prefix_cache is not None:
            seq.num_cached = self.prefix_cache.restore(self.cache, seq.slot, seq.prompt, held=seq.num_cached)
        seq.reused_tokens = seq.num_cached

    def store_prefix(self, seq: Sequence) -> int:
        """Cache the prompt blocks prefill has put in the sequence's slot; returns the number
        of blocks evicted for room."""
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.store(self.cache, seq.slot, seq.prefilled_prompt())

    def prefill(self, plan: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Feed the next n_tokens of each planned sequence's prompt, all in one model call
        (many short prompts each in its own call spent most of the time in per-call
        overhead); logits (n, V) after the last token of each chunk."""
        # One host-to-device copy for all chunks, split on the device (a copy per chunk from
        # pageable memory would each wait for the GPU's queued work).
        chunks = [seq.prompt[seq.num_cached : seq.num_cached + n] for seq, n in plan]
        packed = host_to_device(torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.long), self.device)
        tokens = list(packed.split([len(chunk) for chunk in chunks]))
        slots = [seq.slot for seq, _ in plan]
        starts = [seq.num_cached for seq, _ in plan]
        if hasattr(self.model, "prefill_batch"):
            logits = self.model.prefill_batch(tokens, self.cache, slots, starts)
        else:  # a stand-in model with only the one-sequence call
            logits = torch.stack([self.model.prefill(t, self.cache, slot, start)
                                  for t, slot, start in zip(tokens, slots, starts)])
        for seq, n in plan:
            seq.num_cached += n
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each row's last sampled token at its own position; logits (B, V)."""
        tokens, slots, positions = ([s.output_ids[-1] for s in seqs], [s.slot for s in seqs],
                                    [s.num_cached for s in seqs])
        if self.graphs is not None:
            logits = self.graphs.decode(tokens, slots, positions)
        else:
            # Known here, so no device sync: the live window, and the run of cache rows the
            # (ascending: see Engine._step) slots lie in. Attention reads that run in place
            # unless it is over twice the batch: then gathering the rows' windows reads less.
            tokens_t, slots_t, positions_t = host_to_device(torch.tensor([tokens, slots, positions]), self.device)
            run = (slots[0], slots[-1] + 1)
            logits = self.model.decode(tokens_t, self.cache, slots_t, positions_t, window=max(positions) + 1,
                                       slot_range=run if run[1] - run[0] <= 2 * len(slots) else None)
        for seq in seqs:
            seq.num_cached += 1
        return logits


# ----------------------------------------------------------------------------- scheduler


class Scheduler:
    """FIFO admission into free KV slots, a prefill token budget per step, and the decode
    batch (every running sequence whose prompt is fully cached). The waiting queue is
    shared with submit(): the engine guards it with its lock."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._free_slots = collections.deque(range(config.max_batch))  # least recently freed first
        self._slot_tokens: list[list[int]] = [[] for _ in range(config.max_batch)]

    def sweep_waiting(self, now: float) -> tuple[list[Sequence], list[Sequence]]:
        """Remove (expired, cancelled) waiting sequences."""
        expired = [s for s in self.waiting if now - s.submitted_at > self.config.max_queue_wait_s]
        cancelled = [s for s in self.waiting if s.handle.cancelled and s not in expired]
        if expired or cancelled:
            gone = set(map(id, expired + cancelled))
            self.waiting = collections.deque(s for s in self.waiting if id(s) not in gone)
        return expired, cancelled

    def admit(self, now: float) -> list[Sequence]:
        """Move waiting sequences into free slots; returns those admitted."""
        admitted = []
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.reused_tokens = self._pick_slot(seq.prompt)
            seq.num_cached, seq.admitted_at = seq.reused_tokens, now
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot already holding the longest beginning of this prompt, to the token
        (the user's previous request may have left it there); at least one prompt token is
        always fed, as its logits give the first output token."""
        best, best_len = self._free_slots[0], 0
        if self.config.prefix_cache:
            for slot in self._free_slots:
                n = _common_prefix_len(self._slot_tokens[slot], prompt)
                if n > best_len:
                    best, best_len = slot, n
        self._free_slots.remove(best)
        return best, min(best_len, len(prompt) - 1)

    def prefill_plan(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to feed) within this step's budget, oldest first."""
        plan, budget = [], self.config.prefill_chunk
        for seq in self.running:
            if budget == 0:
                break
            if seq.prefill_left:
                n = min(seq.prefill_left, budget)
                plan.append((seq, n))
                budget -= n
        return plan

    def decode_batch(self) -> list[Sequence]:
        return [s for s in self.running if not s.prefill_left and s.output_ids]

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._slot_tokens[seq.slot] = seq.prefilled_prompt()
        self._free_slots.append(seq.slot)
        seq.slot = -1


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------- engine


class Engine:
    """Owns the model; a background thread runs the steps. submit() and the handles are
    safe from any thread; everything else mutable belongs to the loop thread."""

    def __init__(self, model, config: EngineConfig, enc=None, observer: EngineObserver | None = None, device=None):
        block_size = model.config.block_size
        self.max_context = config.max_context or block_size
        if not 1 < self.max_context <= block_size:
            raise ValueError(f"max_context {self.max_context} must be in 2..block_size ({block_size})")
        if config.max_batch < 1 or config.prefill_chunk < 1 or config.max_waiting < 0:
            raise ValueError(f"invalid engine config {config}")
        if config.graph_attention not in GRAPH_ATTENTION:
            raise ValueError(f"graph_attention must be one of {', '.join(GRAPH_ATTENTION)}, "
                             f"not {config.graph_attention!r}")
        self.config = config
        self.max_batch = config.max_batch
        self.model_id = "code-assistant"
        self.enc = enc if enc is not None else load_tokenizer()
        self.observer = observer or EngineObserver()
        self.device = device if device is not None else next(model.parameters()).device
        self.model = model.eval()  # dropout off: inference must be deterministic
        self._vocab = Vocabulary(self.enc, model.config.vocab_size)
        self._healer = TokenHealer(self._vocab, self.device)
        self._sampler = Sampler(self._vocab, self._healer)
        if config.prefix_block_tokens < 1 or config.prefix_cache_mb < 0 or config.prefix_cache_blocks < 0:
            raise ValueError(f"invalid prefix cache config {config}")
        self._runner = ModelRunner(model, config, self.max_context, self.device)
        self._outbox = EventOutbox()
        self._scheduler = Scheduler(config)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._failure: BaseException | None = None
        self._heartbeat: float | None = None

    # ---- state for health and metrics

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may use: the tokenizer's, not the model's padded rows."""
        return self._vocab.size

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    @property
    def prefix_cache_stats(self) -> dict[str, int]:
        """See prefix_cache_stats(); a scrape may be a step old."""
        return prefix_cache_stats(self._runner.prefix_cache)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def seconds_since_heartbeat(self) -> float:
        return float("inf") if self._heartbeat is None else time.monotonic() - self._heartbeat

    # ---- lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._heartbeat = time.monotonic()
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._is_idle, timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = self._draining = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._finish_everything("engine_stopped")  # whatever a dead/never-started loop left

    # ---- requests

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        handle, rejection = self._offer(prompt_ids, params)
        self._raise_for(rejection)
        return handle

    def _raise_for(self, rejection: str | None) -> None:
        raise_for_rejection(rejection, self.config.max_waiting, self._failure)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Offline convenience: run every prompt, results in order. Submits as slots free up
        (at most max_batch of ours in flight), so nothing sits in the queue long enough to
        hit max_queue_wait_s, and a full queue (shared with a server) is waited out."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        self.start()
        handles: list[RequestHandle] = []
        in_flight: list[RequestHandle] = []
        for prompt, p in zip(prompts, params_list):
            while True:
                in_flight = [h for h in in_flight if not h.done]
                handle, rejection = (None, "busy") if len(in_flight) >= self.max_batch else \
                    self._offer(prompt, p, reject_quietly=True)
                if rejection not in ("busy", "queue_full"):
                    break
                with self._cond:
                    self._cond.wait(0.05)  # the loop notifies after every step
            self._raise_for(rejection)
            handles.append(handle)
            in_flight.append(handle)
        return [h.result() for h in handles]

    def _offer(self, prompt_ids, params: SamplingParams, reject_quietly: bool = False):
        """(handle, None) when queued, else (None, reason). ValueError for a bad request."""
        seq = self._new_sequence(list(prompt_ids), params)
        with self._cond:
            rejection = self._admission_check()
            if rejection is None and seq.max_new > 0:
                self._scheduler.waiting.append(seq)
                self._cond.notify_all()
        if rejection is not None:
            if rejection != "failed" and not (reject_quietly and rejection == "queue_full"):
                self._notify("on_reject", rejection)
            return None, rejection
        self._notify("on_submit")
        if seq.max_new == 0:  # max_tokens=0: nothing to compute
            self._finish(seq, "length")
            self._outbox.flush()
        return seq.handle, None

    def _admission_check(self) -> str | None:
        if self._failure is not None:
            return "failed"
        if self._draining or self._stopping:
            return "draining"
        if len(self._scheduler.waiting) >= self.config.max_waiting:
            return "queue_full"
        return None

    def _new_sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        check_request(prompt, params, self.max_context, self._vocab.size)
        healed = self._healer.backoff(prompt) if params.heal else b""
        fed = prompt[:-1] if healed else prompt
        stop = (params.stop,) if isinstance(params.stop, str) else tuple(params.stop)
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        return Sequence(
            request_id=request_id, prompt=fed, params=params, prompt_tokens=len(prompt),
            max_new=min(params.max_tokens, self.max_context - len(fed)),
            detok=Detokenizer(self._vocab.token_bytes, stop, skip_bytes=len(healed)),
            handle=RequestHandle(request_id, self._wake, self._outbox), generator=self._generator(params),
            heal_remaining=healed, submitted_at=time.monotonic())

    @staticmethod
    def _generator(params: SamplingParams) -> torch.Generator | None:
        if params.temperature == 0:
            return None
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _is_idle(self) -> bool:
        return not self._scheduler.waiting and not self._scheduler.running

    # ---- the loop: run by start()'s thread, or driven step by step by engine_process.py

    @property
    def idle(self) -> bool:
        return self._is_idle()

    def prepare(self) -> None:
        """Before the first step: whatever the model runner sets up once (CUDA graphs)."""
        with torch.inference_mode():
            self._runner.prepare()

    def step(self) -> None:
        """One step (admit, decode, prefill), then its events go out."""
        with torch.inference_mode():  # the model's outputs are inference tensors
            self._step()
        self._outbox.flush()

    def fail(self, exc: BaseException) -> None:
        """The loop cannot go on: refuse new work and fail every request in flight."""
        self._failure = exc
        self._finish_everything("engine_failed")

    def _loop(self) -> None:
        try:
            self.prepare()
            while not self._stopping:
                self._heartbeat = time.monotonic()
                with self._cond:
                    if self._is_idle():
                        self._cond.notify_all()  # wake wait_idle()
                        self._cond.wait(IDLE_WAIT_S)
                        continue
                self.step()
                self._wake()  # wait_idle() and generate() wait for progress
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the clients
            log.exception("engine loop failed; failing all in-flight requests")
            self.fail(exc)
        else:
            self._finish_everything("engine_stopped")

    def _step(self) -> None:
        started = time.perf_counter()
        now = time.monotonic()
        # Cancelled rows go first: their slots free up and their prompt blocks are cached
        # before this step's admissions look them up (a typing user's new request usually
        # arrives together with the cancel of the one it replaces).
        for seq in [s for s in self._scheduler.running if s.handle.cancelled]:
            self._finish(seq, "abort")
        with self._cond:
            expired, cancelled = self._scheduler.sweep_waiting(now)
            admitted = self._scheduler.admit(now)
        for seq in expired:
            self._notify("on_reject", "queue_timeout")
            self._finish(seq, "error", error="queue_timeout")
        for seq in cancelled:
            self._finish(seq, "abort")
        for seq in admitted:  # outside the lock: copying cached KV takes a moment
            self._runner.restore_prefix(seq)
            self._notify("on_prefix_lookup", len(seq.prompt), seq.num_cached)
        # Decode before prefill: rows already running are not made to wait for new prompts.
        # In slot order: a full batch then reads its KV window in place (ModelRunner.decode).
        decode_rows = sorted(self._scheduler.decode_batch(), key=lambda seq: seq.slot)
        if decode_rows:
            self._accept_all(decode_rows, self._runner.decode(decode_rows))
        plan = self._scheduler.prefill_plan()
        self._prefill(plan)
        if decode_rows or plan:
            self._notify("on_step", len(decode_rows) + len(plan), sum(n for _, n in plan), len(decode_rows),
                         time.perf_counter() - started)

    def _prefill(self, plan: list[tuple[Sequence, int]]) -> None:
        """Feed this step's prompt chunks; sample the first token of prompts now complete."""
        if not plan:
            return
        logits = self._runner.prefill(plan)
        done = [row for row, (seq, _) in enumerate(plan) if not seq.prefill_left]
        for row in done:
            self._store_prefix(plan[row][0])  # now, not at the end: a request arriving meanwhile can reuse it
        if done:
            self._accept_all([plan[row][0] for row in done], logits[done])

    def _store_prefix(self, seq: Sequence) -> None:
        evicted = self._runner.store_prefix(seq)
        if evicted:
            self._notify("on_prefix_evict", evicted)

    def _accept_all(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, token in zip(seqs, self._sampler.sample(logits, seqs)):
            self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        if not seq.output_ids:
            seq.first_token_at = time.monotonic()
            self._notify("on_first_token", seq.first_token_at - seq.submitted_at, seq.admitted_at - seq.submitted_at)
        seq.output_ids.append(token)
        if seq.heal_remaining:
            seq.heal_remaining = self._healer.advance(seq.heal_remaining, token)
        if token in self._vocab.stop_ids:
            self._finish(seq, "stop")
            return
        piece = seq.detok.add(token)
        if seq.detok.stopped:
            self._finish(seq, "stop", piece)
        elif len(seq.output_ids) >= seq.max_new:
            self._finish(seq, "length", piece)
        elif piece:
            seq.text_parts.append(piece)
            seq.handle.deliver(StreamEvent(piece))

    def _finish(self, seq: Sequence, reason: str, last_text: str = "", error: str | None = None) -> None:
        """Release the slot, send the final event, complete the handle. Idempotent."""
        if seq.finished:
            return
        seq.finished = True
        if seq.slot >= 0:
            if seq.prefill_left and reason != "error":  # cancelled mid-prompt: keep what was computed
                self._store_prefix(seq)
            self._scheduler.release(seq)
        if reason != "error":
            last_text += seq.detok.flush()
        now = time.monotonic()
        admitted = seq.admitted_at if seq.admitted_at is not None else now
        completion = Completion(
            text="".join(seq.text_parts) + last_text, finish_reason=reason, prompt_tokens=seq.prompt_tokens,
            completion_tokens=len(seq.output_ids), token_ids=list(seq.output_ids), error=error,
            queue_s=admitted - seq.submitted_at,
            ttft_s=(seq.first_token_at - seq.submitted_at) if seq.first_token_at is not None else 0.0,
            latency_s=now - seq.submitted_at, cached_tokens=seq.reused_tokens)
        event = StreamEvent(last_text, reason, error, completion.prompt_tokens, completion.completion_tokens)
        seq.handle.complete(event, completion)
        self._notify("on_finish", completion)

    def _finish_everything(self, error: str) -> None:
        """Fail every waiting and running request so no client hangs on a dead loop."""
        with self._cond:
            waiting, self._scheduler.waiting = list(self._scheduler.waiting), collections.deque()
        for seq in waiting + list(self._scheduler.running):
            try:
                self._finish(seq, "error", error=error)
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("could not fail request %s", seq.request_id)
        self._outbox.flush()
        self._wake()

    def _notify(self, hook: str, *args) -> None:
        """Call an observer hook; a metrics bug must not take the engine down."""
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001
            log.exception("engine observer %s failed", hook)
