"""Does a finished run lose accuracy to its BatchNorm running statistics? Every path of the run's last.pt is
evaluated twice on the test set: with the statistics as trained (what the run reports) and with each path's
statistics re-estimated on its own features (xml_ref.evaluate_recalibrated, the same as --bn-recalib N during
training). Under XML each down-half normalises features from both up-halves, so its running statistics
describe a mixture of the two; if that is what costs accuracy, re-estimating them per path recovers it.

    python tools/bn_recalib.py RUN_DIR [RUN_DIR ...] [--batches 20] [--device cpu] [--out NAME]

Prints a table per run and, with --out, writes NAME.json (the numbers) and NAME.md (the tables). Recalibration batches: --batches
augmented training batches of the run's batch size, drawn with seed (run seed + 1) as --bn-recalib does."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402


def study(run_dir, n_batches, device):
    """{'trained': evaluate()'s path table, 'recalibrated': the same with per-path BN statistics}."""
    run_dir = Path(run_dir)
    if not (run_dir / 'last.pt').exists():
        raise X.UsageError(f'{run_dir}: no last.pt there; give the --out directory of a training run')
    ckpt = X.load_checkpoint(run_dir / 'last.pt')
    cfg = argparse.Namespace(**ckpt['config'])
    data = X.load_data(cfg.dataset, cfg.data_dir)
    mean, std = X.channel_stats(data.train_x)
    models = X.build_nets(cfg, data.num_classes)
    for m, state in zip(models, ckpt['nets']):
        m.load_state_dict(state)
        m.to(device)
    parts = [X.split_parts(m, cfg.cuts) for m in models]
    test_x, test_y, train_x = data.test_x.to(device), data.test_y.to(device), data.train_x.to(device)
    trained = X.evaluate(parts, test_x, test_y, mean, std, classes=data.num_classes)
    g = torch.Generator(device).manual_seed(cfg.seed + 1)
    batches = [X.normalize(X.augment(train_x[torch.randint(len(train_x), (cfg.batch_size,), device=device,
                                                           generator=g)], generator=g), mean, std)
               for _ in range(n_batches)]
    recalibrated = X.evaluate_recalibrated(parts, test_x, test_y, mean, std, batches,
                                           classes=data.num_classes)
    return {'run': str(run_dir), 'method': cfg.method, 'nets': cfg.nets, 'cuts': cfg.cuts,
            'epoch': ckpt['epoch'], 'batches': n_batches, 'trained': trained['paths'],
            'recalibrated': recalibrated['paths'], 'device': X.device_name(device),
            'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d')}


def markdown(results, command):
    """The tables of `results` (study()'s dicts) as markdown, with the command that made them."""
    lines = ['# Top-1 (%) of every path, BatchNorm statistics as trained and re-estimated per path', '',
             f'`{command}` on {results[0]["device"]}, torch {results[0]["torch"]}, {results[0]["date"]}; '
             'path a-b: up-half of net a, then down-half of net b.', '']
    for r in results:
        lines += [f'## {r["run"]}: {r["method"]} {",".join(r["nets"])}, epoch {r["epoch"]}, '
                  f'{r["batches"]} batches', '', '| path | as trained | re-estimated | change |',
                  '|---|---|---|---|']
        lines += [f'| {path} | {acc:.2f} | {r["recalibrated"][path]:.2f} | '
                  f'{r["recalibrated"][path] - acc:+.2f} |' for path, acc in r['trained'].items()]
        lines.append('')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dirs', nargs='+', help='--out folders of training runs (their last.pt is used)')
    p.add_argument('--batches', type=int, default=20, help='training batches to re-estimate the statistics on')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--out', metavar='NAME', help='also write NAME.json and NAME.md')
    args = p.parse_args(argv)
    try:
        if args.batches < 1:
            raise X.UsageError(f'--batches must be at least 1, got {args.batches}')
        results = []
        for run_dir in args.run_dirs:
            r = study(run_dir, args.batches, torch.device(args.device))
            results.append(r)
            print(f'{r["run"]} ({r["method"]} {",".join(r["nets"])}, epoch {r["epoch"]}, '
                  f'{r["batches"]} batches)\npath   trained  recalibrated  change')
            for path, acc in r['trained'].items():
                new = r['recalibrated'][path]
                print(f'{path:<6} {acc:7.2f}  {new:12.2f}  {new - acc:+6.2f}', flush=True)
    except X.UsageError as e:
        print(f'bn_recalib.py: error: {e}', file=sys.stderr)
        return 2
    if args.out:
        command = 'python tools/bn_recalib.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
        X.write_json(Path(args.out + '.json'), results)
        Path(args.out + '.md').write_text(markdown(results, command))
    return 0


if __name__ == '__main__':
    sys.exit(main())
