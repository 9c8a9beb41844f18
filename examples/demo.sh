#!/usr/bin/env bash
# `make demo`: a short Time-LLM training on the bundled ETTh1 data with a tiny offline
# LLM, interrupted by SIGTERM (as a preempted VM or SLURM would), resumed with
# `--resume latest`, then `ckptkit ls`, `ckptkit inspect` and `ckptkit predict`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

RUN=${RUN:-runs/demo-etth1}
TRAIN=(ckptkit train --preset tiny-cpu --max-steps 90 --save-steps 15 --eval-batches 8
       --log-every 5 --output "$RUN")
INTERRUPT_AT=${INTERRUPT_AT:-30}   # send SIGTERM once the checkpoint of this step exists

echo "== 1/5 train from scratch; SIGTERM once step $INTERRUPT_AT is saved (a preemption)"
rm -rf "$RUN"
"${TRAIN[@]}" --resume never &
pid=$!
marker="$RUN/$(printf 'step-%012d' "$INTERRUPT_AT")/manifest.json"
while kill -0 "$pid" 2>/dev/null && [ ! -f "$marker" ]; do sleep 0.2; done
kill -TERM "$pid" 2>/dev/null || true
set +e
wait "$pid"
rc=$?
set -e
case $rc in
  75) echo "-> exit 75: finished the step, saved, stopped; resume with --resume latest" ;;
  0)  echo "-> finished before the signal arrived; resuming is then a no-op" ;;
  *)  echo "-> unexpected exit code $rc" >&2; exit "$rc" ;;
esac

echo; echo "== 2/5 checkpoints so far"
ckptkit ls "$RUN"

echo; echo "== 3/5 resume exactly where it stopped"
"${TRAIN[@]}" --resume latest

echo; echo "== 4/5 what the run holds"
ckptkit ls "$RUN"
ckptkit inspect "$RUN"
ckptkit verify "$RUN"

echo; echo "== 5/5 forecast the 24 hours after the end of ETTh1 with the best checkpoint"
ckptkit predict --checkpoint "$RUN" --data ETTh1 --out "$RUN/forecast.csv" --plot "$RUN/forecast.png"
head -n 4 "$RUN/forecast.csv"
echo
echo "Run files (checkpoints, metrics.jsonl, train.log, loss.png, forecast): $RUN/"
ls "$RUN"
