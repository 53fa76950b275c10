"""The deck's explanation, measured (issue 40): how sharp, how input-sensitive and how alike are a run's nets.
For each net of a finished run (its pure path from the run's last.pt, with the path's own BatchNorm statistics,
xml_ref.OwnBatchNorm, as tools/export_path.py ships it; in eval mode, so the loss is a deterministic function of
the weights), on a fixed set of N training batches (the run's training images, --train-per-class included, in
its batch size, drawn with --seed, without augmentation, normalised as in training):

1. sharpness: the largest eigenvalue of the Hessian of the training cross-entropy with respect to all the net's
   parameters, by power iteration on Hessian-vector products (double backward; top_eigenvalue below), stopped
   when the eigenvalue changes by less than --tol of itself from one iteration to the next, or after --max-iter
   iterations; the iterations it took are reported, and whether the rule stopped it (where the eigenvalue of
   largest magnitude is negative, a second power iteration, on the Hessian shifted by it, finds the largest);
2. average-case flatness: the mean increase of the training cross-entropy along --draws random filter-normalised
   directions d (Li et al. 2018: each filter's direction scaled to that filter's norm; BatchNorm parameters,
   biases and every other 1-d parameter not moved), each draw taken both ways, (L(θ + a·d) + L(θ − a·d))/2 −
   L(θ), at steps a = 0.05, 0.1 and 0.2, with its standard error over the draws;
3. input sensitivity: the mean over the first --test-images test images of the Frobenius norm of the Jacobian
   of the softmax with respect to the (normalised) input image, estimated with --projections random output
   projections per image: E‖vᵀJ‖² = ‖J‖_F² for v ~ N(0, I), one vector-Jacobian product each;
4. agreement, for every two nets, on the whole test set: the share of images on which their top-1 agree and the
   mean symmetric KL, KL(p_a‖p_b) + KL(p_b‖p_a), of their softmax; beside it the ensemble's gain over the
   better net, from the run's own numbers (summary.json's own_bn block).

    python tools/flatness.py RUN_DIR [--batches N] [--seed S] [--device D] [--out FILE]
                             [--max-iter 100] [--tol 1e-3] [--draws 10] [--projections 10] [--test-images 1000]
    python tools/flatness.py --collect FOLDER [--out FILE.md]   # the tables of FOLDER/*/flatness.json

Writes FILE (default RUN_DIR/flatness.json) and prints a table. All in fp32 (on a GPU with TF32 off; a run
trained with --fast on, in bf16, is measured in fp32 too, so its test top-1 here may differ a little from the
run's, which the tool then says)."""
import argparse
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402
from tools.export_path import path_model  # noqa: E402
from tools.interpolate import load_run  # noqa: E402
from tools import report  # noqa: E402

STEPS = (0.05, 0.1, 0.2)
RULE = ('power iteration on Hessian-vector products from a N(0, I) start, stopped when |λ_k − λ_(k−1)| < '
        'tol·|λ_k| or after max_iter iterations (λ_k = v_kᵀHv_k, v_k of norm 1); where the λ of largest magnitude '
        'so found, λ₁, is negative, once more on H − λ₁I (shift λ₁, iterations added)')


class Logits(nn.Module):
    """Normalised images → class logits of one path (its parts in order; the first `classes` outputs)."""

    def __init__(self, parts, classes):
        super().__init__()
        self.parts, self.classes = parts, classes

    def forward(self, x):
        return self.parts(x)[:, :self.classes]


def generator(seed, stream):
    """A CPU generator of its own for each random quantity (the same draws on any device and for any
    other option)."""
    return torch.Generator().manual_seed(4 * seed + stream)


def fixed_batches(train_x, train_y, n, batch_size, seed, mean, std, device, fmt=torch.contiguous_format):
    """n batches of distinct training images, drawn with `seed`, unaugmented, normalised as in training."""
    if n * batch_size > len(train_x):
        raise X.UsageError(f'--batches {n}: {n} batches of {batch_size} need {n * batch_size} training images, '
                           f'the run has {len(train_x)}; give at most {len(train_x) // batch_size}')
    idx = torch.randperm(len(train_x), generator=generator(seed, 0))[:n * batch_size].view(n, batch_size)
    return [(X.normalize(train_x[i].to(device), mean, std, fmt), train_y[i].to(device)) for i in idx]


