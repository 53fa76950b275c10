"""Issue 12's training runs (phase 1 of tools/gpu_run.sh): both pairs × xml, independent, dml and
xml with mean path weights, on CIFAR-10 JPEGs with the deck's recipe, all in ONE Python process.

    python tools/gpu_runs.py --data-dir DIR --runs-dir RUNS --out OUT [--epochs 8] [--width 64]
                             [--deadline-s S] [--only NAME,...] [-- more xml_ref.py arguments]

Why one process: decoding the 60k JPEGs takes about 12 s and xml_ref.load_data is lru_cached, so the
runs share one decode (and cuDNN's benchmark cache). Each run trains into RUNS/<name> through
xml_ref.main([... --resume]): a finished run (summary.json there) is skipped, a stopped one
continues from its last.pt. After each finished run, every path is evaluated once more with its
own BatchNorm statistics (tools/bn_recalib.py, 20 batches, a few seconds on a GPU): the numbers
that say whether XML loses to its down-halves' mixed statistics (README, Results).

Time: at --deadline-s the process sends itself SIGTERM; xml_ref then stops the run in progress after
its epoch's checkpoint (exit status 143), and no further run starts; nor does one with less than
--min-start-s left. After every run, OUT/runs.tar.gz (each run's summary.json and metrics.jsonl, the
layout tools/report.py reads), OUT/runs.json and OUT/runs.md (a status line per run) are rewritten,
so a command cut off by its time limit still brings back every run that ended before.
Exit status: 0 if every run is finished, 1 otherwise."""
import argparse
import gc
import io
import json
import os
import signal
import sys
import tarfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402
from tools.bn_recalib import study  # noqa: E402

PAIRS = ('res18,res34', 'res18,mbv1')
# The most valuable first: XML and its independent baseline on both pairs, then DML (the deck's
# comparison), then METHOD.md §3's open choice, path weights 'mean'. A run cut off is the least needed.
METHODS = (('xml', []), ('independent', []), ('dml', []), ('xml-mean', ['--path-weights', 'mean']))
STOP = {'signal': 0}  # set by a SIGTERM/SIGINT that reaches this driver's handler
RUN = {'active': False}  # inside xml_ref.main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-dir', required=True, help='ImageFolder root: train/<c>/, test/<c>/')
    p.add_argument('--dataset', default='folder', help='xml_ref --dataset (synthetic: a tiny test)')
    p.add_argument('--runs-dir', required=True, help='where the run folders (checkpoints too) go')
    p.add_argument('--out', required=True, help='where runs.tar.gz, runs.json and runs.md go')
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--deadline-s', type=float, default=float('inf'), help='when to stop, from now')
    p.add_argument('--min-start-s', type=float, default=30, help='start no run with less time left')
    p.add_argument('--only', help='comma-separated run names (default: all 8, in priority order)')
    p.add_argument('extra', nargs='*', help='after --: more xml_ref.py arguments for every run')
    return p.parse_args(argv)


def plan(args):
    """[(name, xml_ref argv)] in priority order."""
    runs = []
    for label, method_args in METHODS:
        for pair in PAIRS:
            name = f'{pair.replace(",", "-")}_{label}_e{args.epochs}_w{args.width}'
            argv = ['--pair', pair, '--method', label.split('-')[0], *method_args,
                    '--dataset', args.dataset, '--data-dir', args.data_dir,
                    '--width', str(args.width), '--epochs', str(args.epochs),
                    '--warmup-epochs', '1', '--seed', '0',
                    '--out', str(Path(args.runs_dir) / name), '--resume', *args.extra]
            runs.append((name, argv))
    if args.only:
        wanted = args.only.split(',')
        unknown = sorted(set(wanted) - {n for n, _ in runs})
        if unknown:
            raise SystemExit(f'gpu_runs.py: --only: no run named {", ".join(unknown)}')
        runs = [r for r in runs if r[0] in wanted]
    return runs


def read_run(run_dir):
    """What a run folder holds: its summary (finished runs) and its per-epoch records."""
    summary, metrics = run_dir / 'summary.json', run_dir / 'metrics.jsonl'
    history = metrics.read_text().splitlines() if metrics.exists() else []
    return (json.loads(summary.read_text()) if summary.exists() else None,
            [json.loads(line) for line in history])


