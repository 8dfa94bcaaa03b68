#!/usr/bin/env bash
# Issue 18's acceptance check: the fast engine of the pre-refactor commit (server/fast_engine.py) and of
# this tree (server/engine/), measured by each tree's own bench/engine.py (engine in-process, fixed-length
# greedy llama-7b, 128 + 256 tokens) at batch 1, 64 and the largest, in one run on one GPU, alternating
# old/new ROUNDS times; prints both tables and new/old per batch. Target: new within 2% of old.
#
#   bench/refactor_check.sh prepare [COMMIT]   # on a git checkout: COMMIT's tree into .refcheck/old (git
#                                              # archive; default: the parent of the commit that removed
#                                              # server/fast_engine.py). Carry .refcheck to the GPU machine.
#   bench/refactor_check.sh run OUT_DIR        # GPU machine, from the repo root; deps importable (the
#                                              # device-wheels install line, which puts .whl/*.whl on PYTHONPATH)
#   bench/refactor_check.sh run OUT_DIR --quick   # tiny on CPU: proves the script runs
#
# Env: BATCHES (default 1,64,320: 320 is the largest that fits llama-7b on an 80 GB H100), ROUNDS (1),
# MIN_SECONDS (3), TIMEOUT_S per bench run (280). Each tree runs from its own copy laid out as the
# installed package (pyproject's package-dir), first on PYTHONPATH, from /tmp: never the repo root (its
# llmwatts/ folder would shadow the mapped boxes).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:?usage: refactor_check.sh prepare [COMMIT] | run OUT_DIR [--quick]}

layout() {  # layout TREE SITE: the package as pip would install it, from TREE's pyproject package-dir
  python3 - "$1" "$2" <<'EOF'
import shutil, sys, tomllib
from pathlib import Path
tree, site = Path(sys.argv[1]), Path(sys.argv[2])
cfg = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
shutil.rmtree(site, ignore_errors=True)
for pkg, src in sorted(cfg["package-dir"].items(), key=lambda kv: kv[0].count(".")):
    shutil.copytree(tree / src, site / pkg.replace(".", "/"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
EOF
}

case $cmd in
prepare)
  commit=${2:-$(git -C "$here" log --diff-filter=D --format=%H -1 -- server/fast_engine.py)^}
  rm -rf "$here/.refcheck/old" && mkdir -p "$here/.refcheck/old"
  git -C "$here" archive "$commit" | tar -x -C "$here/.refcheck/old" || exit 1
  git -C "$here" rev-parse "$commit" > "$here/.refcheck/old.commit"
  echo "old tree: $(cat "$here/.refcheck/old.commit") in .refcheck/old ($(du -sh "$here/.refcheck" | cut -f1))"
  ;;
run)
  out=$(mkdir -p "${2:?OUT_DIR}" && cd "$2" && pwd); quick=${3:-}
  [ -f "$here/.refcheck/old/pyproject.toml" ] || { echo "no .refcheck/old: run 'bench/refactor_check.sh prepare' on a git checkout first"; exit 2; }
  work=$(mktemp -d)
  layout "$here/.refcheck/old" "$work/old" && layout "$here" "$work/new" || exit 1
  export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
  args=(--engines fast --batches "${BATCHES:-1,64,320}" --telemetry-hz '' --variants '' --no-agreement
        --min-seconds "${MIN_SECONDS:-3}")
  [ "$quick" = --quick ] && args=(--quick --engines fast --telemetry-hz '' --variants '' --no-agreement)
  { echo "old: $(cat "$here/.refcheck/old.commit" 2>/dev/null || echo '?')"
    echo "new: $(git -C "$here" rev-parse HEAD 2>/dev/null || echo 'working tree')"
    nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader 2>/dev/null; } | tee "$out/trees.txt"
  declare -A src=([old]="$here/.refcheck/old" [new]="$here")
  for round in $(seq "${ROUNDS:-1}"); do
    for tree in old new; do
      echo "== round $round: $tree"
      (cd /tmp && PYTHONPATH="$work/$tree${PYTHONPATH:+:$PYTHONPATH}" timeout "${TIMEOUT_S:-280}" \
        python3 "${src[$tree]}/bench/engine.py" "${args[@]}" --json "$out/$tree-$round.json" > "$out/$tree-$round.log" 2>&1)
      echo "rc=$?"
      sed -n '/^# /,$p' "$out/$tree-$round.log" | grep -v '^targets:'
    done
  done
  python3 - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}  # (tree, batch) -> [row per round]
for f in sorted(out.glob("*-*.json")):
    tree = f.stem.split("-")[0]
    for r in json.loads(f.read_text())["rows"]:
        if r["engine"] == "fast" and "tok_s" in r:
            rows.setdefault((tree, r["batch"]), []).append(r)
def med(tree, b, key):
    v = [r[key] for r in rows.get((tree, b), []) if key in r]
    return statistics.median(v) if v else float("nan")
print("\n| batch | old tok/s | new tok/s | new/old | old J/token | new J/token |\n|---|---|---|---|---|---|")
for b in sorted({b for _, b in rows}):
    o, n = med("old", b, "tok_s"), med("new", b, "tok_s")
    print(f"| {b} | {o:.1f} | {n:.1f} | {n / o:.3f} | {med('old', b, 'j_per_token'):.4f} | {med('new', b, 'j_per_token'):.4f} |")
EOF
  ;;
*) echo "unknown command $cmd: use prepare or run"; exit 2 ;;
esac
