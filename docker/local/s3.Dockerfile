# Offline stand-in for minio/minio and minio/mc: moto's S3 server (moto[server], the release requirements.txt
# pins, installed from the local wheels). `server /data` starts it on port 9000; `mc` understands the three
# commands docker-compose.yml gives it (ready, alias set, mb). moto keeps objects in memory: a restart of this
# container loses the bucket's archives (publish them again), which MinIO would keep in its volume.
ARG SKIN_PIP_IMAGE=skin-local/pip:3.11-bookworm
ARG SKIN_PYTHON_IMAGE=skin-local/python:3.11-bookworm
FROM ${SKIN_PIP_IMAGE} AS deps
COPY requirements.txt /tmp/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "$(grep -E '^moto\[server\]==' /tmp/requirements.txt)" \
      "$(grep -E '^boto3==' /tmp/requirements.txt)"

FROM ${SKIN_PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 skin && mkdir /data && chown skin /data
COPY --from=deps /opt/venv /opt/venv
COPY docker/local/s3-entrypoint.sh /usr/local/bin/s3-entrypoint.sh
COPY docker/local/mc.py /usr/local/bin/mc
RUN chmod 755 /usr/local/bin/mc /usr/local/bin/s3-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER skin
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/s3-entrypoint.sh"]
CMD ["server", "/data"]
