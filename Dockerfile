# The completion server (serve_api.py) as a container image: one file for CPU and CUDA.
#
#   CPU (default):   docker build -t codeassist:cpu .
#   CUDA:            docker build -t codeassist:cuda \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                      --build-arg TRIM_TORCH=0 .
#                    (the CUDA wheels bundle the CUDA runtime; the node needs only the NVIDIA
#                    driver + container toolkit, so the same slim Python base serves both)
#   Offline:         pip wheel -w .whl -r requirements.txt    (on a host with the same Python 3.11)
#                    docker build --build-arg PIP_OFFLINE=1 .
#                    (scripts/container_smoke.sh does exactly this with podman)
#
# The model is read from $MODEL_PATH (default /models/model.pt). Either mount it
# (docker run -v "$PWD/out-code-assistant:/models:ro" -e MODEL_PATH=/models/best.pt ...), or bake
# it in: put the file at deploy-model/model.pt before building (that folder is the only place the
# build context takes checkpoints from; it is optional, so a build without it works too).
#
# Shutdown: on SIGTERM the server keeps listening but answers /ready and new work with 503,
# finishes in-flight requests for at most $DRAIN_TIMEOUT_S (default 20), then exits 0 (uvicorn
# adds up to 5 s to close connections). Give the container more than DRAIN_TIMEOUT_S + 5 s to
# stop: `docker run --stop-timeout 30` / `docker stop -t 30` (Docker's default is 10 s), and in
# Kubernetes terminationGracePeriodSeconds (k8s/deployment.yaml).

ARG BASE_IMAGE=docker.io/library/python:3.11-slim

# ---- builder: a virtualenv with the pinned runtime dependencies -----------------------------
FROM ${BASE_IMAGE} AS builder
# Where torch comes from: the CPU wheel index by default (an unpinned index gets a multi-GB CUDA
# build); a cuXXX index for GPUs; empty = PyPI's default build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# 1 = install only from the wheels in .whl/ of the build context (no network at all).
ARG PIP_OFFLINE=0
# Training/analysis-only packages from requirements.txt the server never imports.
ARG EXCLUDE_PACKAGES="matplotlib detect-secrets tqdm"
# 1 = delete torch's C++ headers, test binaries and protoc (~190 MB) that serving never uses.
# Keep 0 for images that run torch.compile (inductor compiles C++ against those headers).
ARG TRIM_TORCH=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /build
# `.wh[l]` is a glob, so a context without .whl/ (a normal online build) still builds;
# requirements.txt keeps the COPY non-empty.
COPY requirements.txt .wh[l] ./
RUN set -eux; \
    exclude="$(echo "${EXCLUDE_PACKAGES}" | xargs | tr ' ' '|')"; \
    grep -v -i -E "^(${exclude:-__none__})[[:space:]]*(==|$)" requirements.txt > requirements-image.txt; \
    python3 -m venv /opt/venv; \
    if [ "${PIP_OFFLINE}" = 1 ]; then \
        /opt/venv/bin/pip install --no-index --find-links /build -r requirements-image.txt; \
    else \
        torch_req="$(grep -E '^torch[[:space:]]*==' requirements-image.txt || true)"; \
        if [ -n "${TORCH_INDEX_URL}" ] && [ -n "${torch_req}" ]; then \
            /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${torch_req}"; \
        fi; \
        /opt/venv/bin/pip install -r requirements-image.txt; \
    fi; \
    if [ "${TRIM_TORCH}" = 1 ]; then \
        torch_dir="$(echo /opt/venv/lib/python3*/site-packages/torch)"; \
        rm -rf "${torch_dir}/include" "${torch_dir}/test"; \
        find "${torch_dir}/bin" -type f ! -name torch_shm_manager -delete; \
        find "${torch_dir}/lib" -name '*test*.so' -delete; \
    fi; \
    /opt/venv/bin/pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; \
    /opt/venv/bin/python -c "import torch, fastapi, uvicorn, tiktoken, prometheus_client; print('torch', torch.__version__)"

# ---- model: the optional baked-in checkpoint (own stage: changing it never rebuilds the venv) --
FROM ${BASE_IMAGE} AS model
# deploy-mode[l] is a glob: without deploy-model/ it matches nothing and /models stays empty.
COPY requirements.txt deploy-mode[l] /models/
RUN rm /models/requirements.txt

# ---- runtime: the venv, the code, a non-root user -------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG MODEL_PATH=/models/model.pt
LABEL org.opencontainers.image.title="codeassist" \
      org.opencontainers.image.description="Python code-completion GPT server (serve_api.py)"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it (k8s/deployment.yaml: 10001).
RUN groupadd --system --gid 10001 app \
    && useradd --system --no-log-init --uid 10001 --gid app --home-dir /tmp --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The project's modules (the .dockerignore lets only top-level *.py through); root-owned and
# read-only for the server's user.
COPY *.py ./
COPY static/ ./static/
COPY --from=model /models/ /models/

# Server settings (serve_api.py reads these; k8s/configmap.yaml overrides them).
# HOME and caches point at /tmp: with a read-only root filesystem, /tmp is the writable mount.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    MODEL_PATH=${MODEL_PATH} \
    HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto \
    DRAIN_TIMEOUT_S=20

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness only (the process and engine answer); readiness is /ready, checked by the orchestrator.
# Python, not curl: the slim base has no curl. (Docker-format images only: podman build --format docker.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
# Exec form: python is PID 1 and receives SIGTERM itself (the server's drain handler).
ENTRYPOINT ["python", "serve_api.py"]
