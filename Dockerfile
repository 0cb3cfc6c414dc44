# syntax=docker/dockerfile:1.7
# The Opus Mesh sidecar image (also runs the injector and the demo apps).
#
#   docker build -t opus-mesh/opus-sidecar:0.1.0 .
#   docker run -d -p 8080:8080 -p 9090:9090 -e OPUS_LOG_LEVEL=DEBUG opus-mesh/opus-sidecar:0.1.0
#   curl http://localhost:9090/health        # {"status":"UP"}

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the project's wheel and every dependency's, so the final stage needs no compiler
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY filters ./filters
COPY opus_client ./opus_client
RUN pip wheel --wheel-dir /wheels ".[injector]"

# --- final: the wheels installed, nothing else from the build
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uid 1337: the uid the transparent mode's iptables rules exempt (deploy/k8s, docs/deploy.md).
RUN groupadd --system --gid 1337 opus \
 && useradd --system --uid 1337 --gid opus --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin opus
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "opus-mesh[injector]"

# The outbound listener defaults to 127.0.0.1, which inside a container is the container's
# own loopback: `docker run -p 8080:8080` could never reach it. Here the container's network
# namespace is the trust boundary, and only what is published with -p leaves it. The
# Kubernetes injector sets it back to 127.0.0.1, because a pod's IP is reachable cluster-wide.
ENV OPUS_LISTENERS_OUTBOUND_HOST=0.0.0.0

USER 1337:1337
EXPOSE 8080 9090 15006
# slim has no curl; urlopen raises on anything but 2xx, so a draining or dead sidecar fails.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["opus-sidecar"]
CMD ["run"]
