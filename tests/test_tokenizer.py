import os
import shutil
import subprocess
import sys

import pytest

import tokenizer as tk


def test_known_ids_for_indented_code():
    enc = tk.load_tokenizer()
    ids = enc.encode_ordinary("def f(x):\n        return x\n")
    # 7 spaces are one whitespace-run token (50262); the 8th space belongs to " return".
    assert ids == [4299, 277, 7, 87, 2599, 198, 50262, 1441, 2124, 198]
    assert enc.decode(ids) == "def f(x):\n        return x\n"


def test_special_token_ids():
    enc = tk.load_tokenizer()
    assert enc.n_vocab == tk.N_VOCAB == 50284
    for text, token_id in tk.SPECIAL_TOKENS.items():
        assert enc.encode(text, allowed_special="all") == [token_id]
    assert (tk.EOT_ID, tk.FIM_PREFIX_ID, tk.FIM_MIDDLE_ID, tk.FIM_SUFFIX_ID) == (50256, 50281, 50282, 50283)
    # whitespace runs of 2..25 spaces
    assert enc.encode_single_token(b"  ") == 50257 and enc.encode_single_token(b" " * 25) == 50280


def test_fewer_tokens_than_gpt2_on_python():
    enc = tk.load_tokenizer()
    source = open(tk.__file__).read()
    ranks = tk.build_p50k_ranks()
    gpt2 = __import__("tiktoken").Encoding(
        "gpt2-local", pat_str=enc._pat_str, special_tokens={"<|endoftext|>": 50256},
        mergeable_ranks={t: r for t, r in ranks.items() if r < 50256})
    assert len(enc.encode_ordinary(source)) < 0.9 * len(gpt2.encode_ordinary(source))


def copy_vocab(tmp_path):
    bpe, js = tk.gpt2_vocab_files()
    return shutil.copy(bpe, tmp_path / "vocab.bpe"), shutil.copy(js, tmp_path / "encoder.json")


def test_tampered_vocabulary_is_rejected(tmp_path):
    bpe, js = copy_vocab(tmp_path)
    lines = open(bpe, encoding="utf-8").read().split("\n")
    lines[1000], lines[1001] = lines[1001], lines[1000]  # swap two merge priorities
    open(bpe, "w", encoding="utf-8").write("\n".join(lines))
    with pytest.raises(tk.TokenizerError, match="rejected"):
        tk.build_p50k_ranks(bpe, js)


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    bpe, js = copy_vocab(tmp_path)
    os.remove(js)
    with pytest.raises(tk.TokenizerError, match="missing"):
        tk.build_p50k_ranks(bpe, js)


def test_untampered_copy_builds_the_published_ranks(tmp_path):
    bpe, js = copy_vocab(tmp_path)
    assert len(tk.build_p50k_ranks(bpe, js)) == 50280  # 50256 GPT-2 + 24 space runs


def test_identical_to_tiktokens_own_p50k_edit(tmp_path):
    """tiktoken's own loader, fed our ranks through its cache (it re-verifies the sha256 it pins),
    must give the same ids as our encoding: that is what it would download online."""
    (tmp_path / tk.tiktoken_cache_name()).write_bytes(tk.serialize_ranks(tk.build_p50k_ranks()))
    sample = open(tk.__file__).read() + "\n<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>z<|endoftext|>"
    code = ("import sys, tiktoken, tokenizer\n"
            "s = sys.stdin.read()\n"
            "ref = tiktoken.get_encoding('p50k_edit')\n"
            "ours = tokenizer.load_tokenizer()\n"
            "a, b = ref.encode(s, allowed_special='all'), ours.encode(s, allowed_special='all')\n"
            "print(len(a), a == b, ref.n_vocab)\n")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], input=sample, capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(tk.__file__), timeout=60)
    assert out.returncode == 0, out.stderr
    n, same, n_vocab = out.stdout.split()
    assert int(n) > 1000 and same == "True" and n_vocab == "50284"


def test_fim_layouts():
    pre, suf = [1, 2], [3]
    assert tk.fim_ids(pre, suf, "psm") == [tk.FIM_PREFIX_ID, 1, 2, tk.FIM_SUFFIX_ID, 3, tk.FIM_MIDDLE_ID]
    assert tk.fim_ids(pre, suf, "spm") == [tk.FIM_PREFIX_ID, tk.FIM_SUFFIX_ID, 3, tk.FIM_MIDDLE_ID, 1, 2]
    with pytest.raises(ValueError):
        tk.fim_ids(pre, suf, "mps")
