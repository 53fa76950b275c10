#!/usr/bin/env bash
# The runs behind results/cifar10-jpeg-cpu-w16-e8-seeds/: res18,mbv1 then res18,res34, each with seeds 0, 1, 2 ×
# xml, independent, dml (18 runs); then, for the question whether res18's cost under XML shrinks with a longer
# schedule, res18,mbv1 independent and xml, seed 0, over 30 epochs (results/cifar10-jpeg-cpu-w16-e30/).
# CIFAR-10 JPEGs, width 16, the full recipe, on the CPU.
#
#   bash tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]
#
# DATA_DIR: the CIFAR-10 JPEG archive extracted (train/, test/). RUNS_DIR: where the runs go (RUNS_DIR/seeds/NAME,
# with checkpoints; keep it outside the repository). CODE_DIR: the checkout whose xml_ref.py trains, default this
# one; the reported runs used commit 84cf217 (`git worktree add --detach CODE_DIR 84cf217`), so that editing this
# checkout meanwhile cannot change a run half-way. One run at a time, each --resume: rerun the script after an
# interruption and it goes on where it stopped. A finished run's summary.json and metrics.jsonl are copied into
# this checkout's results/FOLDER/NAME/ with DATA_DIR and RUNS_DIR written as those words, so that it survives the
# machine once committed; a run already there is skipped.
set -euo pipefail
data=$(cd "${1:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}" && pwd)
mkdir -p "${2:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}/seeds"
runs=$(cd "$2" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
code=$(cd "${3:-$here}" && pwd)
PY=${PYTHON:-python3}

run_and_keep() {  # FOLDER PAIR METHOD SEED EPOCHS NAME
  local keep=$here/results/$1/$6
  if [ -f "$keep/summary.json" ]; then echo "== $6: kept, skipped"; return; fi
  if [ ! -f "$runs/seeds/$6/summary.json" ]; then
    echo "== $6: $(date -u +%FT%TZ)"
    (cd "$code" && "$PY" xml_ref.py --pair "$2" --method "$3" --seed "$4" --dataset folder \
      --data-dir "$data" --width 16 --epochs "$5" --device cpu --out "$runs/seeds/$6" --resume)
  fi
  mkdir -p "$keep"
  for f in summary.json metrics.jsonl; do
    text=$(<"$runs/seeds/$6/$f")
    text=${text//"$data"/DATA_DIR}
    printf '%s\n' "${text//"$runs"/RUNS_DIR}" > "$keep/$f"
  done
}

for pair in res18,mbv1 res18,res34; do
  for seed in 0 1 2; do
    for method in xml independent dml; do
      run_and_keep cifar10-jpeg-cpu-w16-e8-seeds "$pair" "$method" "$seed" 8 "${pair/,/-}_${method}_s$seed"
    done
  done
done
echo "== all 18 finished; the table: python tools/report.py results/cifar10-jpeg-cpu-w16-e8-seeds --out results --name cifar10-jpeg-cpu-w16-e8-seeds"
for method in independent xml; do
  run_and_keep cifar10-jpeg-cpu-w16-e30 res18,mbv1 "$method" 0 30 "res18-mbv1_${method}_s0_e30"
done
echo "== the 30-epoch runs finished; the table: python tools/report.py results/cifar10-jpeg-cpu-w16-e30 --out results --name cifar10-jpeg-cpu-w16-e30"
