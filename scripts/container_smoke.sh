#!/usr/bin/env bash
# Build the server image and smoke-test it: /health, /ready, one completion, the image's
# HEALTHCHECK, and a graceful stop (SIGTERM -> exit code 0), all on 127.0.0.1.
#
# Works on a fresh Debian machine with no Docker engine and no registry access (the recipe in
# /work/shared/notes/platform.md): installs podman/buildah/runc/debootstrap if missing, uses runc
# and capped ulimits through a temporary containers.conf, builds a stand-in for
# docker.io/library/python:3.11-slim with debootstrap if that image is absent, pre-builds the
# wheels on the host (pip wheel -> .whl/) and builds with PIP_OFFLINE=1 and --pull=never.
# The container runs as the image's non-root user with a read-only root filesystem, a tmpfs /tmp
# and no capabilities, as in k8s/deployment.yaml. It is always removed, pass or fail.
#
# Env: IMAGE (default localhost/codeassist:smoke), PYTHON (host interpreter with torch, default .venv/bin/python),
#      KEEP_IMAGE=0 to remove the image afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/codeassist:smoke}
BASE_IMAGE=docker.io/library/python:3.11-slim
PYTHON=${PYTHON:-.venv/bin/python}
KEEP_IMAGE=${KEEP_IMAGE:-1}
CONTAINER="codeassist-smoke-$$"
MODEL_ID="codeassist-smoke"
START=$SECONDS
WORK="$(mktemp -d /tmp/container-smoke.XXXXXX)"

log() { printf '[container-smoke %4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    if command -v podman >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ] && podman container exists "$CONTAINER" 2>/dev/null; then
            log "container logs (last 60 lines):"
            podman logs --tail 60 "$CONTAINER" 2>&1 | sed 's/^/    /' || true
        fi
        timeout 60 podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
        if [ "$KEEP_IMAGE" = 0 ]; then timeout 60 podman rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
    fi
    rm -rf "$WORK"
    log "$([ "$rc" -eq 0 ] && echo PASSED || echo "FAILED (exit $rc)") in $((SECONDS - START)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. tools ------------------------------------------------------------------------------
missing=()
for tool in podman buildah runc debootstrap curl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root or install them: apt-get install podman buildah runc debootstrap curl"
    log "installing ${missing[*]} (apt-get)"
    timeout 300 apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q podman buildah runc debootstrap curl >/dev/null
fi

# runc, not crun (crun rejects this machine's cgroup setup); capped ulimits (the host's are too
# large for the runtime to apply).
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

# ---- 2. base image ---------------------------------------------------------------------------
debian_mirror() {
    # The Debian mirror apt uses here (one-line .list and deb822 .sources formats).
    python3 - <<'EOF'
import glob, re
SUITE = re.compile(r"(bookworm|bullseye|trixie|forky|sid|stable|testing|oldstable|unstable)(-updates)?")
found = []
paths = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
    + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for path in paths:
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0].lower() != "no" \
                    and any(SUITE.fullmatch(s) for s in fields.get("suites", [])):
                found += fields.get("uris", [])
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and SUITE.fullmatch(words[2]):
                found.append(words[1])
print(next((u for u in found if u.startswith(("http://", "https://", "file:"))), "http://deb.debian.org/debian"))
EOF
}

if ! podman image exists "$BASE_IMAGE"; then
    [ "$(id -u)" = 0 ] || die "$BASE_IMAGE is missing and debootstrap needs root"
    mirror="$(debian_mirror)"
    log "building a stand-in $BASE_IMAGE with debootstrap (bookworm, mirror $mirror)"
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | timeout 300 podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# ---- 3. wheels for the offline build -----------------------------------------------------------
# pip wheel downloads wheels and builds the few sdists (e.g. `future`) into wheels, so the build
# needs neither the network nor build tools. Files already in .whl/ are reused.
[ -x "$PYTHON" ] || PYTHON=python3
log "pre-building wheels into .whl/ ($PYTHON -m pip wheel)"
timeout 900 "$PYTHON" -m pip wheel -q --wheel-dir .whl -r requirements.txt 2> >(grep -v "^WARNING: Location" >&2) \
    || die "pip wheel failed"

# ---- 4. build ------------------------------------------------------------------------------------
log "podman build $IMAGE (offline, --pull=never)"
old_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
timeout 1500 podman build --pull=never --format docker --build-arg PIP_OFFLINE=1 -t "$IMAGE" . \
    > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; die "podman build failed"; }
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
new_id="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
# The previous build of this tag is now untagged: remove it (layers still in use stay).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
log "built $IMAGE: $((size_bytes / 1000000)) MB"

