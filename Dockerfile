# syntax=docker/dockerfile:1.7
# onegpu: the NeurIPS 2023 LLM Efficiency Challenge submission (one RTX 4090, port 80).
#
#   docker build -t onegpu .                          # serves the embedded SmolLM2-135M
#   docker build -t onegpu --build-context model=models/qwen14b-gptq-8bit .          # a local folder
#   HF_TOKEN=... docker build -t onegpu --build-arg MODEL=org/repo --secret id=hf_token,env=HF_TOKEN .
#   docker run --gpus all -p 8080:80 onegpu           # ready when GET :8080/health answers 200
#   podman build --format docker -t onegpu .          # podman: keep the HEALTHCHECK (not in OCI)
#
# The RUN steps are `scripts/docker-steps STEP` (CI runs the same steps outside Docker), but for the
# OS packages, the user, and the port-80 interpreter. `make container-test` builds this file with
# podman on a local Debian base (CPU torch, KERNELS=skip) and runs it as the organisers did.
# README.md ("The container") explains the build arguments, the quantize/train recipe, the disk
# each needs, and what is tested.

# CUDA 13.0 to match torch 2.13.0's wheels (cu130); "devel" for nvcc: gptqmodel JIT-compiles its
# Marlin kernels. Pin by digest for a byte-reproducible base (nvidia/cuda:...@sha256:...).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04

# Optional inputs as named build contexts: `--build-context model=DIR` (a model folder) and
# `--build-context adapter=DIR` (a peft adapter from `onegpu train`) replace these empty stages.
FROM scratch AS model
FROM scratch AS adapter

FROM ${CUDA_IMAGE} AS image
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base's Python (3.12 on Ubuntu 24.04; `make container-test` builds on Debian 12's 3.11) with
# venv and headers; g++ and PCRE2 to build pypcre (gptqmodel's regex dependency, sdist only) and for
# torch's JIT builds; setcap for the port-80 interpreter below. Ubuntu's archive moves its package
# versions, so these are left to the pinned base image rather than pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates g++ libcap2-bin libpcre2-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The server runs as this user; it owns only the folders it writes at run time.
ARG UID=10001
RUN groupadd --gid "${UID}" onegpu \
    && useradd --create-home --no-log-init --uid "${UID}" --gid onegpu onegpu \
    && install -d -o onegpu -g onegpu \
        /opt/onegpu/model /opt/onegpu/adapter /opt/onegpu/cache /opt/onegpu/hf /opt/onegpu/kernels

# TORCH_CUDA_ARCH_LIST stays set at run time: gptqmodel keys its kernel cache on it, so the
# kernels built below for the 4090 (sm_89) are the ones the server finds on a 4090.
ARG TORCH_CUDA_ARCH_LIST=8.9
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    ONEGPU_HOME=/opt/onegpu \
    ONEGPU_CACHE_DIR=/opt/onegpu/cache \
    HF_HOME=/opt/onegpu/hf \
    GPTQMODEL_TORCH_EXTENSIONS_DIR=/opt/onegpu/kernels \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/onegpu/src

# 1. Pinned dependencies, before any code: rebuilt only when pyproject.toml, the steps script or
#    EXTRAS change. train = quantize (gptqmodel: 8-bit GPTQ inference, `onegpu quantize`) plus
#    bitsandbytes (`onegpu train`), so one image serves, quantizes and trains; cuda = Liger's
#    Triton kernels for the fused decode step. EXTRAS="quantize cuda" drops the trainer;
#    EXTRAS=cuda serves 16-bit models only.
ARG EXTRAS="train cuda"
COPY pyproject.toml ./
COPY scripts/docker-steps scripts/
RUN scripts/docker-steps deps --extras "${EXTRAS}"

