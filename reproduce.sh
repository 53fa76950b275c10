#!/usr/bin/env bash
# Regenerate the deck's experiments and results/RESULTS.md + results/results.json.
#
#   bash reproduce.sh                          # CIFAR-100, 200 epochs (the full table; needs a GPU and days)
#   bash reproduce.sh --dataset cifar10 --epochs 30
#   bash reproduce.sh --dataset folder DIR     # any ImageFolder data set (DIR/train, DIR/test)
#   bash reproduce.sh --quick                  # pipeline check: synthetic data, 1 epoch, width 8 (minutes, CPU)
#   bash reproduce.sh --pair res18,mbv1        # one pair's runs only
#
# Options: --dataset cifar100|cifar10|synthetic|folder DIR, --epochs N, --quick, --pair NET1,NET2
# (repeatable; default both of the deck's pairs), --runs DIR (the run directories, default
# runs/reproduce-<dataset>), --results DIR (default results; for synthetic data, as with --quick, the runs
# folder, so that a pipeline check does not write into results/), and anything after `--` is passed to
# every training run (e.g. -- --batch-size 256 --device cuda:1).
# Runs: both pairs (res18,mbv1 and res18,res34, or the --pair ones) × independent, dml, xml, xml+l2, xml with --path-weights
# mean, then kd and fitnet with the pair's independently trained larger net as teacher; the interpolation
# study of the xml, xml (mean) and xml+l2 runs. Every run reports every path twice: with the shared
# BatchNorm statistics (the deck's plain BatchNorm) and with each path's own statistics, kept apart
# during training (docs/USAGE.md, "BatchNorm": why XML needs both).
# Resumable: a finished run (its summary.json exists) is skipped if the same command made it (else the
# script stops: another --runs DIR for other settings), an interrupted one resumes from last.pt.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
dataset=cifar100 data_dir=data epochs=200 runs='' results='' pairs='' extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) dataset=$2; shift 2
               if [ "$dataset" = folder ]; then data_dir=${1:?--dataset folder needs a directory}; shift; fi ;;
    --epochs) epochs=$2; shift 2 ;;
    --pair) pairs="$pairs $2"; shift 2 ;;
    --quick) dataset=synthetic epochs=1 extra+=(--width 8); shift ;;
    --runs) runs=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "reproduce.sh: unknown option $1 (see the comment at the top of reproduce.sh)" >&2; exit 2 ;;
  esac
done
runs=${runs:-runs/reproduce-$dataset}
if [ -z "$results" ]; then results=results; [ "$dataset" = synthetic ] && results=$runs; fi
# ${a[@]+"${a[@]}"}: an empty array under set -u, also in bash before 4.4 (macOS's 3.2)
common=(--dataset "$dataset" --data-dir "$data_dir" --epochs "$epochs" ${extra[@]+"${extra[@]}"})

train() {  # train NAME ARGS...: one run in $runs/NAME, skipped when finished, resumed when interrupted
  local dir=$runs/$1; shift
  if [ -f "$dir/summary.json" ]; then  # skipped only if this very command made it
    "$PY" - "$dir/summary.json" "$@" "${common[@]}" <<'EOF' || exit 2
import json, shlex, sys
def settings(args):  # the command's arguments without its --out and --resume
    return [a for k, a in enumerate(args) if a != '--resume' and '--out' not in args[max(k - 1, 0):k + 1]]
was = settings(shlex.split(json.load(open(sys.argv[1]))['command'])[2:])
if was != settings(sys.argv[2:]):
    sys.exit(f'reproduce.sh: {sys.argv[1]} is of another command ({shlex.join(was)}); give another '
             '--runs DIR, or remove that run')
EOF
    echo "== $dir: finished, skipped"; return
  fi
  local resume=(); [ -f "$dir/last.pt" ] && resume=(--resume)
  echo "== $dir"
  "$PY" xml_ref.py "$@" "${common[@]}" --out "$dir" ${resume[@]+"${resume[@]}"}
}

for pair in ${pairs:-res18,mbv1 res18,res34}; do
  name=${pair/,/-}
  for method in independent dml xml xml+l2; do
    train "${name}_$method" --pair "$pair" --method "$method"
  done
  # the deck's literal XML sums its paths; the mean (÷ 3) is the other choice (docs/METHOD.md §3)
  train "${name}_xml-mean" --pair "$pair" --method xml --path-weights mean
  for method in kd fitnet; do  # the teacher: the larger net of the independent run
    train "${name}_$method" --pair "$pair" --method "$method" --teacher "$runs/${name}_independent/last.pt"
  done
  for run in xml xml-mean xml+l2; do
    [ -f "$runs/${name}_$run/interpolation.csv" ] || "$PY" tools/interpolate.py "$runs/${name}_$run"
  done
done
"$PY" tools/report.py "$runs" --out "$results"
echo "wrote $results/RESULTS.md and $results/results.json"