# ---- 5. a tiny random checkpoint, mounted read-only at /models --------------------------------
mkdir -p "$WORK/models"
timeout 300 "$PYTHON" - "$WORK/models/model.pt" <<'EOF' || die "could not write a test checkpoint (needs torch: make install)"
import sys
from dataclasses import asdict
from model import CHECKPOINT_FORMAT, GPT, GPTConfig, save_checkpoint
config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)
model = GPT(config)
save_checkpoint(sys.argv[1], {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                              "model_args": asdict(config), "tokenizer": "p50k_edit"})
EOF
chmod 755 "$WORK" "$WORK/models"; chmod 644 "$WORK/models/model.pt"   # the container's uid 10001 reads it

# ---- 6. run ------------------------------------------------------------------------------------
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log "podman run $CONTAINER on 127.0.0.1:$PORT"
timeout 120 podman run -d --name "$CONTAINER" \
    -p "127.0.0.1:$PORT:8000" \
    -v "$WORK/models:/models:ro" \
    -e MODEL_PATH=/models/model.pt -e MODEL_ID="$MODEL_ID" -e MAX_BATCH=4 -e DRAIN_TIMEOUT_S=10 \
    --read-only --tmpfs /tmp:rw,size=256m,mode=1777 \
    --cap-drop ALL --security-opt no-new-privileges \
    --memory 4g --pids-limit 512 \
    "$IMAGE" > /dev/null 2> "$WORK/run.err" || { cat "$WORK/run.err"; die "podman run failed"; }
# (podman logs errors about systemd healthcheck timers where no systemd runs: harmless, hidden.)

BASE="http://127.0.0.1:$PORT"
wait_for() {  # wait_for PATH SECONDS: poll until 200 (fails early if the container exits)
    local path=$1 deadline=$((SECONDS + $2))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if curl -fsS -m 5 -o "$WORK/body" "$BASE$path" 2>/dev/null; then
            log "GET $path -> 200 $(head -c 200 "$WORK/body")"
            return 0
        fi
        [ "$(podman inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ] \
            || die "container exited while waiting for $path"
        sleep 1
    done
    die "GET $path did not answer 200 within $2 s"
}
wait_for /health 120
wait_for /ready 180

log "POST /v1/completions"
code="$(curl -sS -m 60 -o "$WORK/completion.json" -w '%{http_code}' "$BASE/v1/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL_ID\", \"prompt\": \"def fibonacci(n):\\n    \", \"max_tokens\": 8, \"temperature\": 0}")"
[ "$code" = 200 ] || { cat "$WORK/completion.json"; die "completion answered HTTP $code"; }
python3 - "$WORK/completion.json" <<'EOF' || die "completion response has the wrong shape"
import json, sys
body = json.load(open(sys.argv[1]))
choice = body["choices"][0]
assert body["object"] == "text_completion", body
assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length"), body
assert body["usage"]["completion_tokens"] >= 1, body
print("    completion:", json.dumps(choice["text"]), "| usage:", body["usage"])
EOF

curl -fsS -m 10 -o "$WORK/metrics.txt" "$BASE/metrics" || die "GET /metrics failed"
grep -q '^codeassist_generated_tokens_total' "$WORK/metrics.txt" || die "/metrics has no codeassist_generated_tokens_total"
log "/metrics exposes codeassist_* series"

uid="$(podman exec "$CONTAINER" id -u)"
[ "$uid" != 0 ] || die "the server runs as root"
if podman exec "$CONTAINER" touch /app/probe 2>/dev/null; then die "the root filesystem is writable"; fi
podman exec "$CONTAINER" touch /tmp/probe || die "/tmp is not writable"
log "runs as uid $uid; root filesystem read-only, /tmp writable"

# The image's own HEALTHCHECK, run once by hand (podman schedules it with systemd timers, which
# this machine may not have).
if timeout 30 podman healthcheck run "$CONTAINER" >/dev/null 2>&1; then
    log "HEALTHCHECK passes"
else
    die "the image's HEALTHCHECK fails"
fi

# ---- 7. graceful stop: SIGTERM, drain, exit 0 ---------------------------------------------------
log "podman stop (SIGTERM, 30 s grace)"
timeout 60 podman stop -t 30 "$CONTAINER" > /dev/null 2> "$WORK/stop.err" || { cat "$WORK/stop.err"; die "podman stop failed"; }
exit_code="$(podman inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
[ "$exit_code" = 0 ] || die "server exited with code $exit_code after SIGTERM (expected a clean drain: 0)"
log "stopped cleanly (exit code 0); image $IMAGE is $((size_bytes / 1000000)) MB"
