#!/usr/bin/env bash
# The prepared GPU work as one script: two commands of at most 10 minutes each on a GPU machine.
#
#   bash tools/gpu_run.sh 1      phase 1: (a) the CUDA-only tests, (b) 6 runs on CIFAR-10 JPEGs
#   bash tools/gpu_run.sh 2      phase 2: (c) the benchmark's missing rows, (d) torch.compile trial
#   bash tools/gpu_run.sh train  (b) alone: finish the runs phase 1 left unfinished (see Resuming)
#   Phases can share a command (`bash tools/gpu_run.sh 2 train`); they then share its time budget.
#   TINY=1 OUT=DIR [ARCHIVE=DATA_ARCHIVE] bash tools/gpu_run.sh 1   (and 2): the same lines on a
#   CPU, toy sizes; without ARCHIVE the runs train on --dataset synthetic.
#
# (b): width 64, both pairs (res18,res34 and res18,mbv1) × independent, dml, xml, seed 0, the full
# recipe (xml_ref.py's defaults: 1 warm-up epoch, lr × 0.2 at 30/60/80 % of the epochs, crop, flip
# and rotation by up to ±15°, --rotate's default), EPOCHS epochs each (tools/gpu_runs.py). Every
# path is reported with the shared BatchNorm statistics and with its own kept during training
# (own_bn). Only xml_ref.py's own nets (the deck's), not torchvision's ('tv:').
#
# Each result is written under $OUT as soon as it exists, in at most 8 files per command and no
# subfolders (for a remote runner that copies back only a few plain files; ours took 8), so a command cut off by its time limit
# still returns what it finished. A failing item does not stop the phase: each runs under
# `timeout` and its exit status goes to $OUT/gpu_run.log; the script exits 1 if any item failed or
# was skipped, 3 if torch sees no GPU (outside TINY mode).
#
# ---- The data ----------------------------------------------------------------------------------
# Handed in as the environment variable ARCHIVE: the path of a .tar.gz of CIFAR-10 as JPEGs in
# ImageFolder layout (train/<class>/*.jpg, test/<class>/*.jpg), below called DATA_ARCHIVE. The script
# names no data folder of its own. It is needed whenever DATA_DIR does not yet hold train/ and
# test/ (phase 1, or train on a fresh machine); phase 2 needs no data. TINY mode: with ARCHIVE,
# 10 training and 5 test JPEGs per class are taken from it; with none, synthetic data.
#
# ---- On a remote GPU machine that receives a copy of the repository alone ------------------------
# Prepare once, on your machine: the archive travels in an ignored folder inside the repository:
#   mkdir -p .data && cp DATA_ARCHIVE .data/cifar10-jpeg.tar.gz && echo /.data/ >> .git/info/exclude
# Command 1 (a 600 s limit; copy .data along):
#   ARCHIVE=.data/cifar10-jpeg.tar.gz bash tools/gpu_run.sh 1
# Command 2 (a 450 s limit):  bash tools/gpu_run.sh 2
# pytest and hypothesis were installed on the H200 machine used (2026-11-17): no wheels needed.
# Should a machine lack them and reach no package index, here: echo /.whl/ >> .git/info/exclude; python3 -m pip download
#   --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux2014_x86_64 -d .whl pytest iniconfig pluggy packaging hypothesis attrs
#   sortedcontainers   (pure-Python wheels, about 2 MB), and copy .whl along: this script
#   installs whatever .whl/ holds.
#
# ---- Time (estimated from results/bench.md's H200 rates; 49,920 training images an epoch) -------
# The benchmark's rates predate two things every run now does. The rotation: a few more kernels a
# step, outside the CUDA graph, ~1 %. Each path's own BatchNorm statistics: inside the captured
# step, one more batch_norm call (statistics only kept) on every BatchNorm of each trained path's
# down-half: a guessed +10 %. So training at the benchmark's rate × 1.11. Beside the training, an
# epoch evaluates the 10k test images on all 4 paths twice (shared, then own statistics: the
# down-halves run again, a guessed +0.5 s) and writes the checkpoints: about 3.0 s for
# res18,res34, 2.2 s for res18,mbv1 (an earlier H200 run, res18,mbv1 xml, 8 epochs, fast path,
# before both additions, took 44.8 s in all: 5.6 s an epoch).
#   res18,res34 xml               5.1 × 1.11 + 3.0 = 8.7 s   (9,836 img/s benchmarked)
#   res18,res34 dml, independent  3.2 × 1.11 + 3.0 = 6.6 s   (15,742 / 15,909 img/s)
#   res18,mbv1 xml                3.3 × 1.11 + 2.2 = 5.9 s   (15,133 img/s)
#   res18,mbv1 dml, independent   2.8 × 1.11 + 2.2 = 5.3 s   (not benchmarked; ~18k img/s assumed)
# So 38 s per epoch of all 6 runs, and about 6 s per run besides (cuDNN autotuning, CUDA-graph
# capture, the final latency table). No per-run BatchNorm re-estimation any more: the runs report
# their own statistics themselves. EPOCHS defaults to 8: 6 × 6 + 8 × 38 = 340 s of training,
# plus the tests (~45 s), unpacking (~3 s), decoding the JPEGs (~12 s, once) and start-up (~5 s):
# phase 1 ≈ 6.8 min (405 s), so that both phases (≈ 11-12.5 min) fit 15 minutes of GPU time,
# the machine's start included. EPOCHS=10: ≈ 8 min (481 s; epochs up to ~13 % slower than
# guessed still fit its 570 s budget, beyond that the last run stops after an epoch, resumable
# with train); EPOCHS=12: ≈ 9.3 min, the last run likely cut off. Phase 2: the 11 missing benchmark rows ≈ 1.5-2 min
# (4 'usual' rows at ~7 s, 5 'ours' and 2 'ours-eager' at ~5 s, start-up ~15 s; the benchmark
# measures the step as before, without rotation and own statistics); the compile trial (bf16, mode
# default) ≈ 2-3.5 min, of which compiling res18+res34's forward, both routed backward passes and
# fused SGD is a guess of 1-2.5 min. Phase 2 ≈ 4-5.5 min; both ≈ 11-12.5 min, plus the start.
# Budgets: a command holding phase 1 or train starts no work after BUDGET_S=570 s, phase 2 alone
# after 420 s; the training driver stops its run in progress after the epoch's checkpoint 30 s
# before its item's timeout.
#
# ---- Resuming ------------------------------------------------------------------------------------
# Runs go into RUNS_DIR (/dev/shm/xml_runs with 8 GiB free there, else runs/gpu22) with --resume.
# While the machine is warm (the next call within 30 s of the last), `bash tools/gpu_run.sh 2
# train` resumes the unfinished runs from their last epoch after phase 2, in the time left. A fresh
# machine has no runs folder: give RUNS_ONLY=name,name (the unfinished runs in the last
# runs.json) and ARCHIVE again, so that finished runs are not trained again.
#
# ---- Settings (environment) ----------------------------------------------------------------------
# OUT (required), ARCHIVE (see The data; no default), TINY (0), PYTHON (python3), BUDGET_S,
# EPOCHS (8; tiny 1), WIDTH (64; tiny 8), DATA_DIR ($TMPDIR or /tmp, then cifar10), RUNS_DIR,
# RUNS_ONLY, TINY_WORK (tiny: the scratch folder, gpu_run_tiny in $TMPDIR or /tmp; its runs/ keeps
# finished runs, which a later tiny phase 1 skips: remove it to start afresh), COMPILE_TRIALS
# ("default:bf16"; add default:fp32 for the sharper fp32 agreement check, or
# max-autotune-no-cudagraphs:bf16; each compiles afresh, 1-3 min).
#
# ---- Files under $OUT (at most 8, whatever phases a command holds) -------------------------------
# gpu_run.log      everything printed: each item's output between its START and END lines (the
#                  tests' results among them), the items' exit statuses again at the end
# runs.tar.gz      phase 1 / train: each run's summary.json and metrics.jsonl (tools/report.py's
#                  input), runs.json and runs.md: a line per run (epochs, rotation, top-1 per net
#                  and the cross matrix with shared and with own BatchNorm statistics, img/s)
# bench.json, bench.md                   phase 2: results/bench.json's rows and the new ones
# compile_trial.json, compile_trial.md   phase 2: compile time, agreement, img/s
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
[ $# -gt 0 ] || { sed -n '2,9p' "$0"; exit 2; }  # the usage
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
TINY=${TINY:-0}
PY=${PYTHON:-python3}
case " $* " in
    *" 1 "* | *" train "*) BUDGET_S=${BUDGET_S:-570} ;;
    *) BUDGET_S=${BUDGET_S:-420} ;;
