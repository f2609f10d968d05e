"""Tests for bench_serve.py against a small live server (serve_api.py in a subprocess with a
tiny random checkpoint) and a held-out set made of a few real standard-library files."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

import bench_serve
from serve_helpers import write_tiny_checkpoint
from tokenizer import load_tokenizer

STDLIB_FILES = ("textwrap.py", "shlex.py", "bisect.py", "fnmatch.py", "colorsys.py", "queue.py")
LEVEL_FIELDS = {"users", "elapsed_s", "sent", "ok", "errors", "rejected", "rejected_429", "rejected_503",
                "cancelled", "counts_add_up", "requests_per_s", "generated_tokens", "tokens_per_s", "latency_ms",
                "ttft_ms", "rate_429", "rate_503", "error_rate", "server_cancellations", "client_cpu_s",
                "not_ok_details"}
SMALL_LOAD = ["--prompt-tokens", "16,48", "--max-tokens", "8", "--no-progress"]
MAX_BATCH, MAX_WAITING = 4, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    data.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    with open(data / "val_docs.jsonl", "w") as f:
        for name in STDLIB_FILES:
            with open(os.path.join(stdlib, name), encoding="utf-8") as src:
                f.write(json.dumps({"path": name, "text": src.read()}) + "\n")
    return {"root": root, "data": str(data), "ckpt": write_tiny_checkpoint(root / "tiny.pt")}


@pytest.fixture(scope="module")
def server(workdir):
    """One live serve_api.py for the module, small enough that 16 users overflow its queue."""
    settings = bench_serve.Settings(ckpt=workdir["ckpt"], max_batch=MAX_BATCH, max_waiting=MAX_WAITING,
                                    server_args=["--log-level", "warning"], ready_timeout=120)
    log = str(workdir["root"] / "server.log")
    with bench_serve.managed_server(settings, MAX_BATCH, log) as (url, _, _, _):
        yield url


def run_bench(args, out_dir, capsys) -> tuple[int, dict | None, str, str]:
    """bench_serve.main in-process: (exit code, the JSON report if one was written, stdout, stderr)."""
    code = bench_serve.main([*args, "--out-dir", str(out_dir)])
    out, err = capsys.readouterr()
    reports = sorted(p for p in os.listdir(out_dir) if p.endswith(".json")) if os.path.isdir(out_dir) else []
    report = json.load(open(os.path.join(out_dir, reports[-1]))) if reports else None
    return code, report, out, err


def scrape(url: str, name: str, label_filter: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", text, re.M)
               if label_filter in (m.group(1) or ""))


def assert_counts_add_up(level: dict) -> None:
    assert level["sent"] == level["ok"] + level["errors"] + level["rejected"] + level["cancelled"]
    assert level["rejected"] == level["rejected_429"] + level["rejected_503"]
    assert level["counts_add_up"] is True


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n):
    values = [random.Random(n).lognormvariate(0, 1) for _ in range(n)]
    for q in (0, 1, 5, 50, 90, 95, 99, 100):
        assert bench_serve.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert bench_serve.percentile([], 50) is None


def test_percentile_on_known_data():
    assert bench_serve.percentile([4, 1, 3, 2], 50) == 2.5  # unsorted input; between the middle two
    assert bench_serve.percentile(list(range(101)), 95) == 95
    assert bench_serve.percentile([10, 20], 95) == pytest.approx(19.5)


def level_stub(users, tokens_per_s, p95, sent=100, errors=0, rejected=0):
    return {"users": users, "tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 10, "sent": sent,
            "errors": errors, "rejected": rejected, "latency_ms": {"p95": p95},
            "ttft_ms": {"p95": None if p95 is None else p95 / 4}}


def test_cost_uses_best_level_meeting_target_else_says_it_was_missed():
    settings = bench_serve.Settings(price_per_hour=1.0, p95_target_ms=200)
    levels = [level_stub(1, 100, 150), level_stub(8, 400, 190), level_stub(32, 900, 250),
              level_stub(64, 2000, 120, rejected=50)]  # fast only because half was shed: not eligible
    cost = bench_serve.cost(levels, settings)
    assert cost["target_met"] and cost["users"] == 8
    assert cost["usd_per_1k_tokens"] == pytest.approx(1.0 / 3600 / 400 * 1000, rel=1e-4)

    slow = [level_stub(1, 100, 900), level_stub(8, 300, 2000)]
    cost = bench_serve.cost(slow, settings)
    assert not cost["target_met"] and cost["users"] == 8 and "no level met" in cost["note"]
    assert bench_serve.cost([level_stub(1, 0, None)], settings)["usd_per_1k_tokens"] is None


def test_ratios_pair_levels_side_by_side():
    engine = [level_stub(1, 100, 100), level_stub(8, 800, 150)]
    baseline = [level_stub(1, 100, 100), level_stub(8, 100, 600)]
    rows = bench_serve.ratios(engine, baseline)
    assert [(r["users"], r["throughput_x"], r["p95_ratio"]) for r in rows] == [(1, 1.0, 1.0), (8, 8.0, 0.25)]


def test_prompts_are_cut_at_line_starts_within_token_range(workdir):
    enc = load_tokenizer()
    files = bench_serve.load_held_out(workdir["data"], enc)
    settings = bench_serve.Settings(prompt_min=20, prompt_max=40)
    pool = bench_serve.prompt_pool(files, settings, enc)
    assert len(pool) == bench_serve.PROMPT_POOL_SIZE
    assert pool == bench_serve.prompt_pool(files, settings, enc)  # same seed, same prompts for both servers
    texts = [f.text for f in files]
    for prompt in pool[:200]:
        assert any(("\n" + prompt) in t or t.startswith(prompt) for t in texts)
        assert 20 <= len(enc.encode_ordinary(prompt)) <= 40


def test_editor_prefix_ends_at_cursor_and_suffix_follows_the_typed_region(workdir):
    files = bench_serve.load_held_out(workdir["data"], load_tokenizer())
    editor = bench_serve.Editor(files, random.Random(3), prefix_tokens=30, suffix_tokens=10)
    for _ in range(300):
        editor.type(3)
        prefix, suffix = editor.context()
        text = editor.doc.text
        assert text[:editor.cursor].endswith(prefix) and text[editor.region_end:].startswith(suffix)
        assert editor.cursor <= editor.region_end


# ----------------------------------------------------------------------------- against a live server


def test_sweep_counts_add_up_and_report_is_complete(server, workdir, tmp_path, capsys):
    before = scrape(server, "codeassist_http_requests_total", "/v1/completions")
    code, report, out, _ = run_bench(["--url", server, "--data-dir", workdir["data"], "--levels", "1,4",
                                      "--duration", "2", *SMALL_LOAD], tmp_path, capsys)
    assert code == 0 and report is not None
    levels = report["servers"]["engine"]["levels"]
    assert [s["users"] for s in levels] == [1, 4]
    for level in levels:
        assert LEVEL_FIELDS <= set(level), LEVEL_FIELDS - set(level)
        assert_counts_add_up(level)
        assert level["ok"] > 0 and level["errors"] == 0 and level["generated_tokens"] > 0
        assert level["latency_ms"]["p50"] <= level["latency_ms"]["p95"] <= level["latency_ms"]["p99"]
        assert level["ttft_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["tokens_per_s"] == pytest.approx(level["generated_tokens"] / level["elapsed_s"], rel=0.01)
        assert level["repeated_prompts"] >= 0
    # The server saw exactly what we say we sent (plus the one preflight request).
    after = scrape(server, "codeassist_http_requests_total", "/v1/completions")
    assert after - before == sum(s["sent"] for s in levels) + 1

    assert {"settings", "machine", "servers", "ratios", "cost", "plot", "started", "wall_s"} <= set(report)
    assert report["settings"]["levels"] == [1, 4] and report["settings"]["workload"] == "independent"
    assert {"cpu_count", "torch", "device"} <= set(report["machine"])
    assert report["cost"]["engine"]["usd_per_1k_tokens"] > 0
    assert "baseline" not in report["servers"] and report["ratios"] == []
    with open(report["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^engine\s+4\s+\d+", out, re.M), out  # the table row of 4 users
    assert "per 1K generated tokens" in out


def test_users_split_across_client_processes_add_up(server, workdir, tmp_path, capsys):
    """--client-procs 2: the users run in two load-generator processes; the level merges
    their results, and the server saw exactly what the level says was sent."""
    before = scrape(server, "codeassist_http_requests_total", "/v1/completions")
    code, report, out, _ = run_bench(["--url", server, "--data-dir", workdir["data"], "--levels", "1,4",
                                      "--duration", "2", "--client-procs", "2", *SMALL_LOAD], tmp_path, capsys)
    assert code == 0, out
    levels = report["servers"]["engine"]["levels"]
    assert [(s["users"], s["client_procs"]) for s in levels] == [(1, 1), (4, 2)]
    for level in levels:
        assert_counts_add_up(level)
        assert level["ok"] > 0 and level["errors"] == 0 and level["client_cpu_s"] > 0
        busy = level["client_cpu_s"] / (level["elapsed_s"] * level["client_procs"])
        assert level["client_bound"] == (busy > bench_serve.CLIENT_BOUND_SHARE)
    after = scrape(server, "codeassist_http_requests_total", "/v1/completions")
    assert after - before == sum(s["sent"] for s in levels) + 1


def test_a_request_cap_is_shared_among_client_processes():
    settings = bench_serve.Settings(client_procs=4, requests=6)
    assert bench_serve.client_process_count(settings, users=128) == 4
    assert [bench_serve.split_requests(6, 4, i) for i in range(4)] == [2, 2, 1, 1]
    assert bench_serve.client_process_count(bench_serve.Settings(client_procs=4, requests=3), users=128) == 3
    assert bench_serve.client_process_count(bench_serve.Settings(client_procs=4), users=2) == 2
    assert [bench_serve.split_requests(0, 4, i) for i in range(4)] == [0, 0, 0, 0]  # no cap stays no cap


def test_servers_it_starts_keep_requests_queued_as_long_as_the_client_waits():
    # A 10 s queue bound would turn the baseline's slowest requests away at 128 users and
    # leave them out of its latency percentiles; by default both servers queue to the timeout.
    def queue_wait(settings):
        cmd = bench_serve.server_command(settings, port=1, max_batch=1)
        return float(cmd[cmd.index("--max-queue-wait") + 1])
    assert queue_wait(bench_serve.Settings(ckpt="x.pt", request_timeout=42.0)) == 42.0
    assert queue_wait(bench_serve.Settings(ckpt="x.pt", request_timeout=42.0, max_queue_wait=5.0)) == 5.0


def test_typing_cancels_superseded_requests_on_the_server(server, workdir, tmp_path, capsys):
    before = scrape(server, "codeassist_cancellations_total")
    # Keystrokes every ~25-200 ms, debounce 20-60 ms, completions of ~0.3 s or more: most
    # requests are superseded while still streaming.
    code, report, _, _ = run_bench(["--url", server, "--data-dir", workdir["data"], "--workload", "typing",
                                    "--levels", "4", "--duration", "3", "--typing-cps", "20,40",
                                    "--debounce-ms", "20,60", "--prompt-tokens", "16,64", "--max-tokens", "32",
                                    "--no-progress"], tmp_path, capsys)
    assert code == 0
    (level,) = report["servers"]["engine"]["levels"]
    assert_counts_add_up(level)
    assert level["cancelled"] > 0 and level["errors"] == 0
    after = scrape(server, "codeassist_cancellations_total")
    assert after - before > 0
    # The bench's own reading of the counter (scraped right after the level) saw them too; the
    # server may notice a closed stream a moment later, hence <= rather than ==.
    assert 0 < level["server_cancellations"] <= after - before


def test_full_queue_shows_429s_counted_as_rejections(server, workdir, tmp_path, capsys):
    users = 4 * (MAX_BATCH + MAX_WAITING)
    code, report, out, _ = run_bench(["--url", server, "--data-dir", workdir["data"], "--levels", str(users),
                                      "--duration", "2", "--prompt-tokens", "16,48", "--max-tokens", "16",
                                      "--no-progress"], tmp_path, capsys)
    assert code == 0
    (level,) = report["servers"]["engine"]["levels"]
    assert_counts_add_up(level)
    assert level["rejected_429"] > 0 and level["errors"] == 0 and level["ok"] > 0
    assert level["rate_429"] == pytest.approx(level["rejected_429"] / level["sent"], abs=1e-4)


def test_ckpt_mode_runs_the_baseline_and_stops_both_servers(workdir, tmp_path, capsys):
    code, report, out, _ = run_bench(["--ckpt", workdir["ckpt"], "--data-dir", workdir["data"], "--levels", "2,3",
                                      "--waves", "2", "--duration", "1", "--prompt-tokens", "16,32",
                                      "--max-tokens", "4",
                                      "--server-arg=--log-level=warning", "--no-progress"], tmp_path, capsys)
    assert code == 0
    engine, baseline = report["servers"]["engine"], report["servers"]["baseline"]
    assert "--max-batch" not in engine["command"]  # the server's own default
    assert baseline["command"][baseline["command"].index("--max-batch") + 1] == "1"
    for server in (engine, baseline):
        assert [level["users"] for level in server["levels"]] == [2, 3, 2, 3]  # two waves of the sweep
        for level in server["levels"]:
            assert_counts_add_up(level) and level["ok"] > 0
            assert 100 < level["server_rss_mb"] < 10_000  # HTTP + engine processes, measured after the level
        port = int(server["command"][server["command"].index("--port") + 1])
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # stopped: nothing listens there any more
    # Level by level, alternating which server goes first, so a slow spell hits both alike.
    starts = [engine["levels"][0], baseline["levels"][0], baseline["levels"][1], engine["levels"][1]]
    assert [level["users"] for level in starts] == [2, 2, 3, 3]
    assert [level["started_at"] for level in starts] == sorted(level["started_at"] for level in starts)
    assert [r["users"] for r in report["ratios"]] == [2, 3, 2, 3] and report["ratios"][0]["throughput_x"] > 0
    assert set(report["cost"]) == {"engine", "baseline"}
    assert report["checkpoint"]["model_args"]["n_layer"] == 2
    assert "engine vs baseline" in out and "engine memory after each level" in out


# ----------------------------------------------------------------------------- bad input


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


def assert_one_line_error(err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench_serve: error:") and fragment in lines[0], err


def test_unreachable_server_fails_fast_with_one_line(workdir, tmp_path, capsys):
    code, report, _, err = run_bench(["--url", f"http://127.0.0.1:{closed_port()}", "--data-dir", workdir["data"],
                                      *SMALL_LOAD], tmp_path, capsys)
    assert code != 0 and report is None
    assert_one_line_error(err, "cannot reach")


def test_missing_checkpoint_fails_with_one_line(workdir, tmp_path, capsys):
    code, report, _, err = run_bench(["--ckpt", str(tmp_path / "nope.pt"), "--data-dir", workdir["data"],
                                      *SMALL_LOAD], tmp_path, capsys)
    assert code != 0 and report is None
    assert_one_line_error(err, "checkpoint not found")


class FailingHandler(BaseHTTPRequestHandler):
    """Ready, but every completion is a 500: a broken server."""

    def do_GET(self):
        self.reply(200 if self.path == "/ready" else 404, b'{"status": "ready"}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.reply(500, b'{"error": {"message": "engine exploded", "type": "server_error", "param": null, "code": null}}')

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_that_errors_fails_with_one_line(workdir, tmp_path, capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FailingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        code, report, _, err = run_bench(["--url", f"http://127.0.0.1:{httpd.server_port}", "--data-dir",
                                          workdir["data"], *SMALL_LOAD], tmp_path, capsys)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code != 0 and report is None
    assert_one_line_error(err, "HTTP 500: engine exploded")


def test_missing_held_out_data_fails_with_one_line(server, tmp_path, capsys):
    code, _, _, err = run_bench(["--url", server, "--data-dir", str(tmp_path / "nowhere"), *SMALL_LOAD],
                                tmp_path, capsys)
    assert code != 0
    assert_one_line_error(err, "val_docs.jsonl")


def test_levels_draw_disjoint_prompts_after_the_probes_and_count_repeats():
    shares = [bench_serve.prompt_share(8192, i, 5) for i in range(5)]
    assert shares[0].start == bench_serve.GREEDY_PROBES
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))  # adjacent, never overlapping
    assert shares[-1].stop <= 8192 and len(set(map(len, shares))) == 1
    assert bench_serve.prompt_share(10, 3, 5) == range(10)  # a pool too small to split: all of it
    pool = [f"p{i}" for i in range(20)]
    level = bench_serve.Level(bench_serve.Settings(), "", "m", None, None, 0.0, prompts=range(14, 17))
    assert [level.next_prompt(pool) for _ in range(5)] == ["p14", "p15", "p16", "p14", "p15"]
    assert level.repeated_prompts == 2
