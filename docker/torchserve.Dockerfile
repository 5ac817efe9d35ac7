# TorchServe + the release model, as a non-root user; the logger sidecar runs from the same image. Built from
# the repository root: docker compose build torchserve. Base images are build arguments (compose variables
# SKIN_PYTHON_IMAGE, SKIN_PIP_IMAGE): the public python image by default, the local ones that
# `./skin images --offline` builds where it cannot be pulled. Only requirements-runtime.txt is installed.
ARG SKIN_PYTHON_IMAGE=python:3.11-slim-bookworm
ARG SKIN_PIP_IMAGE=python:3.11-slim-bookworm
FROM ${SKIN_PIP_IMAGE} AS deps
COPY requirements-runtime.txt /tmp/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements-runtime.txt

FROM ${SKIN_PYTHON_IMAGE}
# procps: TorchServe stops a worker by running `kill -9 PID`; without /bin/kill (the slim images have none) every
# unregister fails with "Interrupted while cleaning resources" (found by the compose test's version swap).
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 skin
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY handler/ handler/
COPY skinmodel/ skinmodel/
COPY release/ release/
COPY stack/ stack/
COPY ops/ ops/
COPY logger/ logger/
COPY archive.sh config.properties log4j2.xml ./
# Inside the container the metrics API listens on the container's own loopback only (metrics_address), where no
# other user of the host can read it; the compose tests read each replica's request counts there.
RUN sed -i 's/^enable_metrics_api=false$/enable_metrics_api=true/' config.properties
# TorchServe's working files and logs (SKIN_STATE_DIR) and the spool are the only places the user writes.
RUN ./archive.sh --out /app/model_store && mkdir -p /spool /app/.stack \
 && chown -R skin /app/model_store /spool /app/.stack
USER skin
ENV OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 SKIN_SPOOL_DIR=/spool SKIN_STATE_DIR=/app/.stack
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "stack", "ready"]
CMD ["python", "-m", "stack", "serve"]
