#!/usr/bin/env bash
# `make demo`: a short Time-LLM training on the bundled ETTh1 data with a tiny offline
# LLM, interrupted by SIGTERM (as a preempted VM or SLURM would), resumed with
# `--resume latest`, then `ckptkit ls`, `ckptkit inspect` and `ckptkit predict`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

RUN=${RUN:-runs/demo-etth1}
TRAIN=(ckptkit train --preset tiny-cpu --max-steps 60 --save-steps 15 --eval-batches 8
       --log-every 5 --output "$RUN")
INTERRUPT_AFTER=${INTERRUPT_AFTER:-25}

echo "== 1/5 train from scratch; SIGTERM after ${INTERRUPT_AFTER}s (a preemption)"
set +e
timeout --preserve-status --signal=TERM --kill-after=120 "$INTERRUPT_AFTER" \
    "${TRAIN[@]}" --resume never --overwrite
rc=$?
set -e
case $rc in
  75) echo "-> exit 75: stopped early on purpose, checkpoint saved; resume with --resume latest" ;;
  0)  echo "-> finished before the signal arrived (a fast machine); resuming is then a no-op" ;;
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
