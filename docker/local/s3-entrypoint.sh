#!/bin/sh
# `server DIR` (MinIO's command line, which docker-compose.yml gives) -> moto's S3 server on port 9000.
set -eu
if [ "${1:-}" = "server" ]; then
  exec moto_server -H 0.0.0.0 -p 9000
fi
exec "$@"
