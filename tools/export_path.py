"""Ship one path of a finished run as a model of its own: the deck's "Dynamic Computation" made usable
(pick a path from the run's cost table, export it).

    python tools/export_path.py RUN_DIR --path 1-2 --out FILE

Path a-b runs the up-half of net a, then the down-half of net b (with K nets in P parts, P numbers). The
file is a torch.export program: `torch.export.load(FILE).module()` runs it with torch alone, no xml_ref.py.
It takes uint8 images N×H×W×3 (CIFAR's own layout, the size it was trained on) and returns the class
logits: it normalises with the training set's mean and std, then runs the path's parts from the run's
last.pt, whose BatchNorm layers are ordinary ones carrying the path's own statistics (xml_ref.OwnBatchNorm;
the shared statistics where the path has none, which the tool then says). The tool evaluates the
exported file on the test set (fp32, on the CPU) and prints its top-1 beside the run's own number for the
path: equal for a run on the CPU; a run with --fast on computed its number in bf16 on a GPU, so there the
two may differ a little."""
import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402
from tools.interpolate import load_run, own_statistics  # noqa: E402


class PathModel(nn.Module):
    """uint8 images N×H×W×3 → class logits of one path, BatchNorm statistics its own."""

    def __init__(self, parts, mean, std, classes):
        super().__init__()
        self.parts = nn.Sequential(*parts)
        self.register_buffer('mean', torch.tensor(mean))
        self.register_buffer('std', torch.tensor(std))
        self.classes = classes

    def forward(self, images):
        return self.parts(X.normalize(images, self.mean, self.std))[:, :self.classes]


def parse_path(text, K, P):
    """'1-2' → (0, 1), checked against K nets in P parts."""
    try:
        path = tuple(int(a) - 1 for a in text.split('-'))
    except ValueError:
        path = ()
    if len(path) != P or not all(0 <= i < K for i in path):
        raise X.UsageError(f'--path {text}: this run has {K} nets in {P} parts; give {P} net '
                           f'numbers from 1 to {K} joined by "-", e.g. {"-".join(["1"] * P)}')
    return path


def path_model(run_dir, path_text):
    """(PathModel of the path on the CPU, in eval mode; the run's record of its last epoch; the path;
    the data set; whether the path fell back to the shared statistics)."""
    cfg, ckpt, data, mean, std, parts, stitches, _, _ = load_run(run_dir, 'cpu')
    path = parse_path(path_text, len(parts), len(parts[0]))
    own_bn = own_statistics(run_dir, ckpt, parts, stitches)
    copies = []
    for k in range(1, len(path) + 1):
        with own_bn.apply(path[:k]):  # the path's own statistics in the running buffers …
            modules = copy.deepcopy(X.prefix_modules(parts, path[:k], stitches))  # … copied
        for m in (m for module in modules for m in module.modules()):  # OwnBatchNorm's hooks stay
            m._forward_pre_hooks.clear()  # behind: plain layers
        copies += modules
    model = PathModel(copies, mean, std, data.num_classes).eval()
    last = [h for h in ckpt['history'] if 'own_bn' in h][-1]  # the last evaluated epoch (--eval-every)
    return model, last, path, data, own_bn.fallback(path)


@torch.no_grad()
def top1(model, images, labels, batch_size=500):
    """Top-1 (%) of `model` (uint8 images → logits) on the test set, in evaluate()'s batches."""
    right = sum((model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum().item()
                for s in range(0, len(images), batch_size))
    return 100.0 * right / len(images)


def export(run_dir, path_text, out):
    """Write the path's program to `out`; returns {'path', 'top1' (of the file, re-loaded), 'run'
    (the run's own number), 'fallback'}."""
    model, last, path, data, fell = path_model(run_dir, path_text)
    example = data.test_x[:2]
    batch = torch.export.Dim('batch', min=1)
    program = torch.export.export(model, (example,), dynamic_shapes={'images': {0: batch}})
    out = Path(out)
    with warnings.catch_warnings():  # channels_last weights (the run's layout, kept so that the file
        # computes what the run computed) make the saver say it found no contiguous tensor: harmless
        warnings.filterwarnings('ignore', 'No complete tensor found')
        X.write_atomic(out, lambda f: torch.export.save(program, f))
    loaded = torch.export.load(str(out)).module()
    return {'path': X.path_name(path), 'top1': top1(loaded, data.test_x, data.test_y),
            'run': last['own_bn']['paths'][X.path_name(path)], 'fallback': fell}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('run_dir', help='the --out folder of a training run (its last.pt is used)')
    p.add_argument('--path', required=True, help='the path, e.g. 1-2: up-half of net 1, down-half of '
                                                 'net 2')
    p.add_argument('--out', required=True, metavar='FILE', help='where to write the program (.pt2)')
    args = p.parse_args(argv)
    try:
        if not Path(args.out).resolve().parent.is_dir():
            raise X.UsageError(f'--out {args.out}: {Path(args.out).parent} is not a directory')
        if Path(args.out).is_dir():
            raise X.UsageError(f'--out {args.out} is a directory; give a file name, e.g. {args.out}/path.pt2')
        r = export(args.run_dir, args.path, args.out)
    except X.UsageError as e:
        print(f'export_path.py: error: {e}', file=sys.stderr)
        return 2
    note = ' (no own BatchNorm statistics for this path: the shared ones)' if r['fallback'] else ''
    print(f'wrote {args.out}: path {r["path"]}, test top-1 {r["top1"]:.2f} '
          f'(the run: {r["run"]:.2f}){note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
