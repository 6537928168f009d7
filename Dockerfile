# syntax=docker/dockerfile:1

# Builder: turn the source tree into a self-contained virtualenv, so the final
# image carries no compilers, pip caches or source files.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY cloud_init ./cloud_init
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/*.whl


FROM python:3.11-slim

LABEL org.opencontainers.image.title="orchestrator" \
      org.opencontainers.image.description="Self-hosted GitHub Actions runner orchestrator" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed high UID/GID so Kubernetes runAsUser and file ownership line up.
RUN groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/orchestrator \
       --create-home --shell /usr/sbin/nologin orchestrator

# Same base image as the builder, so the venv's interpreter symlinks stay valid.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORCHESTRATOR_CONFIG=/etc/orchestrator/config.yaml \
    ORCHESTRATOR_HEALTH_URL=http://127.0.0.1:8080/healthz

# The default sqlite:///orchestrator.db lands here, in a writable home.
WORKDIR /var/lib/orchestrator
USER 10001:10001
EXPOSE 8080

# No curl in the slim image; the interpreter is already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ORCHESTRATOR_HEALTH_URL'], timeout=4)"]

ENTRYPOINT ["orchestrator"]
CMD ["serve"]