# -------------------------------------------------------------------------------------- 1. sharpness
def loss_terms(net, batches):
    """The training cross-entropy over `batches` as one term per batch (a function: call it for a fresh
    pass), so that a Hessian-vector product holds the graph of one batch at a time."""
    return lambda: (F.cross_entropy(net(x), y) / len(batches) for x, y in batches)


def hessian_vector_product(terms, params, v):
    """H·v, H the Hessian of sum(terms()) with respect to params (v: one tensor per parameter): the gradient
    of (∂L/∂θ)·v, which needs the graph of the first gradient (create_graph)."""
    hv = [torch.zeros_like(p) for p in params]
    for loss in terms():
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v))
        for h, d in zip(hv, torch.autograd.grad(dot, params, materialize_grads=True)):
            h += d
    return hv


def power_iteration(matvec, params, gen, max_iter=100, tol=1e-3):
    """The eigenvalue of largest magnitude of the symmetric map `matvec` (a list of tensors shaped as params →
    the same) by power iteration from a N(0, I) start, stopped by RULE: {'eigenvalue', 'iterations',
    'converged', 'relative_change' (of the last iteration)}."""
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    lam, change, converged = None, None, False
    for k in range(1, max_iter + 1):
        hv = matvec(v)
        new = sum((h * u).sum() for h, u in zip(hv, v)).item()  # Rayleigh quotient, v of norm 1
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
        if lam is not None:
            change = abs(new - lam) / max(abs(new), 1e-30)
        lam = new
        if change is not None and change < tol:
            converged = True
            break
    return {'eigenvalue': lam, 'iterations': k, 'converged': converged, 'relative_change': change}


def top_eigenvalue(terms, params, gen, max_iter=100, tol=1e-3):
    """The largest eigenvalue of the Hessian of sum(terms()) with respect to params: power_iteration; where the
    eigenvalue of largest magnitude it finds is negative, λ₁ < 0, once more on H − λ₁I, whose largest one is
    λ_max − λ₁ (its iterations added, 'shift': λ₁; None where none was needed)."""
    def hvp(v):
        return hessian_vector_product(terms, params, v)
    r = {**power_iteration(hvp, params, gen, max_iter, tol), 'shift': None}
    if r['eigenvalue'] < 0:
        shift = r['eigenvalue']
        s = power_iteration(lambda v: [h - shift * u for h, u in zip(hvp(v), v)], params, gen, max_iter, tol)
        r = {**s, 'eigenvalue': s['eigenvalue'] + shift, 'iterations': r['iterations'] + s['iterations'],
             'converged': r['converged'] and s['converged'], 'shift': shift}
    return r


# ---------------------------------------------------------------------------- 2. average-case flatness
def filter_directions(params, gen):
    """A random direction of Li et al. (2018) for each parameter: N(0, I), each filter (slice along the first
    dimension: a convolution's output channel, a linear layer's output unit) scaled to the norm of the same
    filter of the parameter; 0 for 1-d parameters (BatchNorm's, biases)."""
    dirs = []
    for p in params:
        if p.dim() <= 1:
            dirs.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        scale = p.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-30)
        dirs.append(d * scale.view(-1, *[1] * (p.dim() - 1)))
    return dirs


@torch.no_grad()
def mean_loss(net, batches, params=None):
    """The training cross-entropy over `batches` (float), with the net's parameters replaced by `params`
    ({name: tensor}) where given."""
    total = 0.0
    for x, y in batches:
        z = net(x) if params is None else torch.func.functional_call(net, params, (x,))
        total += F.cross_entropy(z, y).item()
    return total / len(batches)


def flatness(net, batches, gen, draws=10, steps=STEPS):
    """{'loss': L(θ), str(a): {'mean', 'se'} of (L(θ + a·d) + L(θ − a·d))/2 − L(θ) over `draws` directions
    d (filter_directions; se: the standard error over the draws, None for one draw)}."""
    names, params = zip(*net.named_parameters())
    base = mean_loss(net, batches)
    rises = {a: [] for a in steps}
    for _ in range(draws):
        d = filter_directions(params, gen)
        for a in steps:
            up = mean_loss(net, batches, {n: p + a * u for n, p, u in zip(names, params, d)})
            down = mean_loss(net, batches, {n: p - a * u for n, p, u in zip(names, params, d)})
            rises[a].append((up + down) / 2 - base)
    return {'loss': base, **{str(a): mean_se(r) for a, r in rises.items()}}


