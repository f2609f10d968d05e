"""docs/editors.md, exercised: each snippet is read from the page, turned into the exact request
its plugin sends (Continue, Tabby) or run as written (curl, the openai client), against a real
server with API keys on, and the answer is parsed the way that client parses it."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import httpx
import pytest
import yaml

from serve_helpers import REPO, parse_stream, sse_events, thread_server, write_tiny_checkpoint

DOC = os.path.join(REPO, "docs", "editors.md")
DOC_URL = "http://localhost:8000"
KEY = "editors-test-key"
PREFIX = 'def mean(values):\n    """The arithmetic mean."""\n    return '
SUFFIX = "\n\nprint(mean([1, 2, 3]))\n"
# Continue's stop strings for a FIM template: the template's markers plus its defaults
# (core/autocomplete/templating/getStopTokens.ts): about ten, more than OpenAI's cap of 4.
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>", "<file_sep>",
                  "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]
CONTINUE_TEMPERATURE = 0.01   # what its autocomplete sets when the config gives none
TABBY_TEMPERATURE = 0.1       # Tabby's default sampling temperature for completions


def snippet(name: str) -> str:
    """The fenced block right after `<!-- snippet: name -->` in docs/editors.md."""
    text = open(DOC, encoding="utf-8").read()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```\w*\n(.*?)\n```", text, re.S)
    assert match, f"docs/editors.md has no snippet {name!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Block 256, as the CPU config trains: the sizes the doc recommends must fit it.
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", block_size=256)
    with thread_server(ckpt, api_keys=(KEY,)) as srv:
        yield srv


def local_env() -> dict:
    # Loopback must never go through a proxy a CI machine may set.
    return {**os.environ, "CODEASSIST_API_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def stream_post(url: str, body: dict) -> str:
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode()


def greedy(server, **body) -> str:
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "code-assistant", "max_tokens": 16, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ----------------------------------------------------------------------------- Continue


def continue_model(server) -> dict:
    config = yaml.safe_load(snippet("continue-config"))
    model = config["models"][0]
    assert model["provider"] == "openai" and "autocomplete" in model["roles"]
    assert "gpt" not in model["model"].lower()  # else Continue sends chat prompts
    assert model["apiBase"] == DOC_URL + "/v1"
    return {**model, "apiBase": server.url + "/v1"}


def render_handlebars(template: str, **values: str) -> str:
    """Continue's Handlebars rendering, for the only tags a FIM template uses: {{{name}}}."""
    out = re.sub(r"\{\{\{(\w+)\}\}\}", lambda m: values[m.group(1)], template)
    assert "{{" not in out, f"unrendered tag in {template!r}"
    return out


def continue_request(model: dict, prefix: str, suffix: str, max_tokens: int) -> dict:
    """What Continue's openai provider posts for autocomplete (legacy completions endpoint):
    no suffix field; the file's path comment leads the prefix; an empty suffix becomes "\n"."""
    prompt = render_handlebars(model["promptTemplates"]["autocomplete"],
                               prefix=f"# Path: stats.py\n{prefix}", suffix=suffix or "\n")
    return {"model": model["model"], "prompt": prompt, "max_tokens": max_tokens,
            "temperature": CONTINUE_TEMPERATURE, "stop": CONTINUE_STOPS, "stream": True}


def continue_parse(raw: str) -> tuple[str, str]:
    """Continue's SSE reading: `data:` lines of JSON, choices[0].text, until [DONE]; a comment
    line (`: ping`) would end its stream early, so parse_stream rejects any."""
    chunks, done = parse_stream(raw)
    assert done, "no data: [DONE]"
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def test_continue_autocomplete_request(server):
    model = continue_model(server)
    max_tokens = model["defaultCompletionOptions"]["maxTokens"]
    assert 32 <= max_tokens <= 64
    body = continue_request(model, PREFIX, SUFFIX, max_tokens)
    text, _ = continue_parse(stream_post(model["apiBase"] + "/completions", body))
    assert not any(stop in text for stop in CONTINUE_STOPS)
    # Without maxTokens Continue asks for 4096: capped to the context, not rejected.
    text, finish = continue_parse(stream_post(model["apiBase"] + "/completions", {**body, "max_tokens": 4096}))
    assert finish in ("stop", "length")


def test_continue_template_is_the_servers_fim_prompt(server):
    """The rendered markers mean what `suffix` means: the same FIM prompt, the same greedy text."""
    template = continue_model(server)["promptTemplates"]["autocomplete"]
    rendered = render_handlebars(template, prefix=PREFIX, suffix=SUFFIX)
    assert greedy(server, prompt=rendered) == greedy(server, prompt=PREFIX, suffix=SUFFIX)


# ----------------------------------------------------------------------------- Tabby


def tabby_parse(raw: str) -> str:
    """Tabby's reading (http-api-bindings openai.rs): every event must parse as
    {choices: [{text, finish_reason}]} (it panics otherwise), and it stops at the first chunk
    with a finish_reason, so that chunk must come before [DONE], which it never parses."""
    text = ""
    for data in sse_events(raw):
        assert data != "[DONE]", "[DONE] before a chunk with a finish_reason: Tabby would panic on it"
        chunk = json.loads(data)
        assert isinstance(chunk["choices"], list)
        if chunk["choices"]:
            choice = chunk["choices"][0]
            assert isinstance(choice["text"], str)
            text += choice["text"]
            if choice["finish_reason"] is not None:
                return text
    raise AssertionError("the stream ended without a finish_reason")


@pytest.mark.parametrize("suffix", [SUFFIX, ""], ids=["fim", "no-suffix"])
def test_tabby_openai_completion_request(server, suffix):
    config = tomllib.loads(snippet("tabby-config"))
    http = config["model"]["completion"]["http"]
    assert http["kind"] == "openai/completion" and http["api_endpoint"] == DOC_URL + "/v1"
    max_tokens = config["completion"]["max_decoding_tokens"]
    assert 32 <= max_tokens <= 64
    body = {"model": http["model_name"], "prompt": PREFIX, "suffix": suffix or None,  # Tabby drops an empty suffix
            "max_tokens": max_tokens, "temperature": TABBY_TEMPERATURE, "stream": True, "presence_penalty": 0.0}
    url = http["api_endpoint"].replace(DOC_URL, server.url) + "/completions"
    tabby_parse(stream_post(url, body))


# ----------------------------------------------------------------------------- curl, Python


def test_curl_example(server):
    command = snippet("curl").replace(DOC_URL, server.url)
    if shutil.which("curl"):
        run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=local_env(), timeout=60)
        assert run.returncode == 0, run.stderr
        raw = run.stdout
    else:  # the same request, without curl
        body = json.loads(shlex.split(command.replace("\\\n", " "))[-1])
        raw = stream_post(server.url + "/v1/completions", body)
    chunks, done = parse_stream(raw)
    assert done and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "\n\n" not in "".join(c["choices"][0]["text"] for c in chunks)


def test_python_example(server):
    code = snippet("python").replace(DOC_URL, server.url)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=local_env(),
                         cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and "\n\n" not in run.stdout[:-1]