# Port 80 as UID 10001. Docker (20.10+) lets every user of a container's own network namespace
# bind any port (net.ipv4.ip_unprivileged_port_start=0); podman, Kubernetes and other runtimes keep
# the kernel's 1024, and an image cannot change that sysctl. So this copy of the interpreter
# carries cap_net_bind_service, which is in every runtime's default capability set, and the
# entrypoint serves with it only when the port is privileged in the container: on Docker the server
# runs on the plain interpreter, and with `--cap-drop ALL` only serving on a port below 1024 fails
# (`-e ONEGPU_PORT=8080` avoids it); quantize and train never use this copy.
RUN cp "$(readlink -f /opt/venv/bin/python)" /opt/venv/bin/python-netbind \
    && setcap cap_net_bind_service=+ep /opt/venv/bin/python-netbind

# 2. Marlin 8-bit kernels compiled now (minutes of nvcc; no GPU needed) so the first start doesn't
#    pay for them. Root writes gptqmodel's generated sources into the venv. Loading takes a lock
#    file in the cache, so any user (`docker run --user`, scripts/docker-job) may write there.
#    KERNELS=required (the submission image: no CUDA torch or no nvcc fails the build rather than
#    ship an image that compiles for minutes at its first start), if-possible (build them when the
#    base can), skip (a CPU image: `make container-test`).
ARG KERNELS=required
ARG MARLIN_DTYPES=fp16
RUN scripts/docker-steps kernels --mode "${KERNELS}" --dtypes "${MARLIN_DTYPES}" \
    && chmod -R a+rwX /opt/onegpu/kernels

# 3. The code.
COPY README.md ./
COPY src ./src
COPY scripts/docker-entrypoint scripts/
RUN scripts/docker-steps app

# 4. The served model, baked in (or mount one at run time and set ONEGPU_MODEL):
#    --build-context model=DIR          a local folder (e.g. the output of `onegpu quantize`);
#    --build-arg MODEL=org/repo         a hub repository (MODEL_REVISION= a branch/tag/commit); a
#                                       token only ever as the build secret `hf_token`;
#    neither                            the embedded SmolLM2-135M, converted now.
#    --build-context adapter=DIR        also bakes a peft adapter (ONEGPU_ADAPTER).
#    The step runs as root because the contexts keep their host owners and modes, and safetensors
#    writes its files 0600 (the output of `onegpu quantize` and `onegpu train` included), which
#    UID 10001 could not read; --owner then hands model/, adapter/, cache/ and hf/ to that user.
#    MODEL_CONTEXT_ID (a hash of the contexts' contents; scripts/docker-job build sets it) makes a
#    changed folder rebuild this layer on builders that key a bind mount by its path alone
#    (buildah, so podman); BuildKit keys it by content already.
ARG MODEL=""
ARG MODEL_REVISION=""
ARG MODEL_CONTEXT_ID=""
RUN --mount=type=bind,from=model,target=/tmp/context/model \
    --mount=type=bind,from=adapter,target=/tmp/context/adapter \
    --mount=type=secret,id=hf_token,uid=${UID},required=false \
    scripts/docker-steps model --from-dir /tmp/context/model --hub-id "${MODEL}" \
        --revision "${MODEL_REVISION}" --adapter-from-dir /tmp/context/adapter \
        --context-id "${MODEL_CONTEXT_ID}" --owner "${UID}"
USER ${UID}:${UID}

# One process, one worker (onegpu serve runs uvicorn with workers=1), on 0.0.0.0:80: the
# challenge's `docker run -p 808N:80`. Host and port come from the environment so that the
# HEALTHCHECK always probes the port the server listens on (`-e ONEGPU_PORT=...` moves both).
# The model loads before the port opens, and GET /health answers 200 once it is loaded; a 14B
# model takes minutes to read from disk, hence the start period.
ENV ONEGPU_HOST=0.0.0.0 \
    ONEGPU_PORT=80
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["/opt/onegpu/src/scripts/docker-steps", "health"]
ENTRYPOINT ["/opt/onegpu/src/scripts/docker-entrypoint"]
CMD ["onegpu", "serve"]
