"""The GPU evidence runs (phase 1 of tools/gpu_run.sh): both pairs (res18,res34 and res18,mbv1)
× xml, independent and dml, seed 0, on CIFAR-10 JPEGs with the deck's full recipe (xml_ref.py's
defaults: SGD 0.1, 1 warm-up epoch, lr × 0.2 at 30/60/80 % of the epochs, crop, flip and rotation
by up to ±15°, --rotate's default), all in ONE Python process. Six runs in all.

    python tools/gpu_runs.py --data-dir DIR --runs-dir RUNS --out OUT [--epochs 8] [--width 64]
                             [--deadline-s S] [--only NAME,...] [-- more xml_ref.py arguments]

Why one process: decoding the 60k JPEGs takes about 12 s and xml_ref.load_data is lru_cached, so the
runs share one decode (and cuDNN's benchmark cache). Each run trains into RUNS/<name> through
xml_ref.main([... --resume]): a finished run (summary.json there) is skipped, a stopped one
continues from its last.pt. Every run evaluates every path each epoch twice, with the shared
BatchNorm statistics and with the path's own (xml_ref's 'own_bn', kept during training): both are
reported here, top-1 of each net and the cross matrix, the numbers that say whether XML loses to
its down-halves' mixed statistics (README, Results). (tools/bn_recalib.py's re-estimation, the
independent check of the own statistics, is not run here: it would only cost GPU time.)

Time: at --deadline-s the process sends itself SIGTERM; xml_ref then stops the run in progress after
its epoch's checkpoint (exit status 143), and no further run starts; nor does one with less than
--min-start-s left. After every run, OUT/runs.tar.gz (each run's summary.json and metrics.jsonl, the
layout tools/report.py reads), OUT/runs.json and OUT/runs.md (a status line per run) are rewritten,
so a command cut off by its time limit still brings back every run that ended before.
Exit status: 0 if every run is finished, 1 otherwise.

Only the three nets xml_ref.py builds itself are used (the deck's); torchvision nets ('tv:') work
with xml_ref.py but are not part of this evidence."""
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

PAIRS = ('res18,res34', 'res18,mbv1')
# The most valuable first: XML and its independent baseline on both pairs, then DML (the deck's
# comparison). A run cut off is the least needed.
METHODS = (('xml', []), ('independent', []), ('dml', []))
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
    p.add_argument('--only', help='comma-separated run names (default: all 6, in priority order)')
    p.add_argument('extra', nargs='*', help='after --: more xml_ref.py arguments for every run')
    return p.parse_args(argv)