def train_one(name, argv, run_dir):
    """One run through xml_ref.main; its status record."""
    rec = {'name': name, 'command': 'python xml_ref.py ' + ' '.join(argv)}
    if (run_dir / 'summary.json').exists():
        return {**rec, 'status': 'done earlier', 'rc': 0, 'seconds': 0.0}
    print(f'=== {name} ===', flush=True)
    t = time.time()
    RUN['active'] = True
    try:
        rc = X.main(argv)
        status = {0: 'done', 1: 'diverged', 2: 'bad input'}.get(rc, 'stopped (resumable)')
    except KeyboardInterrupt:  # a second signal: xml_ref stops at once, losing the epoch under way
        rc, status = 130, 'interrupted (resumable from its last epoch)'
    except Exception:  # a crash (CUDA out of memory, say) ends this run, not the others
        traceback.print_exc()
        rc, status = 1, 'crashed: ' + traceback.format_exc().strip().splitlines()[-1][:300]
    finally:
        RUN['active'] = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {**rec, 'status': status, 'rc': rc, 'seconds': time.time() - t}


def describe(rec, run_dir):
    """The status record with the run's numbers: epochs done, top-1, cross pairings, speed."""
    summary, history = read_run(run_dir)
    rec['epochs_done'] = len(history)
    if history:
        last = history[-1]
        timed = history[1:] or history  # epoch 1 also holds cuDNN's autotuning and the capture
        rec.update(last_epoch=last['epoch'], accuracy=last['accuracy'], ensemble=last['ensemble'],
                   cross=last.get('cross'), feature_distance=last['feature_distance'],
                   img_per_s=sum(h['img_per_s'] for h in timed) / len(timed),
                   epoch_s=sum(h['epoch_s'] for h in history) / len(history),
                   best_accuracy=[max(acc) for acc in zip(*(h['accuracy'] for h in history))])
    if summary:
        rec.update(best_accuracy=summary['best_accuracy'], best_epoch=summary['best_epoch'],
                   wall_s=summary['wall_s'], device=summary['device'], torch=summary['torch'])
    return rec


def recalibrate(run_dir, batches=20):
    """Every path's top-1 as trained and with its own BatchNorm statistics (tools/bn_recalib.py on the
    run's last.pt): under XML a down-half's running statistics mix both up-halves' features."""
    try:
        result = study(run_dir, batches)
    except Exception:  # the runs matter more than this study: note it and go on
        traceback.print_exc()
        return {'recalibrated': None}
    return {'paths_trained': result['trained'], 'recalibrated': result['recalibrated'],
            'recalib_batches': batches}


