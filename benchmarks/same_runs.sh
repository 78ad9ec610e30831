#!/usr/bin/env bash
# Train every loss with the demo's settings (3 epochs, seed 0) in two checkouts of foodlib and
# compare metrics.json and trace.csv (all columns but timings): a refactoring must change no run.
#   bash benchmarks/same_runs.sh /path/to/old-checkout /path/to/new-checkout [OUT]
# Both checkouts are imported through PYTHONPATH with this checkout's .venv; each run uses one core.
set -euo pipefail
OLD=$(cd "$1" && pwd); NEW=$(cd "$2" && pwd); OUT=${3:-/tmp/foodlib-same-runs}
PY=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
LOSSES="softmax center lgm island contrastive_center cosface arcface"
for tree in "$OLD" "$NEW"; do
  name=$( [ "$tree" = "$OLD" ] && echo old || echo new )
  for loss in $LOSSES; do
    extra=()
    [ "$loss" = center ] && extra=(--lam 0.01)
    [ "$loss" = lgm ] && extra=(--alpha 0.1 --lam 0.01)
    (cd "$tree" && PYTHONPATH="$tree" "$PY" -m foodlib.cli train --data dishes --dishes-classes 10 \
      --dishes-per-class 200 --image-size 64 --backbone smallcnn --epochs 3 --batch-size 64 --lr 0.003 \
      --workers 0 --threads 1 --loss "$loss" "${extra[@]}" --seed 0 --quiet --no-figures --no-tensorboard \
      --out "$OUT/$name/$loss" > "$OUT-$name-$loss.log" 2>&1)
  done
done
OUT="$OUT" LOSSES="$LOSSES" "$PY" - <<'PY'
import csv, json, os
from pathlib import Path
root = Path(os.environ["OUT"])
def trace(run):
    return [{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")} for row in csv.DictReader(open(run / "trace.csv"))]
for loss in os.environ["LOSSES"].split():
    old, new = (json.loads((root / side / loss / "metrics.json").read_text()) for side in ("old", "new"))
    same = trace(root / "old" / loss) == trace(root / "new" / loss)
    print(f"{loss:20s} test top-1 {old['test']['top1']:.4f} -> {new['test']['top1']:.4f}  "
          f"val {old['val']['top1']:.4f} -> {new['val']['top1']:.4f}  trace identical: {same}")
PY
