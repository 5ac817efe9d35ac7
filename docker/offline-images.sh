#!/usr/bin/env bash
# ./skin images --offline: build local stand-ins for the public base images docker-compose.yml names, from
# Debian's packages and this host's pip (for sites, like this one, where those images cannot be pulled).
#   skin-local/debian:bookworm       debootstrap --variant=minbase bookworm, imported with docker import
#   skin-local/python:3.11-bookworm  Debian's Python 3.11            (for python:3.11-slim-bookworm)
#   skin-local/pip:3.11-bookworm     + the wheels the images install (build stages only, never run)
#   skin-local/postgres:15-bookworm  Debian's PostgreSQL 15           (for postgres:16-bookworm)
#   skin-local/nginx:1.22-bookworm   Debian's nginx 1.22              (for nginx:1.27-alpine)
#   skin-local/s3:moto-5.2.5         moto's S3 server, from its wheel (for minio/minio and minio/mc)
# Cached: an image that exists is kept (docker's layer cache does the rest); --rebuild makes them anew.
# Writes the compose variables that select them to .stack/compose-offline.env (see README, "Docker Compose").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
rebuild=0
case "${1:-}" in
  --rebuild) rebuild=1 ;;
  "") ;;
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "offline-images: unknown argument $1 (try --help)" >&2; exit 2 ;;
esac
need() { command -v "$1" >/dev/null 2>&1 || { echo "offline-images: $1 is missing ($2)" >&2; exit 1; }; }
need docker "apt-get install docker.io"
need debootstrap "apt-get install debootstrap"
docker info >/dev/null 2>&1 || { echo "offline-images: no Docker engine answers (start dockerd)" >&2; exit 1; }
py="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$py" ]] || py=python3
pin() { grep -E "^$1==" requirements.txt; }
moto_version="$(pin 'moto\[server\]' | cut -d= -f3)"
quietly() {  # run a command; its output is shown only if it fails
  local log rc=0
  log="$(mktemp)"
  nice "$@" >"$log" 2>&1 || rc=$?
  [[ $rc -eq 0 ]] || { tail -40 "$log" >&2; rm -f "$log"; echo "offline-images: failed: $*" >&2; exit 1; }
  rm -f "$log"
}
build() { quietly docker build $([[ $rebuild -eq 1 ]] && echo --no-cache) "$@"; }
exists() { [[ $rebuild -eq 0 ]] && docker image inspect "$1" >/dev/null 2>&1; }
step() { printf 'offline-images: %-34s %s\n' "$1" "$2" >&2; }

if exists skin-local/debian:bookworm; then step skin-local/debian:bookworm cached; else
  step skin-local/debian:bookworm "debootstrap (about a minute)"
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  nice debootstrap --variant=minbase bookworm "$root/fs" >"$root/debootstrap.log" 2>&1 \
    || { tail -20 "$root/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/fs/var/cache/apt/archives/*.deb "$root"/fs/var/lib/apt/lists/*
  tar -C "$root/fs" -c . | docker import -c 'CMD ["bash"]' - skin-local/debian:bookworm >/dev/null
  rm -rf "$root"
  trap - EXIT
fi
step skin-local/python:3.11-bookworm build
build -t skin-local/python:3.11-bookworm -f docker/local/python.Dockerfile docker/local

# The wheels: everything the images pip-install, downloaded on the host (containers reach no Python registry).
want="$(cat requirements-runtime.txt <(pin aiohttp) <(pin Jinja2) <(pin 'moto\[server\]') | sha256sum | cut -c1-16)"
have="$(docker image inspect -f '{{ index .Config.Labels "skin.wheels" }}' skin-local/pip:3.11-bookworm 2>/dev/null || true)"
if [[ $rebuild -eq 0 && "$have" == "$want" ]]; then step skin-local/pip:3.11-bookworm cached; else
  step skin-local/pip:3.11-bookworm "pip download + build (a few minutes: torch)"
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  # pip wheel, not download: a dependency published only as source is built into a wheel here (same Python 3.11).
  nice "$py" -m pip wheel --quiet --disable-pip-version-check -w "$wheels" -r requirements-runtime.txt "$(pin aiohttp)" "$(pin Jinja2)" "$(pin 'moto\[server\]')"
  cp docker/local/pip.Dockerfile "$wheels/Dockerfile"
  build --label "skin.wheels=$want" -t skin-local/pip:3.11-bookworm "$wheels"
  rm -rf "$wheels"
  trap - EXIT
fi
for image in postgres:15-bookworm nginx:1.22-bookworm "s3:moto-$moto_version"; do
  step "skin-local/$image" build
  build -t "skin-local/$image" -f "docker/local/${image%%:*}.Dockerfile" .
done
mkdir -p .stack
cat > .stack/compose-offline.env <<VARS
SKIN_PYTHON_IMAGE=skin-local/python:3.11-bookworm
SKIN_PIP_IMAGE=skin-local/pip:3.11-bookworm
SKIN_POSTGRES_IMAGE=skin-local/postgres:15-bookworm
SKIN_NGINX_IMAGE=skin-local/nginx:1.22-bookworm
SKIN_MINIO_IMAGE=skin-local/s3:moto-$moto_version
SKIN_MC_IMAGE=skin-local/s3:moto-$moto_version
VARS
echo "offline images ready; their compose variables are in .stack/compose-offline.env (add them to .env)" >&2
