# Offline stand-in for python:3.11-slim-bookworm: Debian bookworm's own Python 3.11 (3.11.2), on a base image
# that `./skin images --offline` makes with debootstrap. `python` is Debian's python3 (python-is-python3).
ARG SKIN_DEBIAN_IMAGE=skin-local/debian:bookworm
FROM ${SKIN_DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
CMD ["python3"]
