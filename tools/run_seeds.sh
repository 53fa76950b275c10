#!/usr/bin/env bash
# The CPU runs behind results/: CIFAR-10 JPEGs, width 16, the full recipe, one run at a time.
# 1. results/cifar10-jpeg-cpu-w16-e8-seeds/: res18,mbv1 then res18,res34, each with seeds 0, 1, 2 × xml,
#    independent, dml over 8 epochs (18 runs, commit 84cf217).
# 2. results/cifar10-jpeg-500pc-cpu-w16-e200/: the deck's whole schedule (200 epochs) on the first 500 training
#    images of each class (--train-per-class 500: CIFAR-100's images per class), the test set evaluated after
#    every 5th epoch: res18,mbv1 independent, xml, dml at seed 0; res18,mbv1 independent and xml at seeds 1 and
#    2; then res18,res34 independent and xml at seed 0.
#
#   bash tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]
#
# DATA_DIR: the CIFAR-10 JPEG archive extracted (train/, test/). RUNS_DIR: where the runs go (RUNS_DIR/FOLDER/NAME,
# with checkpoints; keep it outside the repository). CODE_DIR: the checkout whose xml_ref.py trains, default this
# one; a worktree of a fixed commit (`git worktree add --detach CODE_DIR COMMIT`; results/*/README.md names it)
# keeps edits to this checkout from changing a run half-way. One run at a time, each --resume: rerun the script
# after an interruption and it goes on where it stopped. A finished run's summary.json and metrics.jsonl are
# copied into this checkout's results/FOLDER/NAME/ with DATA_DIR and RUNS_DIR written as those words, so that it
# survives the machine once committed; a run already there is skipped.
set -euo pipefail
data=$(cd "${1:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}" && pwd)
mkdir -p "${2:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}"
runs=$(cd "$2" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
code=$(cd "${3:-$here}" && pwd)
PY=${PYTHON:-python3}

run_and_keep() {  # FOLDER PAIR METHOD SEED NAME [more options of xml_ref.py]
  local folder=$1 pair=$2 method=$3 seed=$4 name=$5
  shift 5
  local keep=$here/results/$folder/$name
  if [ -f "$keep/summary.json" ]; then echo "== $name: kept, skipped"; return; fi
  if [ ! -f "$runs/$folder/$name/summary.json" ]; then
    echo "== $name: $(date -u +%FT%TZ)"
    (cd "$code" && "$PY" xml_ref.py --pair "$pair" --method "$method" --seed "$seed" --dataset folder \
      --data-dir "$data" --width 16 --device cpu --out "$runs/$folder/$name" --resume "$@")
  fi
  mkdir -p "$keep"
  for f in summary.json metrics.jsonl; do
    text=$(<"$runs/$folder/$name/$f")
    text=${text//"$data"/DATA_DIR}
    printf '%s\n' "${text//"$runs"/RUNS_DIR}" > "$keep/$f"
  done
}

for pair in res18,mbv1 res18,res34; do
  for seed in 0 1 2; do
    for method in xml independent dml; do
      run_and_keep cifar10-jpeg-cpu-w16-e8-seeds "$pair" "$method" "$seed" "${pair/,/-}_${method}_s$seed" --epochs 8
    done
  done
done
e200=cifar10-jpeg-500pc-cpu-w16-e200
for run in res18,mbv1:independent:0 res18,mbv1:xml:0 res18,mbv1:dml:0 res18,mbv1:independent:1 res18,mbv1:xml:1 \
           res18,mbv1:independent:2 res18,mbv1:xml:2 res18,res34:independent:0 res18,res34:xml:0; do
  IFS=: read -r pair method seed <<< "$run"
  run_and_keep $e200 "$pair" "$method" "$seed" "${pair/,/-}_${method}_s$seed" --train-per-class 500 --eval-every 5
done
echo "== the table: python tools/report.py results/$e200 --out results --name $e200"
