#!/usr/bin/env bash
# The reference run of logbook/reference/: the `tiny` preset on the built-in sample corpus,
# on a local Ray gang of 2 CPU workers, surviving one of each drill fault:
#   step 15  rank 1 killed (SIGKILL)             -> gang restart from the step-10 checkpoint
#   step 34  NaN loss                            -> guard: rollback to 30, LR x0.5, clip 0.3, skip batch
#   step 60  newest checkpoint corrupted on disk -> found at the next restart, step 50 used instead
#   step 64  rank 1 hangs before its collective  -> 30 s collective timeout, gang restart
#   step 90  loss x10 spike                      -> guard: rollback to 80, LR x0.25, skip batch
# then renders the chronicle and the loss plot into logbook/reference/.
#
#   logbook/reference-run.sh [WORK_DIR]     # default runs/reference (git-ignored)
#
# Run from the repository root after `make install` (or with PYTHON=...). About 5-15
# minutes on a 2-core machine. Checkpoints stay in WORK_DIR; only the chronicle and the
# plot are committed.
set -euo pipefail
OUT=${1:-runs/reference}
PY=${PYTHON:-.venv/bin/python}
opt_ray() { "$PY" -m opt_ray.cli "$@"; }

rm -rf "$OUT"
mkdir -p "$OUT" logbook/reference
# Absolute paths: Ray Train workers do not run in this directory.
OUT=$(cd "$OUT" && pwd)
"$PY" -c 'import sys; from opt_ray.data.sample import write_sample_corpus; print(write_sample_corpus(sys.argv[1]))' "$OUT/corpus"
opt_ray dedup "$OUT/corpus" --output "$OUT/dedup" --workers 1 --buckets 1 --num-cpus 2 --no-progress
opt_ray tokenizer train "$OUT/dedup" --vocab-size 4096 --output "$OUT/tokenizer"
opt_ray tokenize "$OUT/dedup" --tokenizer "$OUT/tokenizer" --seq-len 128 --output "$OUT/shards" \
    --workers 0 --no-progress
opt_ray train --preset tiny --data "$OUT/shards" --output "$OUT/run" --workers 2 --steps 120 \
    --batch-tokens 4096 --micro-batch 16 --checkpoint-every 10 --keep 3 --max-failures 4 \
    --collective-timeout 30 --num-cpus 3 --seed 0 --no-progress \
    --chaos kill:rank=1:step=15,nan:step=34,corrupt:step=60,hang:rank=1:step=64,spike:step=90:factor=10
opt_ray logbook "$OUT/run" --plot logbook/reference/loss.png --output logbook/reference/LOGBOOK.md
echo "chronicle: logbook/reference/LOGBOOK.md, plot: logbook/reference/loss.png, run: $OUT/run"