def mean_se(values):
    """{'mean', 'se'} of a list of floats (se: standard error of the mean, None for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return {'mean': t.mean().item(), 'se': (t.std() / len(t) ** 0.5).item() if len(t) > 1 else None}


# ----------------------------------------------------------------------------------- 3. input sensitivity
def jacobian_norms(net, batches, gen, projections=10):
    """The Frobenius norm of the Jacobian of softmax(net(x)) with respect to x, per image of `batches`
    (normalised images; eval mode, so each output depends on its own image only and one vector-Jacobian
    product over a batch gives every image's vᵀJ), estimated as the square root of the mean of ‖vᵀJ‖² over
    `projections` draws of v ~ N(0, I): {'frobenius' (mean over images), 'se' (over images), 'frobenius_sq'
    (the mean of the unbiased estimates of ‖J‖_F²), 'images', 'projections'}."""
    norms, squares = [], []
    for x in batches:
        x = x.detach().requires_grad_()
        p = F.softmax(net(x), dim=1)
        sq = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for k in range(projections):
            v = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            g, = torch.autograd.grad(p, x, v, retain_graph=k < projections - 1)
            sq += g.double().pow(2).flatten(1).sum(1)
        sq /= projections
        squares.append(sq)
        norms.append(sq.sqrt())
    norms, squares = torch.cat(norms), torch.cat(squares)
    return {'frobenius': norms.mean().item(),
            'se': (norms.std() / len(norms) ** 0.5).item() if len(norms) > 1 else None,
            'frobenius_sq': squares.mean().item(), 'images': len(norms), 'projections': projections}


# ------------------------------------------------------------------------------------------ 4. agreement
@torch.no_grad()
def agreement(nets, batches):
    """On (images, labels) batches: {'top1': each net's top-1 (%), 'ensemble': the top-1 of the mean softmax
    (%), 'pairs': [{'nets': [a, b] (1-based), 'top1_agree': % of images on which their top-1 are the same,
    'sym_kl': mean over images of KL(p_a‖p_b) + KL(p_b‖p_a)}]}."""
    K = len(nets)
    pairs = list(itertools.combinations(range(K), 2))
    right, ens, same, kl, n = [0] * K, 0, [0] * len(pairs), [0.0] * len(pairs), 0
    for x, y in batches:
        z = [net(x) for net in nets]
        top = [zi.argmax(1) for zi in z]
        right = [r + (t == y).sum().item() for r, t in zip(right, top)]
        ens += ((sum(F.softmax(zi.float(), 1) for zi in z) / K).argmax(1) == y).sum().item()  # as X.evaluate
        logp = [F.log_softmax(zi.double(), dim=1) for zi in z]
        for s, (a, b) in enumerate(pairs):
            same[s] += (top[a] == top[b]).sum().item()
            kl[s] += ((logp[a].exp() - logp[b].exp()) * (logp[a] - logp[b])).sum().item()
        n += len(y)
    return {'top1': [100.0 * r / n for r in right], 'ensemble': 100.0 * ens / n,
            'pairs': [{'nets': [a + 1, b + 1], 'top1_agree': 100.0 * same[s] / n, 'sym_kl': kl[s] / n}
                      for s, (a, b) in enumerate(pairs)]}


# ----------------------------------------------------------------------------------------------- the run
def summary_own(run_dir, ckpt):
    """The run's own numbers with each path's own statistics: summary.json's own_bn block, or the checkpoint's
    last evaluated epoch for a run that has no summary yet; 'source' says which."""
    path = Path(run_dir) / 'summary.json'
    if path.exists():
        return {**json.loads(path.read_text())['own_bn'], 'source': 'summary.json'}
    last = next(r for r in reversed(ckpt['history']) if 'own_bn' in r)
    return {**last['own_bn'], 'source': f'last.pt, epoch {last["epoch"]}'}


def study(run_dir, n_batches=10, seed=0, device='cpu', max_iter=100, tol=1e-3, draws=10, projections=10,
          test_images=1000):
    """Every measurement above for each net of the run; the dict flatness.json holds."""
    cfg, ckpt, data, mean, std, parts, _, _, _ = load_run(run_dir, 'cpu')  # the settings and the data
    K, P, dev, fmt = len(parts), len(parts[0]), torch.device(device), X.layout(parts[0][0])
    batches = fixed_batches(data.train_x, data.train_y, n_batches, cfg.batch_size, seed, mean, std, dev, fmt)
    runs_own = summary_own(run_dir, ckpt)
    models = [path_model(run_dir, X.path_name((i,) * P)) for i in range(K)]  # (PathModel on the CPU, …)
    nets = [Logits(m.parts, m.classes).to(dev).eval() for m, *_ in models]
    jac_batches = [x for x, _ in X.eval_batches(data.test_x[:test_images], data.test_y[:test_images], mean, std,
                                                100, dev, fmt)]
    if dev.type == 'cuda':  # full fp32: TF32 convolutions would blur the Hessian-vector products
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = 'ieee'
    per_net = []
    for i, net in enumerate(nets):
        params, seconds = list(net.parameters()), {}
        t = time.time()
        sharp = top_eigenvalue(loss_terms(net, batches), params, generator(seed, 1), max_iter, tol)
        seconds['sharpness'], t = time.time() - t, time.time()
        flat = flatness(net, batches, generator(seed, 2), draws)
        seconds['flatness'], t = time.time() - t, time.time()
        jac = jacobian_norms(net, jac_batches, generator(seed, 3), projections)
        seconds['jacobian'] = time.time() - t
        per_net.append({'net': i + 1, 'name': cfg.nets[i], 'path': X.path_name((i,) * P),
                        'fallback': models[i][4], 'params': X.num_params(net), 'train_loss': flat.pop('loss'),
                        'sharpness': sharp, 'flatness': flat, 'jacobian': jac,
                        'run_top1': runs_own['accuracy'][i], 'seconds': seconds})
    agree = agreement(nets, X.eval_batches(data.test_x, data.test_y, mean, std, 500, dev, fmt))
    for r, top1 in zip(per_net, agree['top1']):
        r['test_top1'] = top1
        if abs(top1 - r['run_top1']) > 0.5:
            print(f'{run_dir}: net {r["net"]} scores {top1:.2f} here, {r["run_top1"]:.2f} in the run '
                  f'({runs_own["source"]}; another device or precision?)', file=sys.stderr)
    better = max(runs_own['accuracy'])
    return {'run': str(run_dir), 'method': cfg.method, 'nets': cfg.nets, 'cuts': cfg.net_cuts, 'train_seed': cfg.seed,
            'epoch': ckpt['epoch'],
            'train_images': len(data.train_x), 'train_per_class': getattr(cfg, 'train_per_class', None),
            'batches': n_batches, 'batch_size': cfg.batch_size, 'seed': seed,
            'sharpness_rule': RULE, 'max_iter': max_iter, 'tol': tol, 'draws': draws, 'steps': list(STEPS),
            'projections': projections, 'test_images': len(data.test_x[:test_images]),
            'per_net': per_net,
            'agreement': {'pairs': agree['pairs'], 'ensemble': agree['ensemble'],
                          'run_ensemble': runs_own['ensemble'], 'run_better_net': better,
                          'ensemble_gain': runs_own['ensemble'] - better, 'source': runs_own['source']},
            'device': X.device_name(dev), 'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d')}


def pm(m):
    """mean ± se, as the table prints it."""
    return f'{m["mean"]:.4g}' + (f' ± {m["se"]:.2g}' if m['se'] is not None else '')


def table(r):
    """The printed table of study()'s dict."""
    head = (f'{r["run"]} ({r["method"]} {",".join(r["nets"])}, epoch {r["epoch"]}; {r["batches"]} batches of '
            f'{r["batch_size"]} of its {r["train_images"]} training images, seed {r["seed"]})')
    cols = ['net', 'train CE', 'λ_max (iters)'] + [f'ΔCE at {a}' for a in r['steps']] + ['‖J‖_F', 'top-1']
    rows = []
    for n in r['per_net']:
        s = n['sharpness']
        rows.append([f'{n["net"]} {n["name"]}{" (shared BN)" if n["fallback"] else ""}', f'{n["train_loss"]:.4f}',
                     f'{s["eigenvalue"]:.4g} ({s["iterations"]}{"" if s["converged"] else ", not converged"}'
                     f'{"" if s["shift"] is None else ", shifted"})']
                    + [pm(n['flatness'][str(a)]) for a in r['steps']]
                    + [pm({'mean': n['jacobian']['frobenius'], 'se': n['jacobian']['se']}),
                       f'{n["test_top1"]:.2f}'])
    widths = [max(len(c), *(len(row[k]) for row in rows)) for k, c in enumerate(cols)]
    lines = [head, '  '.join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    a = r['agreement']
    lines += [f'nets {p["nets"][0]} and {p["nets"][1]}: top-1 agree on {p["top1_agree"]:.2f} % of the test images, '
              f'mean symmetric KL {p["sym_kl"]:.4g}' for p in a['pairs']]
    lines.append(f'ensemble {a["run_ensemble"]:.2f} vs the better net {a["run_better_net"]:.2f}: '
                 f'gain {a["ensemble_gain"]:+.2f} (the run\'s, {a["source"]}; here {a["ensemble"]:.2f})')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------- the runs together
# What a flatness.json measured with: the runs compared in one table must share all of it.
MEASURED_WITH = ('epoch', 'batches', 'batch_size', 'seed', 'max_iter', 'tol', 'draws', 'steps', 'projections',
                 'test_images')


def mean_std(values, se=None):
    """'mean ± sample std' over the runs; for one run 'mean (se S)', S the standard error over its draws."""
    m = statistics.fmean(values)
    if len(values) > 1:
        return f'{m:.4g} ± {statistics.stdev(values):.2g}'
    return f'{m:.4g}' + (f' (se {se:.2g})' if se is not None else '')


def collect(folder):
    """Markdown tables of every FOLDER/RUN/flatness.json, RUN a finished run (its summary.json beside it):
    runs grouped as tools/report.py groups them (pair, cut, data, epochs, width, then every setting but the
    seed, which must not repeat), each measure as mean ± sample std over a row's seeds."""
    runs = {}
    for f in sorted(Path(folder).glob('*/flatness.json')):
        if not (f.parent / 'summary.json').exists():
            raise X.UsageError(f'{f.parent.name}: a flatness.json without summary.json; --collect takes '
                               'finished runs')
        runs[f.parent.name] = {**json.loads((f.parent / 'summary.json').read_text()),
                               'flatness': json.loads(f.read_text())}
    if not runs:
        raise X.UsageError(f'--collect {folder}: no RUN/flatness.json there; run the tool on each run first')
    groups = {}
    for name, s in runs.items():
        if s['flatness']['epoch'] != s['epochs']:
            raise X.UsageError(f'{name}: flatness.json measured epoch {s["flatness"]["epoch"]} of '
                               f'{s["epochs"]}; measure the finished run again')
        groups.setdefault((s['pair'], s['cut'], s['dataset'], s['epochs'], s['width']), {})[name] = s
    lines = [f'Measured by `python tools/flatness.py RUN_DIR ...` on each run below {Path(folder).name}/ (the '
             'command is in its flatness.json). Over several seeds: mean ± sample std over the seeds; one seed: '
             'the value, and in brackets the standard error over its random directions (ΔCE) or test images (‖J‖_F).']
    for (pair, cut, dataset, epochs, width), group in groups.items():
        first = next(iter(group.values()))['flatness']
        differ = [k for k in MEASURED_WITH if any(g['flatness'][k] != first[k] for g in group.values())]
        if differ:
            raise X.UsageError(f'{pair}, cut {cut}: its runs were measured with other --{differ[0]} '
                               f'({", ".join(sorted(group))}); measure them alike')
        table, _ = report.rows_of(group)
        steps = first['steps']
        lines += ['', f'## {pair}, cut {cut}, {dataset}, {epochs} epochs, width {width}', '',
                  f'Each net alone (its pure path, own statistics) after epoch {epochs}, on {first["batches"]} '
                  f'training batches of {first["batch_size"]} (seed {first["seed"]}); λ_max: the top Hessian '
                  'eigenvalue of the training cross-entropy; ΔCE: its mean rise along filter-normalised random '
                  'directions at the step; ‖J‖_F: the softmax\'s input Jacobian on test images.', '',
                  '| method | net | n | train CE | λ_max | ' + ' | '.join(f'ΔCE at {a}' for a in steps)
                  + ' | ‖J‖_F | test top-1 | seeds |', '|---|---|---|---|---|' + '---|' * len(steps) + '---|---|---|']
        for row in table:
            rs = [group[r]['flatness'] for r in row['runs']]
            for k, net in enumerate(first['per_net']):
                ns = [r['per_net'][k] for r in rs]
                cells = [mean_std([n['train_loss'] for n in ns]), mean_std([n['sharpness']['eigenvalue'] for n in ns])]
                cells += [mean_std([n['flatness'][str(a)]['mean'] for n in ns], ns[0]['flatness'][str(a)]['se'])
                          for a in steps]
                cells += [mean_std([n['jacobian']['frobenius'] for n in ns], ns[0]['jacobian']['se']),
                          mean_std([n['test_top1'] for n in ns]), ', '.join(map(str, row['seeds']))]
                lines.append(f'| {row["label"]} | {net["net"]}: {net["name"]} | {len(rs)} | ' + ' | '.join(cells)
                             + ' |')
        lines += ['', 'The nets together, on the whole test set: how often two nets\' top-1 agree, the mean '
                  'symmetric KL of their softmax, and the gain (points of top-1) of the ensemble of all the nets '
                  'over the best of them (the run\'s own numbers).', '',
                  '| method | nets | n | top-1 agree (%) | symmetric KL | ensemble gain |', '|---|---|---|---|---|---|']
        for row in table:
            rs = [group[r]['flatness'] for r in row['runs']]
            for k, pr in enumerate(first['agreement']['pairs']):
                ps = [r['agreement']['pairs'][k] for r in rs]
                gain = mean_std([r['agreement']['ensemble_gain'] for r in rs]) if k == 0 else ''
                lines.append(f'| {row["label"]} | {pr["nets"][0]}, {pr["nets"][1]} | {len(rs)} | '
                             f'{mean_std([q["top1_agree"] for q in ps])} | {mean_std([q["sym_kl"] for q in ps])} | '
                             f'{gain} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run_dir', help='the --out folder of a finished training run (its last.pt is used)')
    p.add_argument('--batches', type=int, default=10, help='training batches, of the run\'s batch size (10)')
    p.add_argument('--seed', type=int, default=0, help='draws the batches, the start of the power iteration, '
                                                       'the directions and the projections (0)')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda if present)')
    p.add_argument('--out', metavar='FILE', help='the JSON to write (default: RUN_DIR/flatness.json)')
    p.add_argument('--max-iter', type=int, default=100, help='power iterations at most (100)')
    p.add_argument('--tol', type=float, default=1e-3, help='stop when the eigenvalue changes by less than this '
                                                           'fraction of itself (1e-3)')
    p.add_argument('--draws', type=int, default=10, help='random directions for the flatness (10)')
    p.add_argument('--projections', type=int, default=10, help='random projections per image for ‖J‖_F (10)')
    p.add_argument('--test-images', type=int, default=1000, help='the first N test images for ‖J‖_F (1000)')
    p.add_argument('--collect', action='store_true', help='RUN_DIR is a folder of finished runs (summary.json) '
                   'with their flatness.json: print their tables (markdown; into --out too); nothing measured, '
                   'the measuring options ignored')
    args = p.parse_args(argv)
    if args.collect:
        try:
            out = Path(args.out) if args.out else None
            if out and (not out.resolve().parent.is_dir() or out.is_dir()):
                raise X.UsageError(f'--out {out}: give a file in an existing directory')
            text = collect(args.run_dir)
        except X.UsageError as e:
            print(f'flatness.py: error: {e}', file=sys.stderr)
            return 2
        if out:
            X.write_atomic(out, lambda f: f.write(text.encode()))
        print(text, end='')
        return 0
    command = 'python tools/flatness.py ' + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        for flag in ('batches', 'max_iter', 'draws', 'projections', 'test_images'):
            if getattr(args, flag) < 1:
                raise X.UsageError(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(args, flag)}')
        if not args.tol > 0:
            raise X.UsageError(f'--tol must be positive, got {args.tol}')
        device = args.device or X.default_device()
        X.check_device(device)  # a one-line error for a device that is not there
        out = Path(args.out) if args.out else Path(args.run_dir) / 'flatness.json'  # (no run there: study says)
        if args.out and (not out.resolve().parent.is_dir() or out.is_dir()):
            raise X.UsageError(f'--out {out}: give a file in an existing directory')
        start = time.time()
        r = study(args.run_dir, args.batches, args.seed, device, args.max_iter, args.tol, args.draws,
                  args.projections, args.test_images)
        r['wall_s'] = round(time.time() - start, 1)
    except X.UsageError as e:
        print(f'flatness.py: error: {e}', file=sys.stderr)
        return 2
    r['command'] = command
    X.write_json(out, r)
    print(table(r))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
