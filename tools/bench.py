"""The speed benchmark: the usual training loop of distillation codebases (torchvision DataLoader with PIL
workers, fp32 eager) against xml_ref's fast path (data on the GPU, bf16, channels_last, fused SGD, CUDA graph).

    python tools/bench.py [--out results] [--device cuda] [--fresh]

Writes bench.json and bench.md into --out after every row; rows already there are kept (run it again to fill in
the missing ones). Needs a CUDA GPU."""
import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402


def step_flops(parts, method, image_size=32):
    """Analytic FLOPs per image of one simultaneous training step: 3 × the forward FLOPs of every part run
    (forward, gradient of its input, gradient of its weights; the routed backward passes split these two
    gradients between the nets' losses but do each once)."""
    return 3 * sum(X.part_flops(parts, X.step_paths(method, len(parts), len(parts[0])), image_size).values())


def matmul_tflops(dev, n=8192, repeats=10):
    """The measured bf16 matrix-product rate (TFLOP/s): the ceiling the step's FLOP rate is compared with."""
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(dev)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e12


class PILImages(torch.utils.data.Dataset):
    """The usual loop's data: one PIL image per item through torchvision transforms, in DataLoader workers."""

    def __init__(self, images, labels, mean, std):
        import torchvision.transforms as T
        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = T.Compose([T.RandomCrop(images.shape[1], padding=X.PAD), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_loop(loop, pair, method, batch, data, dev, steps, warmup=6):
    """Images per second of training `pair` with `method` at `batch`, in steady state (after `warmup` steps).
    usual: DataLoader + PIL transforms in worker processes, fp32 eager train_step. ours: the data on the GPU,
    TrainStep with bf16, channels_last, fused SGD and the CUDA graph. ours-eager: the same without the graph."""
    cfg = argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=5e-4)
    mean, std = X.channel_stats(data.train_x)
    ours = loop.startswith('ours')
    fmt = torch.channels_last if ours else torch.contiguous_format
    torch.manual_seed(0)
    models = [X.build(n, data.num_classes).to(dev, memory_format=fmt) for n in pair]
    parts = [list(X.split(m, X.default_cut(pair))) for m in models]
    opts = [X.sgd(m.parameters(), cfg, fused=ours) for m in models]
    if not ours:
        loader = torch.utils.data.DataLoader(PILImages(data.train_x, data.train_y, mean, std), batch_size=batch,
                                             shuffle=True, drop_last=True, num_workers=min(8, os.cpu_count() or 1),
                                             pin_memory=True, persistent_workers=True)
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        run = lambda: X.train_step(parts, opts, *(t.to(dev, non_blocking=True) for t in next(batches)), method)
    else:
        images, labels = data.train_x.to(dev), data.train_y.to(dev)
        if loop == 'ours':
            X.graph_lr(opts, dev)

        step = X.TrainStep(functools.partial(X.train_step, parts, opts, method=method), [0, 1], mean, std, dev,
                           bf16=True, channels_last=True)
        if loop == 'ours':
            step = X.CudaGraphStep(step, (batch, *images.shape[1:]), dev)
        gen = torch.Generator(dev).manual_seed(0)

        def run():
            idx = torch.randint(len(images), (batch,), device=dev, generator=gen)
            step(X.augment(images[idx], generator=gen), labels[idx])
    for _ in range(warmup):
        run()
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(steps):
        run()
    torch.cuda.synchronize(dev)
    return steps * batch / (time.perf_counter() - t), step_flops(parts, method)


def bench(out_dir, device='cuda', fresh=False):
    """The speed benchmark of the README: the usual loop against ours on one GPU; writes bench.json and
    bench.md into out_dir after every row. Rows already in out_dir/bench.json are kept and not measured again
    (an interrupted benchmark continues where it stopped), unless fresh."""
    if not torch.cuda.is_available():
        raise X.UsageError('the benchmark measures the CUDA training loop and needs a GPU')
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True  # both loops: fixed shapes, cuDNN picks its fastest kernels once
    data = X.synthetic_data(50_000, 0, num_classes=100)  # CIFAR-100-shaped; speed does not depend on the pixels
    peak = matmul_tflops(dev)
    stamp = {'device': X.device_name(dev), 'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d')}
    print(f'{stamp["device"]}, torch {stamp["torch"]}: bf16 matmul {peak:.0f} TFLOP/s', flush=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [] if fresh or not (out_dir / 'bench.json').exists() else json.loads((out_dir / 'bench.json').read_text())
    done = {(r['loop'], r['method'], r['pair'], r['batch'], r['device'], r['torch']) for r in rows}
    configs = [(pair, method, batch, loop) for pair in (['res18', 'res34'], ['res18', 'mbv1'])
               for method in ('xml', 'dml', 'independent') for batch in (128, 512) for loop in ('usual', 'ours')]
    configs += [(['res18', 'res34'], 'xml', batch, 'ours-eager') for batch in (128, 512)]  # what the graph buys
    for pair, method, batch, loop in configs:
        if (loop, method, ','.join(pair), batch, stamp['device'], stamp['torch']) in done:
            continue
        steps = max(10, 4_000 // batch) if loop == 'usual' else max(20, 12_000 // batch)
        img_per_s, flops = bench_loop(loop, pair, method, batch, data, dev, steps)
        row = {'loop': loop, 'method': method, 'pair': ','.join(pair), 'batch': batch, 'img_per_s': img_per_s,
               'gflop_per_img': flops / 1e9, 'flop_fraction': img_per_s * flops / (peak * 1e12),
               'matmul_tflops': peak, **stamp}
        rows.append(row)
        print(' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()
                       if k not in stamp), flush=True)
        torch.cuda.empty_cache()
        X.write_json(out_dir / 'bench.json', rows)
        X.write_atomic(out_dir / 'bench.md', lambda f: f.write(bench_table(rows).encode()))
    return rows


def bench_table(rows):
    """bench.md: one line per pair, method and batch, the usual loop beside ours, each row with where and when
    it was measured."""
    stamps = sorted({(r['device'], r['torch'], r['date'], round(r['matmul_tflops'])) for r in rows})
    lines = ['# Training speed: the usual loop and ours', '',
             '`python tools/bench.py`. ' + '; '.join(f'{d}, torch {t}, {day}: measured bf16 matmul rate {p} TFLOP/s'
                                                     for d, t, day, p in stamps) + ' (8192³ products). '
             'Synthetic CIFAR-100-shaped data (50,000 uint8 32×32 '
             'images), simultaneous updates, the deck\'s cuts, cudnn.benchmark on for both loops. usual: torchvision '
             'DataLoader (8 workers, PIL RandomCrop/Flip/ToTensor/Normalize, pinned memory), fp32 eager step. '
             'ours: uint8 data on the GPU, crop/flip on tensors, bf16 autocast, channels_last, fused SGD, the whole '
             'step in a CUDA graph. GFLOP/img: the analytic step count (3 × the forward multiply-adds × 2 of every '
             'part run); FLOP fraction: img/s × GFLOP/img over the measured matmul rate.', '',
             '| pair | method | batch | usual img/s | ours img/s | speed-up | GFLOP/img | ours FLOP fraction | date |',
             '|---|---|---|---|---|---|---|---|---|']
    usual = {(r['pair'], r['method'], r['batch'], r['device']): r for r in rows if r['loop'] == 'usual'}
    for r in rows:  # the speed-up compares two loops on the same device only
        u = usual.get((r['pair'], r['method'], r['batch'], r['device']))
        if r['loop'] == 'ours':
            lines.append(f'| {r["pair"]} | {r["method"]} | {r["batch"]} | '
                         + (f'{u["img_per_s"]:,.0f}' if u else '–') + f' | {r["img_per_s"]:,.0f} | '
                         + (f'{r["img_per_s"] / u["img_per_s"]:.1f}×' if u else '–')
                         + f' | {r["gflop_per_img"]:.1f} | {100 * r["flop_fraction"]:.1f} % | {r["date"]} |')
    eager = [r for r in rows if r['loop'] == 'ours-eager']
    if eager:
        lines += ['', 'Without the CUDA graph (the same step run eagerly), xml on res18,res34: ' +
                  ', '.join(f'{r["img_per_s"]:,.0f} img/s at batch {r["batch"]}' for r in eager) + '.']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results', help='where bench.json and bench.md are written (and continued)')
    p.add_argument('--device', default='cuda')
    p.add_argument('--fresh', action='store_true', help='measure every row again, not only the missing ones')
    args = p.parse_args(argv)
    try:
        bench(args.out, args.device, args.fresh)
    except X.UsageError as e:
        print(f'bench.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
