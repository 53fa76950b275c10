"""Does a finished run lose accuracy to its BatchNorm running statistics? Every path of the run's last.pt
is evaluated twice on the test set: with the statistics as trained (what the run reports) and with each
path's statistics re-estimated on its own features (xml_ref.evaluate_recalibrated, what --bn-recalib N
does during training). Under XML each down-half normalises the features of both up-halves, so its running
statistics describe their mixture; if that costs accuracy, re-estimating them per path recovers it.

    python tools/bn_recalib.py RUN_DIR [RUN_DIR ...] [--batches N] [--device cpu] [--out NAME]

Study an independent or dml run of the same pair and schedule beside the xml one: their down-halves see
one up-half only, so their change is the baseline (the lag of the running averages, sampling noise).
The batches are xml_ref.recalibration_batches with the run's seed + 1 and batch size, as --bn-recalib
draws them (the same batches where the device type is the run's); N defaults to the run's --bn-recalib,
else 20. The run is evaluated as it was (bf16 and channels_last where it trained with --fast on and a GPU
is used here too). Prints a table per run; --out NAME also writes NAME.json and NAME.md."""
import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402
from tools.interpolate import load_run  # noqa: E402


def study(run_dir, n_batches=None, device=None):
    """{'trained': each path's top-1 as trained, 'recalibrated': with its own BN statistics, …}."""
    cfg, ckpt, data, mean, std, models, dev, fast = load_run(run_dir, device)
    n_batches = n_batches or cfg.bn_recalib or 20
    parts = [X.split_parts(m, cfg.cuts) for m in models]
    test_x, test_y = data.test_x.to(dev), data.test_y.to(dev)
    trained = X.evaluate(parts, test_x, test_y, mean, std, fast=fast, classes=data.num_classes)['paths']
    reported = ckpt['history'][-1]['paths']
    if any(abs(trained[p] - reported[p]) > 0.5 for p in reported):
        print(f'{run_dir}: as trained here {trained} but the run reported {reported} (another device '
              'or precision?)', file=sys.stderr)
    batches = X.recalibration_batches(data.train_x.to(dev), n_batches, cfg.batch_size, cfg.seed + 1,
                                      mean, std, fast)
    recalibrated = X.evaluate_recalibrated(parts, test_x, test_y, mean, std, batches, fast=fast,
                                           classes=data.num_classes)['paths']
    return {'run': str(run_dir), 'method': cfg.method, 'nets': cfg.nets, 'cuts': cfg.cuts,
            'path_weights': cfg.path_weights, 'warmup_epochs': getattr(cfg, 'warmup_epochs', 0),
            'epoch': ckpt['epoch'], 'batches': n_batches, 'trained': trained, 'recalibrated': recalibrated,
            'device': X.device_name(dev), 'fast': fast, 'torch': torch.__version__,
            'date': time.strftime('%Y-%m-%d')}


def label(r):
    """What the run was: method, pair, the settings that set it apart, epoch."""
    extra = [f'{r["path_weights"]} over paths'] if r['method'].startswith('xml') else []
    extra += [f'warm-up {r["warmup_epochs"]}'] if r['warmup_epochs'] != 1 else []
    return f'{r["method"]} {",".join(r["nets"])}{"".join(", " + e for e in extra)}, epoch {r["epoch"]}'


def markdown(results, command):
    """The tables of `results` (study()'s dicts) as markdown, with the command that made them."""
    lines = ['# Top-1 (%) of every path, BatchNorm statistics as trained and re-estimated per path', '',
             f'`{command}` on {results[0]["device"]}, torch {results[0]["torch"]}, {results[0]["date"]}; '
             'path a-b: up-half of net a, then down-half of net b.', '']
    for r in results:
        lines += [f'## {r["run"]}: {label(r)}, {r["batches"]} batches', '',
                  '| path | as trained | re-estimated | change |', '|---|---|---|---|']
        lines += [f'| {path} | {acc:.2f} | {r["recalibrated"][path]:.2f} | '
                  f'{r["recalibrated"][path] - acc:+.2f} |' for path, acc in r['trained'].items()]
        lines.append('')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dirs', nargs='+', help='--out folders of training runs (their last.pt is used)')
    p.add_argument('--batches', type=int,
                   help='training batches to re-estimate on (default: the run\'s --bn-recalib, else 20)')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda if present)')
    p.add_argument('--out', metavar='NAME', help='also write NAME.json and NAME.md')
    args = p.parse_args(argv)
    command = 'python tools/bn_recalib.py ' + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.batches is not None and args.batches < 1:
            raise X.UsageError(f'--batches must be at least 1, got {args.batches}')
        device = argparse.Namespace(device=args.device, fast='auto', sync_bn=False)
        X.check_device(device)  # a one-line error for a device that is not there
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise X.UsageError(f'--out {args.out}: {Path(args.out).parent} is not a directory')
        results = []
        for run_dir in args.run_dirs:
            r = study(run_dir, args.batches, device.device)
            results.append(r)
            print(f'{r["run"]} ({label(r)}, {r["batches"]} batches)\npath   trained  recalibrated  change')
            for path, acc in r['trained'].items():
                new = r['recalibrated'][path]
                print(f'{path:<6} {acc:7.2f}  {new:12.2f}  {new - acc:+6.2f}', flush=True)
    except X.UsageError as e:
        print(f'bn_recalib.py: error: {e}', file=sys.stderr)
        return 2
    if args.out:
        X.write_json(Path(args.out + '.json'), results)
        X.write_atomic(Path(args.out + '.md'), lambda f: f.write(markdown(results, command).encode()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