esac
START=$SECONDS
LOG=$OUT/gpu_run.log
FAILED=0
STATUS=()
export PYTHONUNBUFFERED=1

SCRATCH=${TMPDIR:-/tmp}
if [ "$TINY" = 1 ]; then  # toy sizes on the CPU, one thread: a job beside this one keeps its cores
    export OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
    WORK=${TINY_WORK:-$SCRATCH/gpu_run_tiny}
    EPOCHS=${EPOCHS:-1} WIDTH=${WIDTH:-8}
    DATA_DIR=${DATA_DIR:-$WORK/cifar10}
    RUNS_DIR=${RUNS_DIR:-$WORK/runs}
    TRAIN_EXTRA=(--device cpu --fast off --batch-size 16)
    # Inductor compiles the tiny step in about 3 min on two busy cores; aot_eager (Dynamo and
    # AOTAutograd, no code generation) runs the same lines in seconds. inductor: the real thing.
    COMPILE_ARGS=(--tiny --backend "${TINY_COMPILE_BACKEND:-aot_eager}")
else
    EPOCHS=${EPOCHS:-8} WIDTH=${WIDTH:-64}
    DATA_DIR=${DATA_DIR:-$SCRATCH/cifar10}
    shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [ "${shm_free:-0}" -ge $((8 << 20)) ]; then  # checkpoints (0.5 GB an epoch) stay in memory
        RUNS_DIR=${RUNS_DIR:-/dev/shm/xml_runs}
    else
        RUNS_DIR=${RUNS_DIR:-$REPO/runs/gpu22}
    fi
    TRAIN_EXTRA=()
    COMPILE_ARGS=()
