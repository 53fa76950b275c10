#!/usr/bin/env bash
# The 18 runs behind results/cifar10-jpeg-cpu-w16-e8-seeds/: res18,mbv1 then res18,res34, each with
# seeds 0, 1, 2 × xml, independent, dml; CIFAR-10 JPEGs, width 16, 8 epochs, the full recipe, on the CPU.
#
#   bash tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]
#
# DATA_DIR: the CIFAR-10 JPEG archive extracted (train/, test/). RUNS_DIR: where the runs go (RUNS_DIR/seeds/NAME,
# with checkpoints; keep it outside the repository). CODE_DIR: the checkout whose xml_ref.py trains, default this
# one; the reported runs used commit 84cf217 (`git worktree add --detach CODE_DIR 84cf217`), so that editing this
# checkout meanwhile cannot change a run half-way. One run at a time, each --resume: rerun the script after an
# interruption and it goes on where it stopped. A finished run's summary.json and metrics.jsonl are copied into
# this checkout's results/cifar10-jpeg-cpu-w16-e8-seeds/NAME/ with DATA_DIR and RUNS_DIR written as those words,
# so that it survives the machine once committed; a run already there is skipped.
set -euo pipefail
data=$(cd "${1:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}" && pwd)
mkdir -p "${2:?usage: tools/run_seeds.sh DATA_DIR RUNS_DIR [CODE_DIR]}/seeds"
runs=$(cd "$2" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
code=$(cd "${3:-$here}" && pwd)
keep=$here/results/cifar10-jpeg-cpu-w16-e8-seeds
PY=${PYTHON:-python3}
for pair in res18,mbv1 res18,res34; do
  for seed in 0 1 2; do
    for method in xml independent dml; do
      name=${pair/,/-}_${method}_s$seed
      if [ -f "$keep/$name/summary.json" ]; then echo "== $name: kept, skipped"; continue; fi
      if [ ! -f "$runs/seeds/$name/summary.json" ]; then
        echo "== $name: $(date -u +%FT%TZ)"
        (cd "$code" && "$PY" xml_ref.py --pair "$pair" --method "$method" --seed "$seed" --dataset folder \
          --data-dir "$data" --width 16 --epochs 8 --device cpu --out "$runs/seeds/$name" --resume)
      fi
      mkdir -p "$keep/$name"
      for f in summary.json metrics.jsonl; do
        text=$(<"$runs/seeds/$name/$f")
        text=${text//"$data"/DATA_DIR}
        printf '%s\n' "${text//"$runs"/RUNS_DIR}" > "$keep/$name/$f"
      done
    done
  done
done
echo "== all 18 finished; the table: python tools/report.py results/cifar10-jpeg-cpu-w16-e8-seeds --out results --name cifar10-jpeg-cpu-w16-e8-seeds"
