"""A one-off study: how fast one training step runs on the CPU with the nets and inputs in channels_last
against the default contiguous (NCHW) layout, the measurement behind channels_last being the layout of every run.

    python tools/cpu_layout.py [--pair res18,mbv1] [--method xml] [--width 16] [--batch-size 128] [--steps 6]
                               [--repeats 3] [--out results/cpu_layout.md]

Each repeat builds the nets afresh in each layout (the same seed), takes 2 warm-up steps, then times --steps steps
of xml_ref.train_step on the same random batches; the median step time per layout and their ratio are written to
--out with the command, device, torch version and date."""
import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402


def step_seconds(names, method, width, batch, steps, fmt, seed=0):
    """Median seconds of one train_step of `method` on `names` in memory format `fmt` (after 2 warm-up steps)."""
    torch.manual_seed(seed)
    models = [X.build(n, 10, width).to(memory_format=fmt) for n in names]
    parts = [X.split_parts(m, [X.default_cut(names)]) for m in models]
    cfg = X.Config()
    optimizers = [X.sgd(m.parameters(), cfg) for m in models]
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt),
                torch.randint(10, (batch,), generator=g)) for _ in range(steps + 2)]
    times = []
    for k, (x, y) in enumerate(batches):
        t = time.perf_counter()
        X.train_step(parts, optimizers, x, y, method)
        if k >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pair', default='res18,mbv1')
    p.add_argument('--method', default='xml')
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--out', default='results/cpu_layout.md')
    a = p.parse_args(argv)
    layouts = {'contiguous (NCHW)': torch.contiguous_format, 'channels_last': torch.channels_last}
    seconds = {name: [] for name in layouts}
    for r in range(a.repeats):  # alternated, so that a slow spell of the machine hits both layouts
        for name, fmt in layouts.items():
            seconds[name].append(step_seconds(a.pair.split(','), a.method, a.width, a.batch_size, a.steps, fmt, r))
            print(f'repeat {r + 1}: {name} {seconds[name][-1]:.3f} s a step', flush=True)
    nchw, last = (statistics.median(seconds[name]) for name in layouts)
    argv = sys.argv[1:] if argv is None else argv
    lines = [f'# One {a.method} training step on the CPU: channels_last against NCHW', '',
             f'`{" ".join(["python tools/cpu_layout.py", *map(shlex.quote, argv)])}`; {a.pair}, width {a.width}, batch {a.batch_size}, '
             f'{X.device_name(torch.device("cpu"))}, torch {torch.__version__}, {time.strftime("%Y-%m-%d")}. '
             f'Median of {a.repeats} repeats (fresh nets each), each the median of {a.steps} timed steps after 2 '
             'warm-up steps.', '',
             '| layout | seconds a step (each repeat) | median |', '|---|---|---|']
    lines += [f'| {name} | {", ".join(f"{s:.3f}" for s in seconds[name])} | {statistics.median(seconds[name]):.3f} |'
              for name in layouts]
    lines += ['', f'channels_last is {nchw / last:.2f}× as fast as NCHW.']
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
