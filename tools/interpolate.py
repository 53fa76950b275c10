"""The deck's up-half interpolation study (METHOD.md §4) of a finished pair run: interpolation.csv, and
interpolation.png where matplotlib is installed, written into the run's folder.

    python tools/interpolate.py RUN_DIR [--device cpu]

Top-1 of each down-half fed h(a) = a·up_1(x) + (1−a)·up_2(x) for a = −1.0, −0.9, …, 2.0
(interpolation() below), from the run's last.pt, on the test set it was evaluated on; a = 1 and a = 0
give the run's own cross matrix (the run is evaluated as it was: bf16 when it trained with --fast on
and a GPU is used here too)."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402


ALPHAS = [round(-1 + 0.1 * k, 1) for k in range(31)]  # −1.0, −0.9, …, 2.0


@torch.no_grad()
def interpolation(parts, images, labels, mean, std, alphas, batch_size=500, fast=False,
                  classes=None):
    """The deck's up-half study: top-1 (%) of each down-half b fed
    h(a) = a·up_1(x) + (1−a)·up_2(x), for each a in alphas; a = 1 gives the cross pairings of
    up_1, a = 0 those of up_2. Returns [{'alpha': a, 'down1': …, 'down2': …}, …]."""
    dev = next(parts[0][0].parameters()).device
    correct = torch.zeros(len(alphas), 2, device=dev, dtype=torch.int64)
    with X.eval_mode([part for net in parts for part in net]), \
            torch.autocast(dev.type, torch.bfloat16, enabled=fast):
        for x, y in X.eval_batches(images, labels, mean, std, batch_size, dev, X.layout(parts[0][0])):
            f1, f2 = parts[0][0](x), parts[1][0](x)
            for k, a in enumerate(alphas):
                h = a * f1 + (1 - a) * f2
                correct[k] += torch.stack([(parts[b][1](h)[:, :classes].argmax(1) == y).sum()
                                           for b in range(2)])
    return [{'alpha': a, 'down1': 100.0 * c[0] / len(images), 'down2': 100.0 * c[1] / len(images)}
            for a, c in zip(alphas, correct.tolist())]


def own_statistics(run_dir, ckpt, parts, stitches):
    """The run's per-path BatchNorm statistics (X.OwnBatchNorm) loaded into these parts; a UsageError
    where their layout is another (a checkpoint of older code)."""
    own_bn = X.OwnBatchNorm(parts, stitches)
    try:
        own_bn.load_state_dict(ckpt['own_bn'])
    except (KeyError, ValueError) as e:
        raise X.UsageError(f'{run_dir}/last.pt: {X.first_line(e, 200)}; use the xml_ref.py that wrote it') from None
    return own_bn


def load_run(run_dir, device=None, pair_only=False):
    """A run's last.pt ready to evaluate as the run did (its layout, X.conv_layout; bf16 where it trained with
    --fast on and `device` is a GPU): (config, checkpoint, data, mean, std, parts, stitches, device,
    fast)."""
    run_dir = Path(run_dir)
    if not (run_dir / 'last.pt').exists():
        raise X.UsageError(f'{run_dir}: no last.pt there; give the --out directory of a training run')
    ckpt = X.load_checkpoint(run_dir / 'last.pt')
    if 'own_bn' not in ckpt:
        raise X.UsageError(f'{run_dir}/last.pt predates the per-path BatchNorm statistics; use the '
                           'xml_ref.py that wrote it')
    cfg = argparse.Namespace(**{**ckpt['config'], 'net_cuts': X.net_cuts_of(ckpt['config'])})
    if pair_only and (len(cfg.nets) != 2 or len(cfg.net_cuts[0]) != 1 or ckpt.get('stitches')):
        raise X.UsageError(f'{run_dir}: the study is defined for a pair cut once where the features '
                           f'have one shape, not {cfg.nets} cut at {cfg.net_cuts}')
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    fast = dev.type == 'cuda' and cfg.fast == 'on'
    data = X.load_data(cfg.dataset, cfg.data_dir)
    if getattr(cfg, 'train_per_class', None):  # the training images the run used, as set_up takes them
        data = X.first_per_class(data, cfg.train_per_class)
    mean, std = X.channel_stats(data.train_x)
    models = X.build_nets(cfg, data.num_classes)
    fmt = X.conv_layout(models, dev)  # as set_up trains them
    for m, state in zip(models, ckpt['nets']):
        m.load_state_dict(state)
        m.to(dev, memory_format=fmt)
    parts = [X.split_parts(m, cuts) for m, cuts in zip(models, cfg.net_cuts)]
    stitches = X.make_stitches(X.feature_shapes(parts, data.train_x.shape[1]), cfg.nets)
    stitches.load_state_dict(ckpt.get('stitches', {}))
    stitches.to(dev, memory_format=fmt)
    torch.backends.cudnn.benchmark = fast
    return cfg, ckpt, data, mean, std, parts, stitches, dev, fast


def interpolate_run(run_dir, device=None):
    """interpolation.csv (and .png) in run_dir from its last.pt; returns the rows."""
    run_dir = Path(run_dir)
    cfg, ckpt, data, mean, std, parts, _, dev, fast = load_run(run_dir, device, pair_only=True)
    rows = interpolation(parts, data.test_x.to(dev),
                         data.test_y.to(dev), mean, std, ALPHAS, fast=fast,
                           classes=data.num_classes)
    csv = 'alpha,down1,down2\n' + ''.join(f'{r["alpha"]:.1f},{r["down1"]:.2f},{r["down2"]:.2f}\n'
                                          for r in rows)
    X.write_atomic(run_dir / 'interpolation.csv', lambda f: f.write(csv.encode()))
    try:  # the plot is an optional extra
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: wrote interpolation.csv only', file=sys.stderr)
        return rows
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b in (1, 2):
        ax.plot([r['alpha'] for r in rows], [r[f'down{b}'] for r in rows], marker='.',
                label=f'down-half of net {b} ({cfg.nets[b - 1]})')
    ax.axvline(0, color='grey', lw=0.5)
    ax.axvline(1, color='grey', lw=0.5)
    ax.set(xlabel=f'a   (h = a·up_1(x) + (1−a)·up_2(x); up_1: {cfg.nets[0]}, up_2: {cfg.nets[1]})',
           ylabel='test top-1 (%)', title=f'{cfg.method} {",".join(cfg.nets)}, epoch {ckpt["epoch"]}')
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / 'interpolation.png', dpi=120)
    plt.close(fig)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dir', help='the --out folder of a finished (or stopped) pair run')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda if present)')
    args = p.parse_args(argv)
    try:
        device = args.device or X.default_device()
        X.check_device(device)  # a one-line error for a device that is not there
        interpolate_run(args.run_dir, device)
    except X.UsageError as e:
        print(f'interpolate.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
