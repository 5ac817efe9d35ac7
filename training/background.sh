#!/usr/bin/env bash
# A long study in the background, at a fixed commit, niced, resumable at any moment.
#
#   training/background.sh start  --out runs/study-2.0 [python -m training all flags...]
#   training/background.sh resume --out runs/study-2.0     # the same commit and flags, with --resume
#   training/background.sh status --out runs/study-2.0     # python -m training status
#   training/background.sh stop   --out runs/study-2.0     # SIGINT: the epoch in progress is lost, nothing else
#   training/background.sh log    --out runs/study-2.0     # the last lines of OUT/study.log
#   training/background.sh save   --out runs/study-2.0     # what outlives this machine, into studies/study-2.0
#   training/background.sh restore --out runs/study-2.0    # that record back (resume does it when OUT has none)
#
# A machine may be replaced between sessions, runs/ with it. `save` copies the study's small record into the
# repository (studies/<name>: the commit and flags, study.json, and every finished recipe-search run's scores and
# curves, no weights); `resume` with no OUT/background.json restores it first, so finished recipe-search runs
# are skipped (their weights are not needed again) and the rest of the study starts over at the same commit.
#
# `start` checks out the current commit as a git worktree under runs/worktrees/<commit> (ignored by git) and runs
# `python -m training all` from there under `nice -n 19`, so later edits of this checkout do not change the code a
# resumed study runs, and tests and benchmarks keep the CPU. OUT/background.json records the commit and the flags;
# `resume` reads them back. The study itself checks on --resume that its settings did not change (study.json).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
[[ $# -ge 1 ]] || { usage; exit 2; }
cmd="$1"; shift
case "$cmd" in -h|--help|help) usage; exit 0 ;; esac
out=""; rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done
[[ -n "$out" ]] || { echo "background.sh: --out DIR is required (the study folder)" >&2; exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="$here/.venv/bin/python"
records="${SKIN_STUDY_RECORDS:-$here/studies}"  # where `save` keeps what outlives this machine
[[ -x "$py" ]] || { echo "background.sh: no $here/.venv: run ./skin test --fast (or ./skin up) once first" >&2; exit 1; }

alive() { [[ -f "$out/study.pid" ]] && kill -0 "$(cat "$out/study.pid")" 2>/dev/null; }

launch() {  # launch COMMIT FLAGS...
  local commit="$1"; shift
  local wt="$here/runs/worktrees/$commit"
  if [[ ! -d "$wt" ]]; then
    git -C "$here" worktree add --detach "$wt" "$commit" >/dev/null
  fi
  [[ -e "$wt/.venv" ]] || ln -s "$here/.venv" "$wt/.venv"
  local data
  data="$(cd "$here" && "$py" -c 'from stack.settings import ham10000_dir; d = ham10000_dir(); print(d.resolve() if d else "")')"
  [[ -n "$data" ]] || { echo "background.sh: HAM10000 not found (set HAM10000_DIR)" >&2; exit 1; }
  echo "$(date -u +%FT%TZ) background.sh: commit $commit: python -m training all --out $out $*" >> "$out/study.log"
  # The decoded-image caches stay in this checkout's runs/cache, shared with every other run here.
  (cd "$wt" && HAM10000_DIR="$data" nohup nice -n 19 "$wt/.venv/bin/python" -m training all --out "$out" \
      --cache-dir "$here/runs/cache" "$@" \
      >> "$out/study.log" 2>&1 < /dev/null & echo $! > "$out/study.pid")
  echo "study running at commit ${commit:0:12} (pid $(cat "$out/study.pid")); log: $out/study.log"
  echo "  status: training/background.sh status --out $out"
}

restore() {  # restore [--required]: the saved record of this study (see `save`) into an OUT that holds no study
  local record="$records/$(basename "$out")"
  if [[ ! -f "$record/background.json" ]]; then
    [[ "${1:-}" != --required ]] || { echo "background.sh: no saved record in $record" >&2; exit 1; }
    return 0
  fi
  if [[ -e "$out/background.json" || -e "$out/study.json" || -e "$out/recipe" ]]; then
    echo "background.sh: $out already holds a study: not restoring $record over it" >&2; exit 1
  fi
  cp -r "$record/." "$out/"
  find "$out" -type f -exec sed -i "s|@CHECKOUT@/|$here/|g" {} +
  echo "restored the saved record of $(basename "$out") from $record (finished recipe-search runs are skipped)"
}

case "$cmd" in
  start)
    if alive; then echo "background.sh: a study already runs in $out (pid $(cat "$out/study.pid"))" >&2; exit 1; fi
    if [[ -n "$(git -C "$here" status --porcelain -- training skinmodel)" ]]; then
      echo "background.sh: training/ or skinmodel/ has uncommitted changes: commit them, the study runs a commit" >&2
      exit 1
    fi
    commit="$(git -C "$here" rev-parse HEAD)"
    "$py" - "$out/background.json" "$commit" "${rest[@]}" <<'PY'
import json, sys
json.dump({"commit": sys.argv[2], "flags": sys.argv[3:]}, open(sys.argv[1], "w"), indent=2)
PY
    launch "$commit" "${rest[@]}" ;;
  resume)
    if alive; then echo "background.sh: the study in $out still runs (pid $(cat "$out/study.pid"))" >&2; exit 1; fi
    [[ -f "$out/background.json" ]] || restore
    [[ -f "$out/background.json" ]] || { echo "background.sh: $out/background.json missing: start the study first" >&2; exit 1; }
    mapfile -t saved < <("$py" -c 'import json, sys; b = json.load(open(sys.argv[1])); print(b["commit"]); [print(f) for f in b["flags"]]' "$out/background.json")
    flags=("${saved[@]:1}")
    [[ " ${flags[*]} " == *" --resume "* ]] || flags+=(--resume)
    launch "${saved[0]}" "${flags[@]}" ;;
  status) cd "$here" && exec "$py" -m training status --out "$out" "${rest[@]}" ;;
  stop)
    if alive; then kill -INT "$(cat "$out/study.pid")"; echo "sent SIGINT to $(cat "$out/study.pid")"; else echo "no study runs in $out"; fi ;;
  save)
    record="$records/$(basename "$out")"
    [[ -f "$out/background.json" ]] || { echo "background.sh: $out/background.json missing: nothing to save" >&2; exit 1; }
    if [[ -f "$record/background.json" ]] && ! cmp -s "$record/background.json" "$out/background.json"; then
      echo "background.sh: $record holds another study (its commit or flags differ): not saving over it" >&2; exit 1
    fi
    mkdir -p "$records"
    fresh="$(mktemp -d "$records/.save.XXXXXX")"  # written whole, then put in place: no runs of an older save
    cp "$out/background.json" "$out/study.json" "$fresh/"
    n=0
    for run in "$out"/recipe/*/; do
      [[ -f "$run/best.json" && -f "$run/score.json" ]] || continue
      mkdir -p "$fresh/recipe/$(basename "$run")"
      for f in args.json best.json score.json history.csv; do
        [[ ! -f "$run/$f" ]] || cp "$run/$f" "$fresh/recipe/$(basename "$run")/"
      done
      n=$((n + 1))
    done
    # this checkout's path is a placeholder in the record (restore puts the restoring checkout's back)
    find "$fresh" -type f -exec sed -i "s|$here/|@CHECKOUT@/|g" {} +
    rm -rf "$record" && mv "$fresh" "$record"
    echo "saved the study's record to $record: $n finished recipe-search runs (commit it)" ;;
  restore) restore --required ;;
  log) tail -c 200000 "$out/study.log" | tr '\r' '\n' | grep -v '%|' | tail -n "${rest[0]:-30}" ;;
  *) usage; exit 2 ;;
esac
