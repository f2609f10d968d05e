"""End-to-end check of the monitoring files against a real server and a real Prometheus.

Starts serve_api.py (a tiny random checkpoint, CPU, loopback port) and Prometheus (127.0.0.1,
a free port, a temp config derived from monitoring/prometheus.yml that scrapes the server every
second and loads monitoring/alerts.yml, temp storage); sends traffic (completions, a stream,
/complete, bad requests, a burst that overflows the queue, a client that hangs up); waits until
Prometheus has scraped it; then evaluates through /api/v1/query
  - every Grafana panel query (Grafana variables substituted: $__rate_interval etc. -> 1m,
    $job -> the scrape job) and asserts status success and a non-empty result,
  - the dashboard's $job variable query,
  - every alert expression (status success; results may be empty),
  - the prometheus-adapter query behind the HPA's Pods metric (non-empty),
and checks that Prometheus loaded every alert rule without evaluation errors. Finally SIGTERMs
the server and checks it exits 0 (graceful drain). Both processes are always killed.

    .venv/bin/python scripts/monitoring_e2e.py      (scripts/monitoring_e2e.sh installs Prometheus)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING = os.path.join(ROOT, "monitoring")
JOB = "codeassist"
MODEL_ID = "codeassist-e2e"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1m", "${__rate_interval}": "1m",
                "${__interval}": "1m", "${__range}": "1m", "$job": JOB, "${job}": JOB}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[monitoring-e2e {time.monotonic() - T0:5.1f}s] {msg}", flush=True)


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | str | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(what: str, probe, timeout_s: float, proc: subprocess.Popen | None = None, log_path: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CheckFailed(f"{what}: process exited with {proc.returncode}\n{tail(log_path)}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise CheckFailed(f"{what}: not within {timeout_s:.0f} s\n{tail(log_path)}")


def tail(path: str, lines: int = 30) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def stop(proc: subprocess.Popen | None, name: str, grace_s: float) -> int | None:
    """SIGTERM, wait up to grace_s, then SIGKILL. Returns the exit code (None if killed)."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log(f"{name} ignored SIGTERM for {grace_s:.0f} s: killing it")
        proc.kill()
        proc.wait(10)
        return None


# ----------------------------------------------------------------------------- setup


def write_checkpoint(path: str) -> None:
    sys.path.insert(0, ROOT)
    from dataclasses import asdict

    from model import CHECKPOINT_FORMAT, GPT, GPTConfig, save_checkpoint
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": GPT(config).state_dict(),
                           "model_args": asdict(config), "tokenizer": "p50k_edit"})


def prometheus_config(path: str, target: str) -> None:
    """monitoring/prometheus.yml with a 1 s scrape of our server and absolute rule paths."""
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [os.path.join(MONITORING, p) for p in config.get("rule_files", [])]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    if len(jobs) != 1:
        raise CheckFailed(f"monitoring/prometheus.yml has no scrape job {JOB!r}")
    jobs[0]["static_configs"] = [{"targets": [target], "labels": {"service": JOB}}]
    jobs[0]["scrape_interval"], jobs[0]["scrape_timeout"] = "1s", "1s"
    config["scrape_configs"] = jobs
    with open(path, "w") as f:
        yaml.safe_dump(config, f)


# ----------------------------------------------------------------------------- traffic


