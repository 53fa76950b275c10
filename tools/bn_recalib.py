"""The independent cross-check of a run's own BatchNorm statistics. Every path of the run's last.pt is
evaluated on the test set three ways: with the shared statistics (the deck's plain BatchNorm), with the
path's own statistics kept during training (xml_ref.OwnBatchNorm, what the run reports under 'own_bn'),
and with each path's statistics re-estimated after training on N batches of its own features
(evaluate_recalibrated below). Own and re-estimated statistics describe the same features and should
agree closely; the shared ones describe the mixture of every up-half feeding a down-half.

    python tools/bn_recalib.py RUN_DIR [RUN_DIR ...] [--batches N] [--device cpu] [--out NAME]

The batches are recalibration_batches with the run's seed + 1, batch size and augmentation (rotation
included); N defaults to 20. The run is evaluated as it was (its layout; bf16 where it trained with
--fast on and a GPU is used here too). Prints a table per run; --out NAME also writes NAME.json and
NAME.md."""
import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402
from tools.interpolate import load_run, own_statistics  # noqa: E402


@torch.no_grad()
def recalibrate_bn(modules, batches):
    """Re-estimate the BatchNorm running statistics of `modules` (one path's parts, applied in
    order) as the plain average over `batches` of the statistics of the features this path itself
    produces. Overwrites the statistics (run it on copies to keep the trained ones); leaves the
    modules in eval mode."""
    bns = [m for mod in modules for m in X.batchnorms(mod)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average instead of an exponential one
    for mod in modules:
        mod.train()
    for x in batches:
        for mod in modules:
            x = mod(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    for mod in modules:
        mod.eval()


def recalibration_batches(train_x, n, batch_size, seed, mean, std, rotate=0, fmt=torch.channels_last):
    """n augmented (rotate: as augment), normalised training batches drawn with a generator of
    train_x's device seeded with `seed`: the same batches every call, on the same kind of device."""
    dev = train_x.device
    g = torch.Generator(dev).manual_seed(seed)
    return [X.normalize(X.augment(train_x[torch.randint(len(train_x), (batch_size,), device=dev,
                                                        generator=g)], generator=g, rotate=rotate),
                        mean, std, fmt)  # fmt: the nets' layout (load_run)
            for _ in range(n)]


def evaluate_recalibrated(parts, images, labels, mean, std, batches, batch_size=500, fast=False,
                          classes=None, stitches=None):
    """evaluate(), with each path's BatchNorm statistics re-estimated on its own features (on copies
    of its parts, so the trained statistics stay untouched); fast: in bf16 autocast, as evaluate."""
    K, P = len(parts), len(parts[0])
    dev = next(parts[0][0].parameters()).device
    acc = {}
    for path in X.all_paths(K, P):
        copies = [copy.deepcopy(m) for k in range(1, P + 1)
                  for m in X.prefix_modules(parts, path[:k], stitches)]
        with torch.autocast(dev.type, torch.bfloat16, enabled=fast):
            recalibrate_bn(copies, batches)
        # the copies form a one-net model whose only path is this one
        acc[path] = X.evaluate([copies], images, labels, mean, std, batch_size, fast,
                               classes)['accuracy'][0]
    return X.path_table(acc, K, P)


def study(run_dir, n_batches=20, device=None):
    """{'trained': each path's top-1 with shared statistics, 'own': with its own statistics kept in
    training, 'recalibrated': with statistics re-estimated on its own features, …}."""
    cfg, ckpt, data, mean, std, parts, stitches, dev, fast = load_run(run_dir, device)
    own_bn = own_statistics(run_dir, ckpt, parts, stitches)
    test_x, test_y = data.test_x.to(dev), data.test_y.to(dev)
    result = X.evaluate(parts, test_x, test_y, mean, std, fast=fast, classes=data.num_classes,
                        own_bn=own_bn, stitches=stitches)
    trained, own = result['paths'], result['own_bn']['paths']
    reported = [h for h in ckpt['history'] if 'own_bn' in h][-1]  # the last evaluated epoch
    if any(abs(trained[p] - reported['paths'][p]) > 0.5 or
           abs(own[p] - reported['own_bn']['paths'][p]) > 0.5 for p in trained):
        print(f'{run_dir}: evaluated here {trained}, own {own}, but the run reported '
              f'{reported["paths"]}, own {reported["own_bn"]["paths"]} (another device or '
              'precision?)', file=sys.stderr)
    batches = recalibration_batches(data.train_x.to(dev), n_batches, cfg.batch_size, cfg.seed + 1,
                                    mean, std, cfg.rotate, X.layout(parts[0][0]))
    recalibrated = evaluate_recalibrated(parts, test_x, test_y, mean, std, batches, fast=fast,
                                         classes=data.num_classes, stitches=stitches)['paths']
    return {'run': str(run_dir), 'method': cfg.method, 'nets': cfg.nets, 'cuts': cfg.net_cuts,
            'path_weights': cfg.path_weights, 'warmup_epochs': cfg.warmup_epochs,
            'epoch': ckpt['epoch'], 'batches': n_batches, 'trained': trained, 'own': own,
            'fallback': result['own_bn']['fallback'], 'recalibrated': recalibrated,
            'device': X.device_name(dev), 'fast': fast, 'torch': torch.__version__,
            'date': time.strftime('%Y-%m-%d')}


def label(r):
    """What the run was: method, pair, the settings that set it apart, epoch."""
    extra = [f'{r["path_weights"]} over paths'] if r['method'].startswith('xml') else []
    extra += [f'warm-up {r["warmup_epochs"]}'] if r['warmup_epochs'] != 1 else []
    return f'{r["method"]} {",".join(r["nets"])}{"".join(", " + e for e in extra)}, epoch {r["epoch"]}'


FELL = ' (shared)'


def markdown(results, command):
    """The tables of `results` (study()'s dicts) as markdown, with the command that made them."""
    lines = ['# Top-1 (%) of every path: shared, own and re-estimated BatchNorm statistics', '',
             f'`{command}` on {results[0]["device"]}, torch {results[0]["torch"]}, {results[0]["date"]}; '
             f'path a-b: up-half of net a, then down-half of net b; "{FELL.strip()}": training never ran the '
             'path, so it has no own statistics (shared ones used).', '']
    for r in results:
        lines += [f'## {r["run"]}: {label(r)}, {r["batches"]} batches', '',
                  '| path | shared | own | re-estimated | re-estimated − own |', '|---|---|---|---|---|']
        lines += [f'| {path} | {acc:.2f} | {r["own"][path]:.2f}{FELL if path in r["fallback"] else ""} | '
                  f'{r["recalibrated"][path]:.2f} | {r["recalibrated"][path] - r["own"][path]:+.2f} |'
                  for path, acc in r['trained'].items()]
        lines.append('')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dirs', nargs='+', help='--out folders of training runs (their last.pt is used)')
    p.add_argument('--batches', type=int, default=20, help='training batches to re-estimate on')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda if present)')
    p.add_argument('--out', metavar='NAME', help='also write NAME.json and NAME.md')
    args = p.parse_args(argv)
    command = 'python tools/bn_recalib.py ' + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.batches < 1:
            raise X.UsageError(f'--batches must be at least 1, got {args.batches}')
        device = args.device or X.default_device()
        X.check_device(device)  # a one-line error for a device that is not there
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise X.UsageError(f'--out {args.out}: {Path(args.out).parent} is not a directory')
        results = []
        for run_dir in args.run_dirs:
            r = study(run_dir, args.batches, device)
            results.append(r)
            print(f'{r["run"]} ({label(r)}, {r["batches"]} batches)\n'
                  'path    shared     own  re-estimated  re-estimated − own')
            for path, acc in r['trained'].items():
                new, own = r['recalibrated'][path], r['own'][path]
                print(f'{path:<6} {acc:7.2f} {own:7.2f}{"*" if path in r["fallback"] else " "} '
                      f'{new:12.2f}  {new - own:+6.2f}', flush=True)
    except X.UsageError as e:
        print(f'bn_recalib.py: error: {e}', file=sys.stderr)
        return 2
    if args.out:
        X.write_json(Path(args.out + '.json'), results)
        X.write_atomic(Path(args.out + '.md'), lambda f: f.write(markdown(results, command).encode()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
