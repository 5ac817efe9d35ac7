#!/usr/bin/env bash
# The whole study on an accelerator machine, inside a wall-clock budget (default 8 minutes), packed into at most
# 8 files of < 16 MiB in $OUT (or --out DIR). Any further flags go to `python -m training accelerator`:
#   OUT=/tmp/out training/accelerator.sh --data /path/to/ham10000 [--budget 480] [--img-size 224]
# Back on any machine: python -m training unpack --from /tmp/out --release release-2.0
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
for a in "$@"; do [[ "$a" == "-h" || "$a" == "--help" ]] && exec "$python" -m training accelerator --help; done
out="${OUT:-}"
for ((i = 1; i <= $#; i++)); do [[ "${!i}" == "--out" ]] && { j=$((i + 1)); out="${!j}"; }; done
if [[ -z "$out" ]]; then echo "accelerator.sh: set OUT or pass --out DIR" >&2; exit 2; fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL="${TQDM_MININTERVAL:-15}"  # a log of progress bars stays small
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; "$python" -c 'import torch; print("torch", torch.__version__)'; } \
  2>&1 | tee "$out/study.log"
"$python" -m training accelerator --out "$out" "$@" 2>&1 | tee -a "$out/study.log"