def send_traffic(base: str) -> dict:
    """Every kind of request the panels and alerts look at. Returns counts by status."""
    statuses: dict[int, int] = {}

    def note(status: int) -> int:
        statuses[status] = statuses.get(status, 0) + 1
        return status

    def completion(max_tokens: int = 12, **extra) -> int:
        body = {"model": MODEL_ID, "prompt": "def add(a, b):\n    ", "max_tokens": max_tokens,
                "temperature": 0, **extra}
        return note(http("POST", f"{base}/v1/completions", body, timeout=60)[0])

    for i in range(6):
        if completion(max_tokens=4 + 4 * i) != 200:
            raise CheckFailed(f"a completion failed: statuses so far {statuses}")
    if note(http("POST", f"{base}/complete", {"code": "import os\n", "max_tokens": 8, "temperature": 0})[0]) != 200:
        raise CheckFailed("/complete failed")
    status, body = http("POST", f"{base}/v1/completions",
                        {"model": MODEL_ID, "prompt": "for i in", "max_tokens": 8, "stream": True})
    note(status)
    if status != 200 or b"data: [DONE]" not in body:
        raise CheckFailed(f"streamed completion: HTTP {status} {body[:200]!r}")
    # Bad requests: malformed JSON, a missing field, an unknown model.
    note(http("POST", f"{base}/v1/completions", "{not json")[0])
    note(http("POST", f"{base}/v1/completions", {"prompt": "x"})[0])
    note(http("POST", f"{base}/v1/completions", {"model": "no-such-model", "prompt": "x"})[0])
    # A client that gives up mid-generation: a cancellation.
    try:
        http("POST", f"{base}/v1/completions", {"model": MODEL_ID, "prompt": "x = ", "max_tokens": 100,
                                                "temperature": 0}, timeout=0.05)
    except OSError:
        pass
    # A burst beyond MAX_BATCH + MAX_WAITING: some requests must be turned away with 429.
    for _attempt in range(5):
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            for status in pool.map(lambda _: completion(max_tokens=100), range(12)):
                pass
        if statuses.get(429):
            break
    if not statuses.get(429):
        raise CheckFailed(f"the burst produced no 429 (queue_full); statuses {statuses}")
    return statuses


# ----------------------------------------------------------------------------- checks


def substitute(expr: str) -> str:
    for var in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_VARS[var])
    left = re.findall(r"\$\{?\w+", expr)
    if left:
        raise CheckFailed(f"unsubstituted variables {left} in {expr}")
    return expr


def query(prom: str, expr: str) -> dict:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http("GET", url, timeout=30)
    try:
        answer = json.loads(body)
    except ValueError:
        raise CheckFailed(f"HTTP {status}, not JSON, for {expr}: {body[:200]!r}") from None
    return answer


