# syntax=docker/dockerfile:1
# One image for all six services; the argument after the entrypoint picks the service:
#   docker build -t modelguard:dev .
#   docker run --rm modelguard:dev leak-detector
# Kubernetes sets it with `args: [<service>]` (deploy/k8s/base/).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with CPU-only torch and the project --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/modelguard
ENV PATH=/opt/modelguard/bin:$PATH
# torch first and alone, from the CPU wheel index: the default index pulls the CUDA build
# (gigabytes of libraries no node here uses). Same pin as pyproject.toml.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# Non-editable install; pip compiles the bytecode here, so the read-only root filesystem
# at run time never needs to write any.
RUN pip install . && python -c "import modelguard.services.launcher"
# The ONNX converter without its dependencies (torchvision): as scripts/setup.sh does.
RUN pip install --no-deps onnx2torch==1.5.15

# --- runtime: the virtualenv only, a non-root user, no compilers ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="modelguard" \
      org.opencontainers.image.description="ModelGuard services (one image, the argument selects the service)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 modelguard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp modelguard
COPY --from=build /opt/modelguard /opt/modelguard
# HOME, TMPDIR and the matplotlib/torch caches point into /tmp: Kubernetes mounts an
# emptyDir there because the root filesystem is read-only. Logs are JSON lines (a log
# pipeline's input); MODELGUARD_LOG_FORMAT=text turns them back into text.
ENV PATH=/opt/modelguard/bin:$PATH \
    MODELGUARD_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch
WORKDIR /tmp
USER 10001:10001
# gRPC 50051-50056 and /metrics 9101-9106 (shared/config.py defaults, one pair per service)
EXPOSE 50051-50056 9101-9106
ENTRYPOINT ["modelguard", "serve"]
CMD ["pruning-orchestrator"]
