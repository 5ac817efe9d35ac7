# The gate (python -m stack.gate): the body policy between nginx and TorchServe. Small: aiohttp and the
# standard library, no torch. Built from the repository root: docker compose build gate
ARG SKIN_PYTHON_IMAGE=python:3.11-slim-bookworm
ARG SKIN_PIP_IMAGE=python:3.11-slim-bookworm
FROM ${SKIN_PIP_IMAGE} AS deps
COPY requirements.txt /tmp/
# Exactly the aiohttp release requirements.txt pins, nothing else of it.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "$(grep -E '^aiohttp==' /tmp/requirements.txt)"

FROM ${SKIN_PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 skin
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY stack/ stack/
COPY config.properties .
COPY skinmodel/__init__.py skinmodel/audit.py skinmodel/formats.py skinmodel/dataset.py skinmodel/inputs.py skinmodel/labels.py skinmodel/release.py skinmodel/review_store.py skinmodel/
USER skin
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
  CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8000), timeout=3).close()"]
CMD ["python", "-m", "stack.gate", "--upstream", "http://torchserve:8080", "--host", "0.0.0.0", "--port", "8000", \
     "--client-ip-header", "X-Real-IP"]
