#!/usr/bin/env bash
# Package the release weights + meta.json + the custom handler into a versioned TorchServe archive.
#   ./archive.sh                       -> model_store/<name>.mar, name and version from release/meta.json
#   ./archive.sh --version 1.1 --weights-dir runs/study/release --out /tmp/store
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
weights_dir="$here/release"
out_dir="$here/model_store"
version=""
name=""
file_name=""
publish=0

usage() {
  cat <<USAGE
Usage: ./archive.sh [--weights-dir DIR] [--out DIR] [--version V] [--name N] [--file-name F.mar]

Builds OUT/<name>.mar from DIR/meta.json + the weights file it names, handler/*.py and
handler/model-config.yaml. The archive's name and version come from meta.json unless overridden;
the meta.json inside the archive is rewritten to match, so the handler reports what was registered.
  --weights-dir DIR   folder holding meta.json and the weights (default: release/)
  --out DIR           where the .mar goes (default: model_store/)
  --version V         archive version (default: meta.json's "version")
  --name N            model name (default: meta.json's "name")
  --file-name F.mar   archive file name (default: <name>.mar)
  --publish           also upload it as an immutable version to S3 (python -m ops publish; needs
                      SKIN_S3_BUCKET, and SKIN_S3_ENDPOINT for MinIO / other S3-compatible servers)
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --weights-dir) weights_dir="$2"; shift 2 ;;
    --out) out_dir="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --file-name) file_name="$2"; shift 2 ;;
    --publish) publish=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "archive.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
archiver="$(dirname "$python")/torch-model-archiver"
[[ -x "$archiver" ]] || archiver="$(command -v torch-model-archiver || true)"
if [[ -z "$archiver" ]]; then
  echo "archive.sh: torch-model-archiver not found; run ./skin setup (or pip install -r requirements.txt)" >&2
  exit 1
fi

meta="$weights_dir/meta.json"
if [[ ! -f "$meta" ]]; then
  echo "archive.sh: $meta is missing; export a model first (python -m training export ... or python -m training all)" >&2
  exit 1
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
# Rewrite meta.json for the archive (name/version overrides) and print what the shell needs.
read -r name version weights_file < <("$python" - "$meta" "$stage/meta.json" "$name" "$version" <<'PY'
import json, sys
src, dst, name, version = sys.argv[1:5]
meta = json.load(open(src))
meta["name"] = name or meta["name"]
meta["version"] = version or meta["version"]
json.dump(meta, open(dst, "w"), indent=2)
print(meta["name"], meta["version"], meta.get("weights_file", "model.pt"))
PY
)
weights="$weights_dir/$weights_file"
if [[ ! -f "$weights" ]]; then
  echo "archive.sh: weights file $weights (named in $meta) is missing" >&2
  exit 1
fi
if [[ ! "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
  echo "archive.sh: model name '$name' may only use letters, digits, '.', '_' and '-'" >&2
  exit 1
fi

extra="$here/handler/formats.py,$here/handler/preprocessing.py,$here/handler/architectures.py,$here/handler/prediction.py,$here/handler/event_spool.py,$here/handler/gradcam.py,$stage/meta.json"
for optional in model_card.md ood_stats.pt; do
  [[ -f "$weights_dir/$optional" ]] && extra="$extra,$weights_dir/$optional"
done
mkdir -p "$out_dir"
file_name="${file_name:-$name.mar}"
"$archiver" --model-name "$name" --version "$version" \
  --serialized-file "$weights" \
  --handler "$here/handler/skin_handler.py" \
  --extra-files "$extra" \
  --config-file "$here/handler/model-config.yaml" \
  --export-path "$stage" --force
mv "$stage/$name.mar" "$out_dir/$file_name"
echo "archive.sh: built $out_dir/$file_name ($name $version, $(du -h "$out_dir/$file_name" | cut -f1))"
if [[ $publish -eq 1 ]]; then
  (cd "$here" && "$python" -m ops publish --mar "$out_dir/$file_name" --meta "$stage/meta.json")
fi