def dashboard_queries() -> list[tuple[str, str]]:
    with open(os.path.join(MONITORING, "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def alert_rules() -> list[tuple[str, str]]:
    with open(os.path.join(MONITORING, "alerts.yml")) as f:
        groups = yaml.safe_load(f)["groups"]
    return [(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"])
            for group in groups for rule in group["rules"]]


def adapter_query() -> str:
    with open(os.path.join(MONITORING, "prometheus-adapter-values.yaml")) as f:
        rule = yaml.safe_load(f)["rules"]["custom"][0]
    return (rule["metricsQuery"].replace("<<.GroupBy>>", "instance")
            .replace("<<.LabelMatchers>>", f'job="{JOB}"'))


def run_checks(prom: str) -> list[str]:
    failures, rows = [], []

    def check(name: str, expr: str, need_data: bool) -> None:
        answer = query(prom, expr)
        result = answer.get("data", {}).get("result", [])
        ok = answer.get("status") == "success" and (bool(result) or not need_data)
        sample = result[0]["value"][1] if result and isinstance(result, list) and "value" in result[0] else "-"
        rows.append(f"  {'ok ' if ok else 'BAD'} {len(result):3d} series  {sample[:10]:>10}  {name}")
        if not ok:
            failures.append(f"{name}: {answer.get('status')} {answer.get('error', '')} "
                            f"{'(empty result)' if not result else ''}\n      {expr}")

    for name, expr in dashboard_queries():
        check(name, substitute(expr), need_data=True)
    for name, expr in alert_rules():
        check(name, expr, need_data=False)
    check("prometheus-adapter codeassist_requests_in_flight", adapter_query(), need_data=True)
    print("\n".join(rows), flush=True)

    # The dashboard's $job variable: label_values(codeassist_build_info, job).
    status, body = http("GET", f"{prom}/api/v1/label/job/values?" +
                        urllib.parse.urlencode({"match[]": "codeassist_build_info"}))
    if JOB not in json.loads(body).get("data", []):
        failures.append(f"$job variable: label_values(codeassist_build_info, job) = {body[:200]!r}")

    # Every alert rule loaded and evaluated without error.
    rules = json.loads(http("GET", f"{prom}/api/v1/rules")[1])["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    for name, _ in alert_rules():
        rule = loaded.get(name.split(" ", 1)[1])
        if rule is None:
            failures.append(f"{name}: not loaded by Prometheus")
        elif rule.get("health") != "ok":
            failures.append(f"{name}: health {rule.get('health')} {rule.get('lastError', '')}")
    return failures


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    args = parser.parse_args()
    if not shutil.which(args.prometheus) and not os.path.exists(args.prometheus):
        print(f"error: no prometheus binary ({args.prometheus}); run scripts/monitoring_e2e.sh", file=sys.stderr)
        return 2

    # `timeout` (monitoring_e2e.sh) sends SIGTERM: unwind through the finally below, which
    # stops both child processes, instead of dying with them orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    work = tempfile.mkdtemp(prefix="monitoring-e2e.")
    server = prom_proc = None
    server_log, prom_log = os.path.join(work, "server.log"), os.path.join(work, "prometheus.log")
    try:
        ckpt = os.path.join(work, "model.pt")
        write_checkpoint(ckpt)
        port, prom_port = free_port(), free_port()
        base, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key in ("API_KEYS", "MODEL_PATH", "HOST", "PORT"):  # nothing inherited may change the server
            env.pop(key, None)
        # MAX_BATCH 1 + MAX_WAITING 1: a burst of 12 overflows the queue (429s for the panels).
        server_cmd = [sys.executable, os.path.join(ROOT, "serve_api.py"), "--model", ckpt, "--host", "127.0.0.1",
                      "--port", str(port), "--device", "cpu", "--model-id", MODEL_ID, "--max-batch", "1",
                      "--max-waiting", "1", "--drain-timeout", "10", "--log-level", "warning"]
        log(f"starting serve_api.py on {base}")
        server = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=open(server_log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)

        config_path = os.path.join(work, "prometheus.yml")
        prometheus_config(config_path, f"127.0.0.1:{port}")
        log(f"starting Prometheus on {prom} (scrape every 1 s)")
        prom_proc = subprocess.Popen(
            [args.prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={os.path.join(work, 'data')}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            cwd=work, stdout=open(prom_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

        wait_until("server /ready", lambda: http("GET", f"{base}/ready", timeout=2)[0] == 200, 180, server, server_log)
        log("server ready")
        wait_until("Prometheus /-/ready", lambda: http("GET", f"{prom}/-/ready", timeout=2)[0] == 200, 60,
                   prom_proc, prom_log)
        log("Prometheus ready")

        statuses = send_traffic(base)
        sent = sum(statuses.values())
        log(f"traffic sent: HTTP statuses {dict(sorted(statuses.items()))}")

        # Wait until Prometheus has scraped the counters after the last request, then a little
        # longer so every rate() window holds several samples after it.
        def scraped_all() -> bool:
            result = query(prom, 'sum(codeassist_http_requests_total{endpoint=~"/v1/completions|/complete"})')
            return bool(result["data"]["result"]) and float(result["data"]["result"][0]["value"][1]) >= sent
        wait_until("Prometheus to scrape the traffic", scraped_all, 60, prom_proc, prom_log)
        time.sleep(3)
        log("scraped; evaluating every panel query, alert expression and the adapter query")

        failures = run_checks(prom)

        log("SIGTERM to the server: it must drain and exit 0")
        code = stop(server, "server", 30)
        if code != 0:
            failures.append(f"server exit code after SIGTERM: {code} (expected 0)\n{tail(server_log)}")
        if failures:
            print("\nFAILED:\n  - " + "\n  - ".join(failures), file=sys.stderr)
            return 1
        log(f"PASSED: {len(dashboard_queries())} panel queries with data, {len(alert_rules())} alert "
            f"expressions evaluated, rules healthy, adapter query answered, graceful exit")
        return 0
    except CheckFailed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(server, "server", 15)
        stop(prom_proc, "prometheus", 15)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
