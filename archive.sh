#!/usr/bin/env bash
# Package a release (weights + meta.json) with the handler and the skinmodel package into a TorchServe
# archive. A thin wrapper: the work is stack/archive.py's build_mar, the same code ./skin up uses.
#   ./archive.sh                                   -> model_store/<name>.mar, name and version from release/meta.json
#   ./archive.sh --version 1.1 --weights-dir runs/study/release --out /tmp/store [--publish]
#   ./archive.sh --help                            -> every option
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
cd "$here"
exec "$python" -m stack archive "$@"