def plan(args):
    """[(name, xml_ref argv)] in priority order. The recipe is xml_ref.py's default (rotation
    included); arguments after -- are added to every run."""
    runs = []
    for label, method_args in METHODS:
        for pair in PAIRS:
            name = f'{pair.replace(",", "-")}_{label}_e{args.epochs}_w{args.width}'
            argv = ['--pair', pair, '--method', label, *method_args,
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


def first_record(name, argv):
    """A run's record before it has numbers: its name, command and rotation (degrees; what xml_ref
    makes of argv, its default unless the arguments after -- set --rotate)."""
    return {'name': name, 'command': 'python xml_ref.py ' + ' '.join(argv),
            'rotate': X.make_parser().parse_args(argv).rotate, 'status': 'not started'}


def train_one(name, argv, run_dir):
    """One run through xml_ref.main; its status record."""
    rec = first_record(name, argv)
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


def best(history, block):
    """Each net's best top-1 over the epochs of `history` and the first epoch that reached it, read
    from block(record): the record itself (shared statistics) or its 'own_bn' block."""
    accs = [block(h)['accuracy'] for h in history]
    first = [max(range(len(accs)), key=lambda e: (accs[e][i], -e)) for i in range(len(accs[0]))]
    return {'best_accuracy': [accs[e][i] for i, e in enumerate(first)],
            'best_epoch': [history[e]['epoch'] for e in first]}


def describe(rec, run_dir):
    """The status record with the run's numbers: epochs done; top-1 of each net, the cross
    pairings, the ensemble and the best top-1, with the shared BatchNorm statistics (at the top
    level) and with each path's own (under 'own_bn', whose 'fallback' names the paths training
    never ran, evaluated with the shared statistics); speed."""
    summary, history = read_run(run_dir)
    rec['epochs_done'] = len(history)
    every, timed = history, history[1:] or history  # epoch 1 also holds cuDNN's autotuning
    history = [h for h in history if 'accuracy' in h]  # the evaluated epochs (--eval-every)
    if history:
        last = history[-1]
        rec.update(last_epoch=last['epoch'], accuracy=last['accuracy'], cross=last.get('cross'),
                   ensemble=last['ensemble'], feature_distance=last['feature_distance'],
                   **best(history, lambda h: h),
                   img_per_s=sum(h['img_per_s'] for h in timed) / len(timed),
                   epoch_s=sum(h['epoch_s'] for h in every) / len(every))
        if 'own_bn' in last:
            own = last['own_bn']
            rec['own_bn'] = {'accuracy': own['accuracy'], 'cross': own.get('cross'),
                             'ensemble': own['ensemble'],
                             'feature_distance': own['feature_distance'],
                             'fallback': own['fallback'], **best(history, lambda h: h['own_bn'])}
    if summary:
        rec.update(best_accuracy=summary['best_accuracy'], best_epoch=summary['best_epoch'],
                   rotate=summary['rotate'], wall_s=summary['wall_s'], device=summary['device'],
                   torch=summary['torch'])
        if 'own_bn' in rec:
            rec['own_bn'].update(best_accuracy=summary['own_bn']['best_accuracy'],
                                 best_epoch=summary['own_bn']['best_epoch'])
    return rec


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
    """One runs.md line: the numbers of the last epoch trained, where there is one, with the shared
    BatchNorm statistics and with each path's own; * marks a path with no own statistics."""
    acc = lambda xs: ' / '.join(f'{a:.2f}' for a in xs) if xs else '–'
    best_of = lambda b: ' / '.join(f'{a:.2f} (e{e})' for a, e in zip(b['best_accuracy'],
                                                                      b['best_epoch']))

    def cross(m, fallback=()):
        if not m:
            return '–'
        return ' \\| '.join(' / '.join(f'{v:.2f}' + '*' * (f'{a + 1}-{b + 1}' in fallback)
                                        for b, v in enumerate(up)) for a, up in enumerate(m))
    cells = [r['name'], r['status'], f'{r.get("epochs_done", 0)}/{epochs}']
    own = r.get('own_bn')
    if 'ensemble' in r and own:
        cells += [acc(r['accuracy']), acc(own['accuracy']), best_of(r), best_of(own),
                  f'{r["ensemble"]:.2f} / {own["ensemble"]:.2f}', cross(r.get('cross')),
                  cross(own.get('cross'), own['fallback']), f'{r["img_per_s"]:,.0f}',
                  f'{r["epoch_s"]:.1f}']
    elif 'ensemble' in r:  # (a run of an older xml_ref.py: no own statistics)
        cells += [acc(r['accuracy']), '–', best_of(r), '–', f'{r["ensemble"]:.2f}',
                  cross(r.get('cross')), '–', f'{r["img_per_s"]:,.0f}', f'{r["epoch_s"]:.1f}']
    else:
        cells += ['–'] * 9
    return '| ' + ' | '.join(cells + [f'{r.get("seconds", 0):.0f}']) + ' |'


def table(records, args, started):
    """runs.md: one line per run."""
    extra = ' '.join(args.extra) or 'none'
    epochs = f'{args.epochs} epoch' + 's' * (args.epochs != 1)
    rotations = ', '.join(sorted({f'±{r["rotate"]:g}°' for r in records if 'rotate' in r}))
    lines = [f'# GPU evidence runs ({time.strftime("%Y-%m-%d %H:%M")}, '
             f'{time.time() - started:.0f} s into this command)', '',
             f'{epochs}, width {args.width}, seed 0, the full recipe (xml_ref.py\'s defaults: '
             f'warm-up 1 epoch, crop, flip, rotation {rotations or "?"}), --dataset '
             f'{args.dataset} {args.data_dir}; extra arguments: {extra}. Top-1 (%), net 1 / net 2, '
             'of the last epoch trained, with the shared BatchNorm statistics and with each '
             'path\'s own kept during training (own_bn); best: over the epochs trained (epoch); '
             'ensemble: the pure nets\' mean softmax; cross (last epoch, rows as summary.json\'s): '
             'up1→down1 / up1→down2 \\| up2→down1 / up2→down2; *: a path training never '
             'ran, so with no own statistics (the shared ones stand in); img/s: training, '
             'epochs 2+.',
             '',
             '| run | status | epochs | top-1 shared | top-1 own | best shared | best own | '
             'ensemble shared / own | cross shared | cross own | img/s | s/epoch | '
             'this command s |', '|' + '---|' * 13]
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
    records = [first_record(n, a) for n, a in runs]
    for k, (name, argv) in enumerate(runs):
        left = args.deadline_s - (time.time() - started)
        done = (runs_dir / name / 'summary.json').exists()
        if (STOP['signal'] or left < args.min_start_s) and not done:
            records[k]['status'] = f'not started ({left:.0f} s left; resumable: phase train)'
            records[k] = describe(records[k], runs_dir / name)
            continue
        records[k] = describe(train_one(name, argv, runs_dir / name), runs_dir / name)
        r = records[k]
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
