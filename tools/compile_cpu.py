"""torch.compile of the CPU training step, against the eager channels_last step (issue 37's question: is a
200-epoch CPU run cheaper compiled?). Each part (up- and down-half) is compiled on its own, with the functorch
donated-buffer optimisation off: the routed backward keeps the graph for the next net's pass, which donated
buffers forbid; the step around the parts (routing, the in-place check, the own statistics' hooks) stays eager.

    python tools/compile_cpu.py --pair res18,mbv1 [--backend inductor|eager] [--steps 25]

xml at width 16, batch 128, synthetic CIFAR-sized images: prints the first step's losses, the first step's
seconds (the compile) and the median of the steps after the 5th."""
import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pair', default='res18,mbv1')
    p.add_argument('--backend', default='inductor', help="torch.compile's backend, or eager: not compiled")
    p.add_argument('--steps', type=int, default=25)
    args = p.parse_args(argv)
    cfg = X.parse_args(['--pair', args.pair, '--method', 'xml', '--dataset', 'synthetic', '--width', '16',
                        '--device', 'cpu', '--out', tempfile.mkdtemp()])
    torch.manual_seed(0)
    run = X.set_up(cfg)
    if args.backend != 'eager':
        from torch._functorch import config as functorch_config
        functorch_config.donated_buffer = False
        for net in run.parts:
            net[:] = [torch.compile(part, backend=args.backend) for part in net]
    step, optimizers = X.make_step(run, False, random.Random(0))
    for opt in optimizers:
        X.set_lr(opt, 0.01)
    g = torch.Generator().manual_seed(0)
    times, start = [], time.time()
    for s in range(args.steps):
        images = X.augment(run.data.train_x[:128], generator=g, rotate=15)
        t = time.time()
        step(images, run.data.train_y[:128])
        times.append(time.time() - t)
        if s == 0:
            print('first step losses', [v.item() for v in step.loss_sum.values()], flush=True)
    median = statistics.median(times[5:] or times[1:] or times)
    print(f'{args.backend} {args.pair}: first step {times[0]:.1f} s, median step {median:.3f} s, {args.steps} steps '
          f'{time.time() - start:.1f} s, {X.device_name(torch.device("cpu"))}, torch {torch.__version__}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
