"""Where XML's gradient comes from, at initialisation: for each half of each net, the norm of the gradient that
each path term of its net's loss L_i sends it (CE(z_p) + KL(z_jj‖z_p), net i's parameters only, as train_step
routes it), averaged over a few augmented training batches. Writes results/grad_norms.md.

    python tools/grad_norms.py DATA_DIR [--width 64] [--batches 4] [--seeds 0,1]

DATA_DIR: an ImageFolder root (train/<class>/...), e.g. a CIFAR-10 JPEG archive extracted."""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402

PAIRS = {'res18,mbv1': 'layer3', 'res18,res34': 'layer2'}


def grad_norm(loss, module):
    """‖∂loss/∂θ‖ over all of module's parameters (the graph is kept for the next term)."""
    grads = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads]).norm().item()


def term_grad_norms(parts, x, y, T=1.0):
    """{(net, half, path): ‖∂ term_p / ∂ θ_half‖}, the term of L_net on path p, for every half it reaches."""
    out = X.run_paths(parts, x, X.all_paths(2, 2))
    norms = {}
    for i in range(2):
        target = out[(1 - i, 1 - i)]
        for path in [(i, i), (i, 1 - i), (1 - i, i)]:  # the paths that hold a half of net i
            term = X.dml_loss(out[path], [target], y, T)
            for k in range(2):
                if path[k] == i:
                    norms[(i, k, path)] = grad_norm(term, parts[i][k])
    return norms


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('data_dir')
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--batches', type=int, default=4)
    p.add_argument('--seeds', default='0,1')
    p.add_argument('--out', default=str(Path(__file__).resolve().parent.parent / 'results' / 'grad_norms.md'))
    a = p.parse_args(argv)
    data = X.load_folder(a.data_dir)
    mean, std = X.channel_stats(data.train_x)
    g = torch.Generator().manual_seed(0)
    batches = [(X.normalize(X.augment(data.train_x[idx], generator=g), mean, std), data.train_y[idx])
               for idx in torch.randint(len(data.train_x), (a.batches, 128), generator=g)]
    seeds = [int(s) for s in a.seeds.split(',')]
    lines = [f'# Gradient of each path term, per half, at initialisation\n',
             f'`python tools/grad_norms.py {" ".join(sys.argv[1:] if argv is None else argv)}`; {a.batches} augmented training batches of 128 '
             f'real CIFAR-10 images (`--dataset folder`), init seeds {a.seeds}, width {a.width}, train mode; '
             f'{X.device_name(torch.device("cpu"))}, torch {torch.__version__}, {time.strftime("%Y-%m-%d")}.\n',
             'Each entry is the mean over batches and seeds of ‖∂(CE(z_p) + KL(z_jj‖z_p))/∂θ_half‖, the gradient '
             'that path p\'s term of the net\'s own loss sends to that half. DML uses the pure-path term only; '
             'XML (`sum`) adds the crossed terms; `mean` divides the sum by 3. "xml/dml": the norm of the summed '
             'XML gradient over the DML one.\n']
    for pair, cut in PAIRS.items():
        names = pair.split(',')
        acc, total = {}, {}  # per-term norms; norms of the summed DML and XML gradients (terms are not parallel)
        share = 1 / (len(seeds) * len(batches))
        for seed in seeds:
            torch.manual_seed(seed)
            parts = [X.split_parts(X.build(n, data.num_classes, a.width), [cut]) for n in names]
            for x, y in batches:
                for key, v in term_grad_norms(parts, x, y).items():
                    acc[key] = acc.get(key, 0.0) + v * share
                out = X.run_paths(parts, x, X.all_paths(2, 2))
                for method in ('dml', 'xml'):
                    L = X.LOSSES[method](out, y, 2, 2, [0, 1])
                    for i in range(2):
                        for k in range(2):
                            norm = grad_norm(L[i], parts[i][k]) * share
                            total[(method, i, k)] = total.get((method, i, k), 0.0) + norm
        lines += [f'\n## {pair}, cut after {cut}\n', '| half | own path | crossed path (other half fixed) | '
                  'DML ‖g‖ | XML sum ‖g‖ | xml/dml |', '|---|---|---|---|---|---|']
        for i in range(2):
            for k in range(2):
                own = (i, i)
                crossed = (i, 1 - i) if k == 0 else (1 - i, i)
                half = f'{"up" if k == 0 else "down"}_{i + 1} ({names[i]})'
                path = lambda p: f'z_{p[0] + 1}{p[1] + 1}'
                lines.append(f'| {half} | {path(own)}: {acc[(i, k, own)]:.3f} | {path(crossed)}: '
                             f'{acc[(i, k, crossed)]:.3f} | {total[("dml", i, k)]:.3f} | {total[("xml", i, k)]:.3f} | '
                             f'{total[("xml", i, k)] / total[("dml", i, k)]:.1f}× |')
        print('\n'.join(lines[-6:]), flush=True)
    Path(a.out).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