def bundle(out, runs_dir, names):
    """OUT/runs.tar.gz: <name>/summary.json and <name>/metrics.jsonl of every run that has them;
    written under a temporary name and renamed, so a kill mid-write leaves the previous bundle."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        for name in names:
            for f in ('summary.json', 'metrics.jsonl'):
                if (runs_dir / name / f).exists():
                    tar.add(runs_dir / name / f, arcname=f'{name}/{f}')
    tmp = out / 'runs.tar.gz.tmp'
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out / 'runs.tar.gz')


def row(r, epochs):
    """One runs.md line: the numbers of the last epoch trained, where there is one."""
    acc = lambda xs: ' / '.join(f'{a:.2f}' for a in xs) if xs else '–'
    cells = [r['name'], r['status'], f'{r.get("epochs_done", 0)}/{epochs}']
    if 'ensemble' in r:
        cross = ' \\| '.join(acc(up) for up in r['cross']) if r.get('cross') else '–'
        paths = r.get('recalibrated')
        recalibrated = ' / '.join(f'{k} {v:.2f}' for k, v in paths.items()) if paths else '–'
        cells += [acc(r['accuracy']), acc(r['best_accuracy']), f'{r["ensemble"]:.2f}', cross,
                  recalibrated, f'{r["img_per_s"]:,.0f}', f'{r["epoch_s"]:.1f}']
    else:
        cells += ['–'] * 7
    return '| ' + ' | '.join(cells + [f'{r.get("seconds", 0):.0f}']) + ' |'


def table(records, args, started):
    """runs.md: one line per run."""
    extra = ' '.join(args.extra) or 'none'
    epochs = f'{args.epochs} epoch' + 's' * (args.epochs != 1)
    lines = [f'# Issue 12 training runs ({time.strftime("%Y-%m-%d %H:%M")}, '
             f'{time.time() - started:.0f} s into this command)', '',
             f'{epochs}, width {args.width}, seed 0, warm-up 1 epoch, --dataset '
             f'{args.dataset} {args.data_dir}; extra arguments: {extra}. Top-1 (%): net 1 / net 2; '
             'best: over the epochs trained; cross (last epoch, rows as summary.json\'s): '
             'up1→down1 / up1→down2 \\| up2→down1 / up2→down2; BN re-estimated: every path (a-b: '
             'up a → down b) with its BatchNorm statistics re-estimated on 20 training batches of its '
             'own features (tools/bn_recalib.py); img/s: training, epochs 2+.', '',
             '| run | status | epochs | top-1 last | top-1 best | ensemble | cross | BN re-estimated | '
             'img/s | s/epoch | this command s |', '|---|---|---|---|---|---|---|---|---|---|---|']
    return '\n'.join(lines + [row(r, args.epochs) for r in records]) + '\n'


def write_text(path, text):
    """Write to a temporary name, then rename: a kill mid-write leaves the previous file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def write_status(out, records, args, started):
    write_text(out / 'runs.json', json.dumps(records, indent=1) + '\n')
    write_text(out / 'runs.md', table(records, args, started))


def arm_deadline(seconds):
    """SIGTERM to this process after `seconds`: during a run's epochs xml_ref stops after the
    epoch's checkpoint; elsewhere on_signal takes it."""
    if seconds != float('inf'):
        timer = threading.Timer(max(0.0, seconds), os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()


def on_signal(signum, _):
    """No further run starts; a run still setting up (xml_ref not yet listening) gets the signal
    once its epochs begin, so that it too stops after one epoch rather than running to its end."""
    STOP['signal'] = signum
    print(f'gpu_runs.py: {signal.Signals(signum).name}: no further run starts', file=sys.stderr,
          flush=True)
    if RUN['active']:
        threading.Thread(target=redeliver, args=(signum,), daemon=True).start()


def redeliver(signum):
    """Send `signum` again once a handler other than on_signal (xml_ref's) is installed, unless the
    run ends first."""
    while RUN['active']:
        if signal.getsignal(signum) is not on_signal:
            os.kill(os.getpid(), signum)
            return
        time.sleep(0.1)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    arm_deadline(args.deadline_s)
    runs = plan(args)
    names = [n for n, _ in runs]
    records = [{'name': n, 'command': 'python xml_ref.py ' + ' '.join(a), 'status': 'not started'}
               for n, a in runs]
    for k, (name, argv) in enumerate(runs):
        left = args.deadline_s - (time.time() - started)
        done = (runs_dir / name / 'summary.json').exists()
        if (STOP['signal'] or left < args.min_start_s) and not done:
            records[k]['status'] = f'not started ({left:.0f} s left; resumable: phase train)'
            records[k] = describe(records[k], runs_dir / name)
            continue
        records[k] = describe(train_one(name, argv, runs_dir / name), runs_dir / name)
        r = records[k]
        if r['status'].startswith('done'):
            r.update(recalibrate(runs_dir / name))
        print(f'=== {name}: {r["status"]} (exit {r["rc"]}, {r["seconds"]:.0f} s; '
              f'{time.time() - started:.0f} s into the phase) ===', flush=True)
        bundle(out, runs_dir, names)
        write_status(out, records, args, started)
        if r['rc'] not in (0, 1, 2):  # stopped by a signal: the deadline has come
            STOP['signal'] = STOP['signal'] or signal.SIGTERM
    bundle(out, runs_dir, names)
    write_status(out, records, args, started)
    print(table(records, args, started), flush=True)
    return 0 if all(r['status'].startswith('done') for r in records) else 1


if __name__ == '__main__':
    sys.exit(main())
