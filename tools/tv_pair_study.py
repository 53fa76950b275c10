"""What makes XML with torchvision's ImageNet nets diverge on small images: the loss of each net over 12 steps
(3 epochs of 4 batches of 32 synthetic CIFAR-sized images, the recipe's SGD with its one-epoch linear warm-up),
for the stitched pair tv:resnet18 + tv:mobilenet_v2 trained alone (CE), with DML, with XML (mean and sum of its
paths), the same without stitches (tv:resnet18 + tv:resnet34, both 128 channels at layer2), and the CIFAR-style
res18 + mbv1 of xml_ref.py (width 16), at lr 0.1 and 0.02.

    python tools/tv_pair_study.py [--out results/tv_pair_study.md]"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402

PAIRS = {'tv:resnet18,tv:mobilenet_v2': ('layer2', 'features.6'), 'tv:resnet18,tv:resnet34': ('layer2', 'layer2'),
         'res18,mbv1': ('layer3', 'layer3')}
ROWS = [('tv:resnet18,tv:mobilenet_v2', 'independent', 0.1), ('tv:resnet18,tv:mobilenet_v2', 'dml', 0.1),
        ('tv:resnet18,tv:mobilenet_v2', 'xml sum', 0.1), ('tv:resnet18,tv:mobilenet_v2', 'xml mean', 0.1),
        ('tv:resnet18,tv:resnet34', 'xml mean', 0.1), ('res18,mbv1', 'xml sum', 0.1),
        ('tv:resnet18,tv:mobilenet_v2', 'independent', 0.02), ('tv:resnet18,tv:mobilenet_v2', 'xml sum', 0.02),
        ('tv:resnet18,tv:mobilenet_v2', 'xml mean', 0.02)]


def losses_over_steps(pair, method, lr, batches, epochs=3):
    """Each step's (L_1, L_2) for the pair trained with `method` from seed 0."""
    torch.manual_seed(0)
    nets = [X.build(name, 10, 16) for name in pair.split(',')]
    (up1, down1), (up2, down2) = (X.split(n, c) for n, c in zip(nets, PAIRS[pair]))
    stitch12, stitch21 = X.pair_stitches(up1, up2)
    opts = [torch.optim.SGD([*n.parameters(), *s.parameters()], lr=lr, momentum=0.9, weight_decay=5e-4)
            for n, s in ((nets[0], stitch21), (nets[1], stitch12))]
    warmup = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / len(batches))) for o in opts]
    seen = []
    for _ in range(epochs):
        for x, y in batches:
            if method == 'independent':
                losses = [F.cross_entropy(n(x), y) for n in nets]
            elif method == 'dml':
                z1, z2 = nets[0](x), nets[1](x)
                losses = [X.dml_loss(z1, [z2], y), X.dml_loss(z2, [z1], y)]
            else:
                losses = X.xml_pair_losses(up1, down1, up2, down2, x, y, mean=method == 'xml mean',
                                           stitch12=stitch12, stitch21=stitch21)
            X.routed_backward(losses, opts)
            for opt, sched in zip(opts, warmup):
                opt.step()
                sched.step()
            seen.append([loss.item() for loss in losses])
    return seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/tv_pair_study.md')
    args = p.parse_args(argv)
    data = X.synthetic_data(n_train=128, n_test=16)
    mean, std = X.channel_stats(data.train_x)
    batches = [(X.normalize(data.train_x[k:k + 32], mean, std), data.train_y[k:k + 32]) for k in range(0, 128, 32)]
    lines = ['# XML with torchvision nets on small images: what diverges', '',
             f'`python tools/{Path(__file__).name} --out {args.out}` on {time.strftime("%Y-%m-%d")}, '
             f'{X.device_name(torch.device("cpu"))}, torch {torch.__version__}. '
             + ' '.join(__doc__.split('\n\n')[0].split()),
             '', 'Loss of net 1 / net 2: first step, largest, mean of the last 4 steps (the third epoch).', '',
             '| pair | method | lr | first | largest | last epoch |', '|---|---|---|---|---|---|']
    for pair, method, lr in ROWS:
        seen = losses_over_steps(pair, method, lr, batches)
        first, top = seen[0], [max(s[i] for s in seen) for i in range(2)]
        last = [sum(s[i] for s in seen[-4:]) / 4 for i in range(2)]
        lines.append(f'| {pair} | {method} | {lr} | ' + ' | '.join(f'{a:.2f} / {b:.2f}' for a, b in (first, top, last))
                     + ' |')
        print(lines[-1], flush=True)
    Path(args.out).write_text('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
