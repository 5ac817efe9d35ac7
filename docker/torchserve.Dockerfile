# TorchServe + the release model, as a non-root user. Built from the repository root:
#   docker compose build torchserve
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 skin
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY handler/ handler/
COPY skinmodel/ skinmodel/
COPY release/ release/
COPY stack/ stack/
COPY ops/ ops/
COPY logger/ logger/
COPY archive.sh config.properties log4j2.xml ./
RUN ./archive.sh --out /app/model_store && mkdir -p /spool && chown -R skin /app/model_store /spool
USER skin
ENV OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 SKIN_SPOOL_DIR=/spool
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "stack", "ready"]
CMD ["python", "-m", "stack", "serve"]
