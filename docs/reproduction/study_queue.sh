#!/bin/bash
# The classification studies' queue (issue 36), most valuable cells first; every step resumes from
# the run records in $OUT (<name>_runs.jsonl), so a killed queue restarted with the same $OUT runs
# only what is missing. One process, one torch thread, nice 19 (the machine is shared).
#
#   OUT=docs/reproduction docs/reproduction/study_queue.sh      # from the repository root
#
# $OUT must hold the records so far (docs/reproduction/*_runs.jsonl); $PY is the Python to use.
set -e
OUT=${OUT:-docs/reproduction}
PY=${PY:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
study() { nice -n 19 "$PY" -W ignore tools/batch_size_study.py --threads 1 --resume --out-dir "$OUT" "$@"; }

# 1. group table at 5 epochs, third seed of G = 32, 8, 1 and C (1 channel per group)
study --study groups --seeds 2 --groups 32 8 1 --channels-per-group 1
# 2. batch table, seeds 1 and 2: the cheap large batches, then batch 2 (BN's degradation)
study --study batch --seeds 1 2 --batch-sizes 32 16
study --study batch --seeds 1 2 --batch-sizes 2
# 3. the 20-epoch group rerun's second seed (G = 32, 1, C)
study --study groups --epochs 20 --seeds 1 --groups 32 1 --channels-per-group 1
# 4. batch table, seeds 1 and 2 at batch 8 and 4 (the slow cells)
study --study batch --seeds 1 2 --batch-sizes 8 4
# 5. the 20-epoch rerun at every G, seeds 0 and 1
study --study groups --epochs 20 --seeds 0 1 --groups 64 32 16 8 4 2 1 --channels-per-group 1
# 6. the rest of the 5-epoch group table, seed 2
study --study groups --seeds 2
# 7. beyond the minimum: a fourth seed of the batch table and of G = 32, 8, 1, C; a third
#    20-epoch seed of G = 32, 1, C
study --study groups --seeds 3 --groups 32 8 1 --channels-per-group 1
study --study batch --seeds 3 --batch-sizes 32 2 16 8 4
study --study groups --epochs 20 --seeds 2 --groups 32 1 --channels-per-group 1
# 8. what the seed's spread is made of: the images fixed (data seed 0), the seed varying the
#    initial weights and batch order only (its own section, batch_study_data0)
study --study batch --name batch_study_data0 --data-seed 0 --seeds 0 1 2 --batch-sizes 32 2
# 9. a third 20-epoch seed of the other group counts
study --study groups --epochs 20 --seeds 2 --groups 16 8 4 2 --channels-per-group 1
# 10. the tables, from every record (nothing left to run)
study --study batch --seeds 0 1 2 3 --tables-only
study --study groups --seeds 0 1 2 3 --tables-only
study --study groups --epochs 20 --seeds 0 1 2 --groups 64 32 16 8 4 2 1 --channels-per-group 1 --min-seeds 2 --tables-only
study --study batch --name batch_study_data0 --data-seed 0 --seeds 0 1 2 --batch-sizes 32 2 --tables-only
echo "study queue: done"