fi
ARCHIVE=${ARCHIVE:-}  # no default: the data are handed in (header, The data)
DATASET=folder
COMPILE_TRIALS=${COMPILE_TRIALS:-default:bf16}

log() { printf '[%s +%3ds] %s\n' "$(date +%T)" $((SECONDS - START)) "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

# item NAME CAP_S COMMAND...: COMMAND under timeout (CAP_S, or less if the budget has less left),
# its output shown and appended to the log; logs its exit status (124 timed out, 137 killed).
item() {
    local name=$1 cap=$2 t t0 rc
    shift 2
    t=$(($(left) - 5))
    ((t > cap)) && t=$cap
    if ((t < 10)); then
        log "SKIP $name: $(left) s left of the ${BUDGET_S} s budget"
        STATUS+=("$name: skipped, no time left")
        FAILED=$((FAILED + 1))
        return 124
    fi
    log "START $name (timeout ${t} s): $*"
    t0=$SECONDS
    timeout -k 20 -s TERM "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && rc="$rc (timed out)"
    log "END $name: exit $rc after $((SECONDS - t0)) s"
    STATUS+=("$name: exit $rc after $((SECONDS - t0)) s")
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
    [ "$rc" = 0 ]
}

# What this command runs on. Outside TINY mode it stops if torch sees no GPU (the runs would crawl).
environment() {
    [ -n "${ENV_DONE:-}" ] && return 0
    ENV_DONE=1
    log "gpu_run.sh $* | TINY=$TINY EPOCHS=$EPOCHS WIDTH=$WIDTH BUDGET_S=$BUDGET_S" \
        "RUNS_DIR=$RUNS_DIR ARCHIVE=${ARCHIVE:-(none)}"
    log "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "($(git status --short 2>/dev/null | wc -l) changed files); $(nproc --all) cores," \
        "$(free -g 2>/dev/null | awk '/^Mem/ {print $2}') GiB memory"
    command -v nvidia-smi >/dev/null &&
        log "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
    if [ -d .whl ]; then  # wheels carried for packages the image lacks (see the header)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SCRATCH/site" .whl/*.whl &&
            export PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
        log "installed .whl/: $(ls .whl | tr '\n' ' ')"
    fi
    local torch_info
    torch_info=$("$PY" -c 'import torch; c = torch.cuda.is_available()
name = torch.cuda.get_device_name() if c else "no GPU"
print(torch.__version__, "CUDA", torch.version.cuda, name)' 2>&1)
    log "$("$PY" -V 2>&1), torch $torch_info"
    if [ "$TINY" != 1 ] && [[ $torch_info == *"no GPU"* || $torch_info == *Error* ]]; then
        log "ERROR: torch sees no CUDA GPU: the GPU items would crawl on the CPU. Stopping."
        FAILED=$((FAILED + 1))
        summary
        exit 3
    fi
}

# The data set: the archive named by ARCHIVE, unpacked once into DATA_DIR through a temporary
# folder (a cut-off unpacking is then not taken for a finished one). Tiny: a 150-image subset of
# it, or synthetic data when no ARCHIVE is given.
prepare_data() {
    if [ "$TINY" = 1 ] && [ -z "$ARCHIVE" ]; then
        log "tiny: no ARCHIVE given; training on --dataset synthetic instead"
        DATASET=synthetic
        return 0
    fi
    if [ -d "$DATA_DIR/train" ] && [ -d "$DATA_DIR/test" ]; then
        log "data: $DATA_DIR already unpacked"
        return 0
    fi
    if [ -z "$ARCHIVE" ] || [ ! -f "$ARCHIVE" ]; then
        log "ERROR: ${ARCHIVE:-no ARCHIVE given}${ARCHIVE:+: no such file}: set ARCHIVE to the" \
            "cifar10-jpeg.tar.gz archive (inside the repository on the GPU machine: copy it along; header)"
        STATUS+=("data: ${ARCHIVE:-no ARCHIVE given}${ARCHIVE:+ missing}")
        FAILED=$((FAILED + 1))
        return 1
    fi
    if [ "$TINY" = 1 ]; then
        tiny_archive || return 1
    fi
    local script='rm -rf "$1.part" && mkdir -p "$1.part" && tar -xzf "$2" -C "$1.part" &&
        mv "$1.part" "$1"'
    item unpack 120 bash -c "$script" _ "$DATA_DIR" "$ARCHIVE" || return 1
    log "data: $(find "$DATA_DIR/train" -type f | wc -l) training and" \
        "$(find "$DATA_DIR/test" -type f | wc -l) test images in $DATA_DIR"
}

# Tiny mode: 10 training and 5 test JPEGs per class from ARCHIVE, packed as the full archive is.
tiny_archive() {
    if ! { rm -rf "$WORK/subset" && mkdir -p "$WORK/subset" &&
        tar -xzf "$ARCHIVE" -C "$WORK/subset" --wildcards 'train/*/000[0-9].jpg' \
            'test/*/000[0-4].jpg' &&
        tar -czf "$WORK/cifar10-tiny.tar.gz" -C "$WORK/subset" train test; }; then
        log "ERROR: tiny: no subset could be taken from $ARCHIVE"
        STATUS+=("data: no tiny subset from $ARCHIVE")
        FAILED=$((FAILED + 1))
        return 1
    fi
    log "tiny: $WORK/cifar10-tiny.tar.gz made from $ARCHIVE"
    ARCHIVE=$WORK/cifar10-tiny.tar.gz
}

training() {
    prepare_data || return 1
    local only=() t min_start=30
    [ -n "${RUNS_ONLY:-}" ] && only=(--only "$RUNS_ONLY")
    [ "$TINY" = 1 ] && min_start=1
    t=$(($(left) - 5))
    # The driver stops its run 30 s before the item's timeout: the epoch under way (≤ 8 s), the
    # final evaluation and the bundle fit in that; `timeout` is only the backstop.
    item train "$t" "$PY" tools/gpu_runs.py --dataset "$DATASET" --data-dir "$DATA_DIR" \
        --runs-dir "$RUNS_DIR" --out "$OUT" --epochs "$EPOCHS" --width "$WIDTH" \
        --deadline-s $((t - 30)) --min-start-s "$min_start" ${only[@]+"${only[@]}"} \
        -- ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
}

# The CUDA-only tests: the test functions with a skipif mark whose reason names CUDA (test_xml_ref's
# @CUDA; a parametrize mark whose cases mention cuda does not count). The fallback, should the
# selection find none: the names, `-k "cuda or bf16 or gpu"` (the four @CUDA tests of 2026-11-30,
# and test_a_gpu_index_beyond_the_visible_gpus_is_refused, which runs anywhere).
cuda_tests() {
    "$PY" -c 'import test_xml_ref as t
cuda_only = lambda f: any(m.name == "skipif" and "cuda" in str(m.kwargs.get("reason", "")).lower()
                          for m in getattr(f, "pytestmark", []))
print(" ".join("test_xml_ref.py::" + n for n, f in vars(t).items()
               if n.startswith("test_") and callable(f) and cuda_only(f)))' 2>/dev/null
}

phase1() {
    local tests
    tests=$(cuda_tests)
    log "CUDA-only tests: ${tests:-none found by their mark; selecting by name}"
    if [ -n "$tests" ]; then
        # shellcheck disable=SC2086  # one word per test id
        item pytest_cuda 150 "$PY" -m pytest -q -rs -p no:cacheprovider $tests
    else
        item pytest_cuda 150 "$PY" -m pytest -q -rs -p no:cacheprovider test_xml_ref.py \
            -k "cuda or bf16 or gpu"
    fi
    training
}

phase2() {
    # bench.py continues the rows already in --out: only the missing ones are measured
    cp results/bench.json "$OUT/bench.json" &&
        log "bench: $(grep -c '"loop"' "$OUT/bench.json") rows copied from results/bench.json"
    if [ "$TINY" = 1 ]; then
        log "tiny: the benchmark needs CUDA: skipped; checking only that tools/bench.py imports"
        item bench_import 60 "$PY" -c 'import sys; sys.path.insert(0, "tools"); import bench'
    else
        item bench 240 "$PY" tools/bench.py --out "$OUT"
    fi
    local trial
    for trial in $COMPILE_TRIALS; do  # MODE:PRECISION
        item "compile_$trial" 600 "$PY" tools/compile_trial.py --out "$OUT" --mode "${trial%%:*}" \
            --precision "${trial##*:}" ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"}
    done
}

# The end of every command: the items' statuses, and whether $OUT's files fit what comes back.
summary() {
    local n files s
    files=$(find "$OUT" -type f | sort)
    n=$(printf '%s\n' "$files" | grep -c .)
    log "files in \$OUT: $n (the tool returns at most 8, 16 MiB each, simple names)"
    printf '%s\n' "$files" | while read -r f; do
        [ -n "$f" ] && log "  $(du -h "$f" | cut -f1) ${f#"$OUT"/}"
    done
    ((n > 8)) && log "WARNING: more than 8 files under \$OUT: some will not come back"
    find "$OUT" -mindepth 1 -name '*[^A-Za-z0-9._-]*' | grep -q . && log "WARNING: odd file names"
    find "$OUT" -type f -size +16M | grep -q . && log "WARNING: a file under \$OUT is over 16 MiB"
    for s in ${STATUS[@]+"${STATUS[@]}"}; do log "  item $s"; done
    log "done: $FAILED item(s) failed or skipped, $((SECONDS - START)) s"
}

for phase in "$@"; do
    environment "$@"
    case $phase in
        1) phase1 ;;
        2) phase2 ;;
        train) training ;;
        *) log "unknown phase $phase (1, 2 or train)"; FAILED=$((FAILED + 1)) ;;
    esac
done
summary
exit $((FAILED > 0))
