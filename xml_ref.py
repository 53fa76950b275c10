#!/usr/bin/env python3
"""Xross Mutual Learning (XML): the reference implementation, in one file.

Two classifiers are cut where their feature maps have the same shape, net i = down_i ∘ up_i. DML
trains both nets, each with cross-entropy plus a KL term toward the other's prediction; XML also
trains the crossed paths z_12 = down_2(up_1(x)) and z_21 = down_1(up_2(x)). docs/METHOD.md states
the method (formulas, routing, BatchNorm, recipe, the deck's numbers), cited as METHOD.md §n.
Top to bottom: config, data, models, the copyable block (splitter, XML for a pair), the losses,
K nets × P parts and every method, evaluation, the fast path, cost, the training run, the CLI.

    python xml_ref.py --pair res18,res34 --method xml        # CIFAR-100 with the standard recipe
    python xml_ref.py --pair res18,mbv1 --method dml --dataset synthetic --epochs 1 --out runs/smoke
"""
import argparse
import contextlib
import functools
import inspect
import itertools
import json
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# ----------------------------------------------------------------------------------------- config
# The recipe (METHOD.md §4) is that of weiaicunzai/pytorch-cifar100, whose models the deck's
# parameter counts match; Config holds its values, lr_at its schedule.
MILESTONES, LR_DECAY, PAD = (0.3, 0.6, 0.8), 0.2, 4
# In checkpoints and summaries: runs without it dropped the lr one epoch after each milestone
SCHEDULE = 'pytorch-cifar100'
METHODS = ('independent', 'kd', 'fitnet', 'dml', 'xml', 'xml+l2', 'xml+disc', 'xml+gan')
PAIR_ONLY = ('kd', 'fitnet', 'xml+disc', 'xml+gan')  # defined for two nets cut once
UPDATES = ('simultaneous', 'sequential')
DATASETS = ('cifar100', 'cifar10', 'folder', 'synthetic')


def names(text):
    """'res18,res34' → ['res18', 'res34']: the type of the options that list names."""
    return text.split(',')


def option(default, help, group, **argparse_kw):
    """A field of Config: its default, its --help text and group, and what else argparse needs."""
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kw))


WHAT, HOW, RECIPE, DATA, OUT = ('what is trained', "the method's options",
                                'the recipe (docs/METHOD.md §4)', 'data and device', 'output')


@dataclass
class Config:
    """Every option of a run, declared once: make_parser builds the command line from the fields,
    derive() fills in values that depend on others, check() refuses bad ones (changing nothing)."""
    pair: list = option('res18,res34', "net 1,net 2: res18, res34, mbv1, or tv:ARCH (torchvision's "
                        'model ARCH, untrained, e.g. tv:resnet18)', WHAT, type=names)
    nets: list = option(None, 'K ≥ 2 nets instead of a pair, e.g. res18,res34,mbv1 (cut with '
                        '--cuts)', WHAT, type=names)
    method: str = option('xml', 'the loss (docs/METHOD.md §3)', WHAT, choices=METHODS)
    cut: list = option(None, 'the submodule whose output every net is cut at, or one per net '
                       '(layer2,features.6); where channels differ a stitch joins them (default: '
                       'layer3 with mbv1, else layer2: the deck\'s cuts)', WHAT, type=names)
    cuts: list = option(None, 'several cuts of every net, in order (P − 1 cuts: P parts), e.g. '
                        'layer2,layer3', WHAT, type=names)
    list_cuts: bool = option(False, 'print each net\'s cuts with their feature shapes, and exit',
                             WHAT)
    width: int = option(64, 'channels of the first stage of res18, res34 and mbv1 (64: the '
                        'published nets)', WHAT)
    update: str = option('simultaneous', 'order of the nets\' updates', HOW, choices=UPDATES)
    path_weights: str = option(None, 'the xml family: L_i sums its paths (the deck) or takes '
                               'their mean (default: sum for res18, res34 and mbv1; mean with a '
                               'tv: net, where the sum diverged: results/README.md)', HOW,
                               choices=('sum', 'mean'))
    paths_per_step: int = option(None, 'xml, xml+l2 with K nets in P parts: train the pure paths '
                                 'and R crossed paths drawn at random each step, not all K^P', HOW,
                                 type=int, metavar='R')
    temperature: float = option(None, 'KL temperature (default: 4 for kd and fitnet, else 1)',
                                HOW, type=float)
    l2_weight: float = option(1.0, 'λ of the xml+l2 feature term', HOW)
    adv_weight: float = option(0.1, 'weight of the adversarial terms of xml+disc and xml+gan', HOW)
    teacher: str = option(None, 'kd, fitnet: a last.pt or best.pt of an earlier run that trained '
                          'the teacher (the larger net of the pair)', HOW, metavar='PATH')
    hint_epochs: int = option(None, 'fitnet: epochs of stage 1 (default: epochs/10, at least 1)',
                              HOW, type=int)
    freeze: int = option(None, 'teacher-student XML: net 1 or 2 stays fixed (eval mode), loaded '
                         'with --init1 / --init2', HOW, type=int, choices=(1, 2))
    init1: str = option(None, 'start net 1 from the net of that name in a checkpoint', HOW,
                        metavar='PATH')
    init2: str = option(None, 'start net 2 from the net of that name in a checkpoint', HOW,
                        metavar='PATH')
    epochs: int = option(200, 'training epochs; lr × 0.2 from the epochs at 30, 60 and 80 %% of '
                         'them on', RECIPE)
    warmup_epochs: int = option(1, 'linear per-step lr warm-up over the first W epochs of each '
                                'stage (0: none)', RECIPE, metavar='W')
    batch_size: int = option(128, 'images per step', RECIPE)
    lr: float = option(0.1, 'SGD learning rate after the warm-up', RECIPE)
    momentum: float = option(0.9, 'SGD momentum', RECIPE)
    weight_decay: float = option(5e-4, 'SGD weight decay', RECIPE)
    seed: int = option(0, 'nets\' initialisation, data order and augmentation', RECIPE)
    rotate: float = option(15.0, 'rotate each training image by an angle uniform in [-DEG, DEG], '
                           'after the crop and the flip (0: no rotation)', RECIPE, metavar='DEG')
    dataset: str = option('cifar100', 'synthetic: a tiny stand-in', DATA, choices=DATASETS)
    train_per_class: int = option(None, 'train on the first N training images of each class, in '
                                  'the data set\'s order (the test set stays whole)', DATA,
                                  type=int, metavar='N')
    data_dir: str = option('data', 'cifar*: where it is or is downloaded to; folder: the root '
                           'holding train/<class>/ and test/<class>/', DATA)
    device: str = option(None, 'cuda, cuda:N or cpu (default: cuda if present)', DATA)
    fast: str = option('auto', 'on: bf16, fused SGD, the step in a CUDA graph (auto: on with '
                       'CUDA); off: the plain fp32 eager loop it is tested against', DATA,
                       choices=('auto', 'on', 'off'))
    sync_bn: bool = option(False, 'torchrun on GPUs: BatchNorm statistics over the whole batch '
                           '(SyncBatchNorm), not each process\'s share', DATA)
    eval_every: int = option(1, 'evaluate every path on the test set after every N-th epoch '
                             'and the last (best_epoch: the best of those)', OUT, metavar='N')
    out: str = option(None, 'output directory (default: runs/<nets>_<method>_<cuts>_seed<seed>)',
                      OUT)
    resume: bool = option(False, 'continue the run in --out from its last.pt (or start it if it '
                          'has none yet)', OUT)
    force: bool = option(False, 'overwrite a run already in --out', OUT)
    # set by derive(), not options
    net_cuts: list = None  # net_cuts[i]: the names net i is cut at
    processes: int = 1  # torchrun's processes
    schedule: str = SCHEDULE
    argv: list = None  # the command line, for the summary


class UsageError(Exception):
    """Bad input from the user: main() prints it as one line on stderr and exits with status 2."""


# ------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """A classification data set in memory: images uint8 N×H×W×3 (CIFAR's layout), labels int64."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list

    @property
    def num_classes(self):
        return len(self.classes)

    def signature(self):
        """What a checkpoint records of the data, so that a resumed run can tell it is the same."""
        return {'classes': list(self.classes), 'train': len(self.train_x), 'test': len(self.test_x)}


def synthetic_data(n_train=512, n_test=256, num_classes=10, size=32, seed=0):
    """A learnable CIFAR stand-in: each image its class's smooth colour pattern plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(size, size),
                             mode='bilinear', align_corners=False)

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = patterns[y] * 160 + 48 + 48 * torch.randn(n, 3, size, size, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), y

    (train_x, train_y), (test_x, test_y) = draw(n_train), draw(n_test)
    return Data(train_x, train_y, test_x, test_y, [f'class{c}' for c in range(num_classes)])


def load_cifar(name, data_dir):
    """CIFAR-10/100 through torchvision: read from data_dir, downloaded there on first use."""
    import torchvision
    cls = torchvision.datasets.CIFAR100 if name == 'cifar100' else torchvision.datasets.CIFAR10
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the download chatter stays off stdout
            train, test = (cls(data_dir, train=t, download=True) for t in (True, False))
    except Exception as e:  # offline, partial or corrupt download
        archive = 'cifar-100-python.tar.gz' if name == 'cifar100' else 'cifar-10-python.tar.gz'
        raise UsageError(f'cannot load {name} from --data-dir {data_dir} ({type(e).__name__}: '
                         f'{e}); offline, put {archive} (or its extracted folder) into {data_dir}, '
                         'or use --dataset folder') from None
    def as_tensors(s):
        return torch.from_numpy(s.data), torch.tensor(s.targets, dtype=torch.int64)

    return Data(*as_tensors(train), *as_tensors(test), list(train.classes))


def load_folder(root):
    """ImageFolder root/{train,test}/<class>/<image>, any mode (made RGB), all of one size."""
    import numpy as np
    import torchvision
    from PIL import Image
    root, sets = Path(root), {}
    for split in ('train', 'test'):
        if not (root / split).is_dir():
            raise UsageError(f'--data-dir {root} has no {split}/ folder: expected '
                             f'{root}/train/<class>/<image> and {root}/test/<class>/<image>')
        try:
            sets[split] = torchvision.datasets.ImageFolder(str(root / split))
        except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
            raise UsageError(f'{root / split}: {e}') from None
    if sets['train'].classes != sets['test'].classes:
        only = sorted(set(sets['train'].classes) ^ set(sets['test'].classes))
        raise UsageError(f'{root}: train/ and test/ have different classes (in one only: '
                         f'{", ".join(only) or "none; the order differs"}); give both the same')
    # One process, one image at a time (0.2 ms per CIFAR JPEG): threads only queue on the GIL
    # (slower with 2 and with 16), and a process pool would impose a start method on every caller.
    out, first = [], None
    for split in ('train', 'test'):
        images = []
        for path, _ in sets[split].samples:
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert('RGB')))
            except Exception as e:
                raise UsageError(f'cannot read image {path} ({type(e).__name__}: {e}); '
                                 'remove or replace it') from None
            first = first or (path, images[-1].shape)
            if images[-1].shape != first[1]:
                raise UsageError(f'{path} is {images[-1].shape[1]}×{images[-1].shape[0]} but '
                                 f'{first[0]} is {first[1][1]}×{first[1][0]}: all images must '
                                 'share one size; resize them')
        out += [torch.from_numpy(np.stack(images)),
                torch.tensor(sets[split].targets, dtype=torch.int64)]
    return Data(*out, list(sets['train'].classes))


def first_per_class(data, n):
    """`data` with the first n training images of each class (a UsageError if a class has fewer)."""
    counts = torch.bincount(data.train_y, minlength=data.num_classes)
    if counts.min() < n:
        c = int(counts.argmin())
        raise UsageError(f'--train-per-class {n}: class {data.classes[c]!r} has only '
                         f'{int(counts[c])} training images; give at most {int(counts.min())}')
    keep = torch.zeros(len(data.train_y), dtype=torch.bool)
    for c in range(data.num_classes):
        keep[(data.train_y == c).nonzero()[:n, 0]] = True
    return replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep])


@functools.lru_cache(maxsize=1)  # several runs in one process (reproduce drivers) decode once
def load_data(name, data_dir):
    """The data set named by --dataset (its tensors are shared: treat them as read-only)."""
    if name == 'synthetic':
        return synthetic_data()
    return load_folder(data_dir) if name == 'folder' else load_cifar(name, data_dir)


def channel_stats(images):
    """Exact per-channel mean and std of uint8 N×H×W×3 images on the 0..1 scale (histograms)."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[-1]):
        counts = torch.bincount(images[..., c].reshape(-1).cpu(), minlength=256).double()
        m = (counts * levels).sum() / counts.sum()
        mean.append(m.item())
        std.append(((counts * (levels - m) ** 2).sum() / counts.sum()).sqrt().item())
    return mean, std


def augment(images, pad=PAD, generator=None, rotate=0):
    """torchvision's RandomCrop(size, padding=pad), RandomHorizontalFlip() and, with rotate > 0,
    RandomRotation(rotate), in that order (pytorch-cifar100's), per image of a uint8 N×H×W×C batch
    on its device (torchvision's transforms draw one crop, flip or angle per call)."""
    n, h, w, _ = images.shape
    dev = images.device
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    flip = torch.randint(0, 2, (n, 1), device=dev, generator=generator).bool()
    rows = top + torch.arange(h, device=dev)
    cols = left + torch.where(flip, torch.arange(w - 1, -1, -1, device=dev),
                              torch.arange(w, device=dev))
    out = padded[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if rotate:  # drawn only when asked: runs without rotation keep their random streams
        angles = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * rotate
        out = rotate_images(out, angles)
    return out


def rotate_images(images, angles):
    """Each image of a uint8 N×H×W×C batch turned by its angle (degrees, anticlockwise) about its
    centre: torchvision's tensor rotate() (nearest, corners 0, size kept) in one grid_sample."""
    n, h, w, _ = images.shape
    dev = images.device
    rad = angles.double().deg2rad()  # the map in float64, then float32, as torchvision builds it
    cos, sin, zero = rad.cos().float(), rad.sin().float(), torch.zeros(n, device=dev)
    # output pixel (x, y) about the centre, y down, reads the input at (x·cos − y·sin, x·sin +
    # y·cos), scaled to grid_sample's [−1, 1]
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(n, 2, 3)
    xs = torch.linspace(0.5 - w / 2, w / 2 - 0.5, w, device=dev)
    ys = torch.linspace(0.5 - h / 2, h / 2 - 0.5, h, device=dev)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=dev)],
                       -1).view(1, h * w, 3)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2)
                                      / torch.tensor([w / 2, h / 2], device=dev))
    out = F.grid_sample(images.permute(0, 3, 1, 2).float(), grid.view(n, h, w, 2),
                        mode='nearest', padding_mode='zeros', align_corners=False)
    return out.to(torch.uint8).permute(0, 2, 3, 1)


def normalize(images, mean, std, memory_format=torch.contiguous_format):
    """uint8 N×H×W×3 → float N×3×H×W, (x/255 − mean)/std: torchvision's ToTensor then Normalize. The
    pixels are in channels_last order already, so that layout (the fast one) costs no copy."""
    # as_tensor copies nothing when mean and std live on the device (inside a CUDA graph capture)
    scale = torch.as_tensor(std, dtype=torch.float32,
                            device=images.device).reciprocal().div(255).view(1, -1, 1, 1)
    shift = -torch.as_tensor(mean, dtype=torch.float32,
                             device=images.device).view(1, -1, 1, 1) * scale * 255
    return (images.permute(0, 3, 1, 2).float() * scale
            + shift).contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------------------------- models
# CIFAR-style nets (METHOD.md §2): 3×3 stem with stride 1, no max-pool; an nn.Sequential of named
# stages, so a cut is a stage name. At width 64 layerK ends at the same shape in all three nets:
# layer1 64×32×32, layer2 128×16×16, layer3 256×8×8, layer4 512×4×4.
class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()  # identity, or a 1×1 conv + BN where the shape changes
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(blocks, num_classes=100, width=64):
    """CIFAR ResNet: stages of width·(1, 2, 4, 8) channels, `blocks` BasicBlocks each."""
    stages = {'stem': nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU())}
    c_in = width
    for k, n in enumerate(blocks):
        c = width * 2 ** k
        stages[f'layer{k + 1}'] = nn.Sequential(*[BasicBlock(c_in if b == 0 else c, c,
                                                             2 if b == 0 and k > 0 else 1)
                                                  for b in range(n)])
        c_in = c
    stages['head'] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(c_in, num_classes))
    return nn.Sequential(OrderedDict(stages))


def separable(c_in, c_out, stride):
    """MobileNetV1 block: depthwise 3×3 (no bias) + BN + ReLU, pointwise 1×1 (bias) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                         nn.BatchNorm2d(c_in), nn.ReLU(),
                         nn.Conv2d(c_in, c_out, 1, bias=True), nn.BatchNorm2d(c_out), nn.ReLU())


def mobilenet_v1(num_classes=100, width=64):
    """CIFAR MobileNetV1 (width 64): 32, 64, 128/2, 128, 256/2, 256, 512/2, 512×5, 1024/2, 1024."""
    def c(n):
        return max(1, n * width // 64)

    stages = {'stem': nn.Sequential(nn.Conv2d(3, c(32), 3, 1, 1, bias=False), nn.BatchNorm2d(c(32)),
                                    nn.ReLU()),
              'layer1': separable(c(32), c(64), 1),
              'layer2': nn.Sequential(separable(c(64), c(128), 2), separable(c(128), c(128), 1)),
              'layer3': nn.Sequential(separable(c(128), c(256), 2), separable(c(256), c(256), 1)),
              'layer4': nn.Sequential(separable(c(256), c(512), 2),
                                      *[separable(c(512), c(512), 1) for _ in range(5)]),
              'layer5': nn.Sequential(separable(c(512), c(1024), 2),
                                      separable(c(1024), c(1024), 1)),
              'head': nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(c(1024), num_classes))}
    return nn.Sequential(OrderedDict(stages))


MODELS = {'res18': lambda num_classes, width: resnet((2, 2, 2, 2), num_classes, width),
          'res34': lambda num_classes, width: resnet((3, 4, 6, 3), num_classes, width),
          'mbv1': mobilenet_v1}


def build(name, num_classes=100, width=64):
    """The net `name`: res18, res34 or mbv1 (width 64: the published size; smaller widths for fast
    tests), or tv:ARCH, torchvision's classification model ARCH untrained (no width)."""
    if name.startswith('tv:'):
        import torchvision
        if name[3:] not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f'{name}: torchvision has no classification model {name[3:]!r} '
                             '(torchvision.models.list_models() lists them)')
        return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}: choose from {", ".join(MODELS)} or tv:ARCH')
    return MODELS[name](num_classes, width)


def num_params(module):
    """Parameters, frozen or not: the count of METHOD.md §2's table."""
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------- XML for any two nets: the copyable block
# The method for a pair, needing nothing but torch: copy this section whole into another codebase.
# split() cuts a net, tracing (torch.fx) only the modules that hold the cut; pair_stitches() joins
# cuts whose channels differ; xml_pair_losses() and routed_backward() are one training step;
# cross_accuracy() scores the four paths. Tests check that the block, pasted alone, computes what
# the general step computes.
import contextlib  # noqa: E402 (the block's own imports, so that it copies whole)
import operator  # noqa: E402
import re  # noqa: E402
from collections import OrderedDict  # noqa: E402
import torch  # noqa: E402
import torch.fx  # noqa: E402
from torch import nn  # noqa: E402
from torch.fx.passes.split_module import split_module  # noqa: E402


def first_line(error, n=160):
    """The first line of an exception's message, without terminal colours, at most n characters."""
    return re.sub(r'\x1b\[[0-9;]*m', '', str(error)).strip().split('\n')[0][:n]


@contextlib.contextmanager
def eval_mode(modules):
    """Inside: every module in eval mode; afterwards each back in the mode it was in."""
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class CutTracer(torch.fx.Tracer):
    """torch.fx's tracer, entering only the submodules named in `enter` (None: all but those in
    `leaves` and torch.nn's own); every other submodule is one node, whatever its forward does (a
    module built in forward, data-dependent control flow). `inside`: the modules being entered."""

    def __init__(self, enter=None, leaves=()):
        super().__init__()
        self.enter, self.leaves, self.inside = enter, set(leaves), []

    def is_leaf_module(self, module, name):
        if self.enter is not None:
            return name not in self.enter
        return name in self.leaves or super().is_leaf_module(module, name)

    def call_module(self, module, forward, args, kwargs):
        self.inside.append(self.path_of_module(module))
        out = super().call_module(module, forward, args, kwargs)
        self.inside.pop()  # (left in place by an exception: it names where tracing failed)
        return out


class TraceError(ValueError):
    """torch.fx cannot trace `module` (a submodule's name; '' for the model's own forward)."""

    def __init__(self, message, module):
        super().__init__(message)
        self.module = module


def trace(model, enter=None, leaves=()):
    """The torch.fx graph of model.forward, entering the submodules as CutTracer does; a TraceError
    naming the module fx cannot trace, or whose traced graph depends on self.training (functional
    dropout: fx would freeze the traced mode)."""
    graphs = []
    with eval_mode([model]):  # which puts every module back in its mode afterwards
        for training in (True, False):
            model.train(training)
            tracer = CutTracer(enter, leaves)
            try:
                graphs.append(tracer.trace(model))
            except Exception as e:  # data-dependent control flow, an untraceable call
                where = tracer.inside[-1] if tracer.inside else ''
                what = (f'{where} ({type(model.get_submodule(where)).__name__}) of ' if where
                        else '') + type(model).__name__
                raise TraceError(f'torch.fx cannot trace {what} ({type(e).__name__}: '
                                 f'{first_line(e, 120)}); ' + 'cut outside it, or ' * bool(where)
                                 + 'split it by hand into modules', where) from None
    differ = next((a for a, b in zip(graphs[0].nodes, graphs[1].nodes)
                   if a.format_node() != b.format_node()), None)
    if differ is not None or len(graphs[0].nodes) != len(graphs[1].nodes):
        stack = differ.meta.get('nn_module_stack', {}) if differ is not None else {}
        where = list(stack.values())[-1][0] if stack else ''  # the innermost module that differs
        raise TraceError(f'{where or type(model).__name__}.forward depends on self.training '
                         '(functional dropout?), which a traced split would freeze; '
                         + 'cut outside it, or ' * bool(where) + 'split it by hand into modules',
                         where)
    return graphs[0]


def op_name(node):
    """The name of the method or function a traced node calls ('relu_', 'flatten', 'iadd', …)."""
    return node.target if isinstance(node.target, str) else getattr(node.target, '__name__', '')


def written(node, root):
    """The argument `node` writes in place (x += y, x.add_(y), ReLU(inplace=True)), else None."""
    if node.op == 'call_module':  # one with children is a cut kept whole: look inside
        module = root.get_submodule(node.target)
        in_place = (getattr(module, 'inplace', False) is True
                    or bool(module._modules) and writes_input(module))
    else:
        name = op_name(node)
        in_place = (name.endswith('_') and not name.endswith('__')
                    or node.kwargs.get('inplace') is True
                    or node.target in (operator.iadd, operator.isub, operator.imul,
                                       operator.itruediv))
    return node.args[0] if in_place and node.args else None


# what may return its input or share its memory: writing into the result writes into the input
VIEWS = {'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'permute', 'transpose',
         't', 'squeeze', 'unsqueeze', 'expand', 'expand_as', 'contiguous', 'detach', 'narrow',
         'select', 'chunk', 'split', 'unbind', 'movedim', 'getitem', 'to', 'type', 'type_as',
         'float', 'half', 'double', 'bfloat16', 'cpu', 'cuda', 'unfold', 'diagonal', 'as_strided',
         'swapaxes',
         'swapdims', 'dropout'}
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def changed_in_place(node, root):
    """True where a traced node writes into node's output in place, directly or through a view or a
    module that may return its input (nn.Identity, nn.Flatten, dropout in eval mode)."""
    same, todo = [], [node]
    while todo:
        same.append(todo.pop())
        todo += [u for u in same[-1].users if u.args and u.args[0] is same[-1] and (  # not h.shape
                 u.op in ('call_method', 'call_function') and op_name(u) in VIEWS
                 or u.op == 'call_module'
                 and isinstance(root.get_submodule(u.target), ALIAS_MODULES))]
    return any(written(u, root) in same for n in same for u in n.users)


def writes_input(module):
    """True where module's forward writes into its input (untraceable: False; run_paths checks)."""
    try:
        graph = CutTracer().trace(module)
    except Exception:
        return False
    return changed_in_place(next(n for n in graph.nodes if n.op == 'placeholder'), module)


def assign_parts(nodes, at, cuts, root):
    """{node: its part} for the traced `nodes` of `root` cut at the nodes `at` (the outputs of
    `cuts`): the first cut a node is needed for, else the last part; a ValueError where that is not
    a chain of parts, each reading only the previous part's output and leaving it unchanged."""
    what, part = type(root).__name__, {}
    for k, cut_node in enumerate(at):
        todo = [cut_node]
        while todo:
            n = todo.pop()
            if n not in part:
                part[n] = k
                todo += n.all_input_nodes
    for n in nodes:
        part.setdefault(n, len(at))
    if any(part[cut_node] != k for k, cut_node in enumerate(at)):
        raise ValueError(f'cuts {", ".join(cuts)}: give them in the order forward computes them')
    for k, c in enumerate(cuts):
        if not any(part[n] == k + 1 and n.op not in ('output', 'placeholder') for n in nodes):
            raise ValueError(f'cannot cut {what} at {c!r}: nothing is computed after it before the '
                             'next cut or the output')
    for n in nodes:
        late = [u for u in n.users
                if part[u] > part[n] and not (n in at and part[u] == part[n] + 1)]
        if late:
            raise ValueError(f'cannot cut {what} at {cuts[part[n]]!r}: {n.name}, computed before '
                             f'it, is used after it by {late[0].name} (a skip connection across '
                             'the cut?); cut where nothing but the cut\'s own output crosses')
    for c, cut_node in zip(cuts, at):
        if changed_in_place(cut_node, root):
            raise ValueError(f'cannot cut {what} at {c!r}: the next operation changes its output '
                             'in place, so one down-half would change what the other reads; cut '
                             'after it')
    return part


def split_parts(model, cuts):
    """The model cut at the outputs of the submodules named in `cuts` (in forward's order): P =
    len(cuts) + 1 parts, part_P(…part_1(x)) == model(x), sharing its modules. A model whose forward
    is nn.Sequential's, cut at its children, is sliced; any other is traced by torch.fx, so its
    forward may flatten or pool functionally and register children in any order. A ValueError says
    why a cut cannot be made: not a submodule, called twice, out of order, nothing after it, a skip
    connection across it, its output changed in place after it, or a forward fx cannot trace."""
    cuts, children, what = list(cuts), list(model._modules.items()), type(model).__name__
    inner = [(a, b) for a in cuts for b in cuts
             if a == b and cuts.count(a) > 1 or b.startswith(a + '.')]
    if inner:
        a, b = inner[0]
        raise ValueError(f'cuts {a} and {b}: ' + ('the same cut twice' if a == b else
                                                  'one holds the other') + '; cut each point once')
    names = [name for name, _ in children]
    if type(model).forward is nn.Sequential.forward and all(c in names[:-1] for c in cuts):
        ends = [names.index(c) + 1 for c in cuts]
        if ends == sorted(set(ends)):
            bounds = [0] + ends + [len(names)]
            parts = [nn.Sequential(OrderedDict(children[a:b])) for a, b in zip(bounds, bounds[1:])]
            if not any(writes_input(part) for part in parts[1:]):  # else the trace below says why
                return parts
    # enter only the cuts' ancestors: whatever the other modules do inside stays inside
    ancestors = {c.rsplit('.', k)[0] for c in cuts for k in range(1, c.count('.') + 1)}
    traced = torch.fx.GraphModule(model, trace(model, enter=ancestors))
    nodes, at = list(traced.graph.nodes), []
    for c in cuts:
        found = [n for n in nodes if n.op == 'call_module' and n.target == c]
        if len(found) != 1:
            raise ValueError(f'cannot cut {what} at {c!r}: ' + (
                'forward calls it more than once' if found else
                'no submodule of that name is called in forward'))
        at.append(found[0])
    part = assign_parts(nodes, at, cuts, model)
    whole = split_module(traced, model, lambda n: part[n])
    return [getattr(whole, f'submod_{k}') for k in range(len(at) + 1)]


def split(model, cut):
    """(up, down) with down(up(x)) == model(x): split_parts(model, [cut])."""
    return tuple(split_parts(model, [cut]))


@torch.no_grad()
def cut_names(model, image_size=32):
    """{name: C×H×W of its output on one image} for every submodule `model` can be cut at (split
    works, a feature map, parameters follow), in forward's order, each point once (its outermost
    name), from one forward with hooks and a trace keeping whole each module fx cannot enter."""
    p, shapes, calls = next(model.parameters()), {}, {}

    def record(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    try:
        with eval_mode([model]):
            model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    leaves = set()
    while True:  # each module fx cannot enter becomes one node, and the trace starts again
        try:
            nodes = list(trace(model, leaves=leaves).nodes)
            break
        except TraceError as e:
            if not e.module or e.module in leaves:  # the model's own forward: nothing to cut
                raise
            leaves.add(e.module)
    last, cuts = {}, {}
    for n in nodes:  # each submodule's output: the last node traced inside it
        for name in n.meta.get('nn_module_stack', {}):
            last[name] = n
    order = {n: k for k, n in enumerate(nodes)}
    for name, n in sorted(last.items(), key=lambda item: (order[item[1]], item[0].count('.'))):
        if n not in cuts.values() and calls.get(name) == 1 and shapes[name] is not None \
                and len(shapes[name]) == 3:
            try:
                part = assign_parts(nodes, [n], [name], model)
            except ValueError:
                continue
            if any(part[m] == 1 and (m.op == 'get_attr' or m.op == 'call_module' and any(
                    True for _ in model.get_submodule(m.target).parameters())) for m in nodes):
                cuts[name] = n
    return {name: shapes[name] for name in cuts}


def stitch(c_in, c_out):
    """A stitching layer (as in SN-Net) from a feature of c_in channels to the c_out channels a
    down-half reads: 1×1 convolution + BatchNorm. The stitch into down_b belongs to net b."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def shape_text(shape):
    return '×'.join(map(str, shape))


def stitch_between(shape_a, shape_b, what='the two features'):
    """stitch(C_a, C_b) from a feature of shape C_a×H×W into a part that reads C_b×H×W, None where
    the shapes agree; a ValueError naming both shapes where heights or widths differ."""
    if tuple(shape_a) == tuple(shape_b):
        return None
    if len(shape_a) != 3 or tuple(shape_a[1:]) != tuple(shape_b[1:]):
        raise ValueError(f'{what} differ in more than channels ({shape_text(shape_a)} and '
                         f'{shape_text(shape_b)}); choose cuts of the same height and width')
    return stitch(shape_a[0], shape_b[0])


@torch.no_grad()
def pair_stitches(up1, up2, image_size=32):
    """(stitch12, stitch21) for two up-halves, nn.Identity() where their features agree (so a caller
    treats both cases alike), from a probe forward of each on a blank image in eval mode (no running
    statistic changes). stitch12 is net 2's (put it in net 2's optimizer), stitch21 net 1's."""
    p = next(up1.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    with eval_mode([up1, up2]):
        s1, s2 = up1(x).shape[1:], up2(x).shape[1:]
    made = [stitch_between(a, b, "the up-halves' features") for a, b in ((s1, s2), (s2, s1))]
    return tuple(nn.Identity() if m is None else m.to(device=p.device, dtype=p.dtype) for m in made)


def crossed(f1, f2, stitch12=None, stitch21=None):
    """(up_1's feature as down_2 reads it, up_2's as down_1 reads it), through the stitches where
    given; a one-line ValueError where a down-half would get another shape than its up-half's."""
    g12, g21 = (f if s is None else s(f) for s, f in ((stitch12, f1), (stitch21, f2)))
    for g, f, a, b, s in ((g12, f2, 1, 2, stitch12), (g21, f1, 2, 1, stitch21)):
        if g.shape[1:] != f.shape[1:]:
            raise ValueError(f'down_{b} reads {shape_text(f.shape[1:])} from up_{b} but would get '
                             f'{shape_text(g.shape[1:])} from up_{a}'
                             + ('' if s is None else f' through stitch{a}{b}')
                             + '; join them with pair_stitches(up1, up2)')
    return g12, g21


def xml_pair_losses(up1, down1, up2, down2, x, labels, T=1.0, mean=False, stitch12=None,
                    stitch21=None):
    """XML (METHOD.md §3), z_ab = down_b(up_a(x)): L_1 = Σ_{p ∈ 11, 12, 21} [CE(z_p, y) +
    KL(z_22‖z_p)], L_2 = Σ_{p ∈ 12, 21, 22} [CE(z_p, y) + KL(z_11‖z_p)]; KL at T times T², its
    target detached; mean=True divides by the 3 paths. Where channels differ, stitch12 carries
    up_1's feature into down_2 (it is net 2's: put it in net 2's optimizer) and stitch21 up_2's into
    down_1 (net 1's). Each half runs once per distinct input: BatchNorm updates once per input."""
    def kl(target, z):  # T² · batch mean of KL(softmax(target/T) ‖ softmax(z/T))
        log_t = torch.log_softmax(target.detach() / T, dim=1)
        return (log_t.exp() * (log_t - torch.log_softmax(z / T, dim=1))).sum(1).mean() * T * T

    ce = torch.nn.functional.cross_entropy
    f1 = up1(x)
    made = f1._version  # bumped by any in-place write, through views too
    z11, f2 = down1(f1), up2(x)  # (down-halves draw dropout in the order of xml_ref.py's step)
    made = made, f2._version
    g12, g21 = crossed(f1, f2, stitch12, stitch21)
    z12, z21, z22 = down2(g12), down1(g21), down2(f2)
    if (f1._version, f2._version) != made:
        raise ValueError('a down-half changed its input in place, so another path read a changed '
                         'feature; make that operation out of place or cut after it')
    loss1 = sum(ce(z, labels) + kl(z22, z) for z in (z11, z12, z21))
    loss2 = sum(ce(z, labels) + kl(z11, z) for z in (z12, z21, z22))
    return (loss1 / 3, loss2 / 3) if mean else (loss1, loss2)


def routed_backward(losses, optimizers):
    """Gradient routing (METHOD.md §3): L_i is differentiated with respect to optimizers[i]'s
    parameters only, so in z_12 L_1 trains up_1 through a fixed down_2 and L_2 trains down_2 on a
    fixed up_1 feature (one backward of L_1 + L_2 would train down_2 on L_1 too); then step them."""
    for n, (loss, opt) in enumerate(zip(losses, optimizers)):
        opt.zero_grad(set_to_none=True)
        params = [p for group in opt.param_groups for p in group['params']]
        loss.backward(inputs=params, retain_graph=n + 1 < len(losses))


@torch.no_grad()
def cross_accuracy(up1, down1, up2, down2, batches, stitch12=None, stitch21=None):
    """Top-1 (%) of the four paths over `batches` of (images, labels), moved to the nets' device,
    in eval mode: acc[a][b] for z_(a+1)(b+1), with the shared BatchNorm statistics. down_b sees
    both features in training, so its running statistics mix the two, and a path meets statistics
    of a feature it is not given (on CIFAR-10 this cost XML up to 28 points): xml_ref.py's
    OwnBatchNorm (not in this block) keeps each path's own beside them."""
    dev, right, n = next(up1.parameters()).device, [[0, 0], [0, 0]], 0
    with eval_mode([m for m in (up1, down1, up2, down2, stitch12, stitch21) if m is not None]):
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            f1, f2 = up1(x), up2(x)
            g12, g21 = crossed(f1, f2, stitch12, stitch21)
            for a, b, z in ((0, 0, down1(f1)), (0, 1, down2(g12)), (1, 0, down1(g21)),
                            (1, 1, down2(f2))):
                right[a][b] += (z.argmax(1) == y).sum().item()
            n += len(y)
    return [[100.0 * r / n for r in row] for row in right]


# ---------------------------------------------------------------------------------- cuts of K nets
def default_cut(names):
    """The deck's cut: after stage 3 (256×8×8) for a pair with MobileNetV1, else after stage 2."""
    return 'layer3' if 'mbv1' in names else 'layer2'


@torch.no_grad()
def feature_shapes(parts, image_size=32):
    """shapes[i][c]: C×H×W of net i's feature at its cut c + 1, for one image."""
    p, shapes = next(parts[0][0].parameters()), []
    with eval_mode([part for net in parts for part in net]):
        for net in parts:
            h = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
            shapes.append([tuple((h := part(h)).shape[1:]) for part in net[:-1]])
    return shapes


def stitch_key(a, b, c):
    """The name of the stitch from net a's feature at cut c (1-based) into net b's next part."""
    return f'{a + 1}>{b + 1}@{c}'


def make_stitches(shapes, names):
    """{stitch_key(a, b, c): stitch} for each cut c and nets a ≠ b whose channels differ there."""
    stitches = nn.ModuleDict()
    for c in range(len(shapes[0])):
        for a, b in itertools.permutations(range(len(shapes)), 2):
            made = stitch_between(shapes[a][c], shapes[b][c],
                                  f'the features of {names[a]} and {names[b]} at cut {c + 1}')
            if made is not None:
                stitches[stitch_key(a, b, c + 1)] = made
    return stitches


def stitches_into(stitches, b):
    """The stitches that belong to net b (they feed its parts)."""
    return [s for key, s in stitches.items() if int(key.split('>')[1].split('@')[0]) == b + 1]


# ----------------------------------------------------------------------------------------- losses
# Pure functions of logits and features; every KL target is detached (METHOD.md §1). Under bf16
# autocast log_softmax, cross_entropy and mse_loss compute in fp32; in fp64 they stay fp64 (tests).
def kl_div(target_logits, logits, T=1.0):
    """KL(t‖s) at T: T²·mean_batch Σ_c softmax(t/T)·log(softmax(t/T)/softmax(s/T)), t detached."""
    log_t = F.log_softmax(target_logits.detach() / T, dim=1)
    log_s = F.log_softmax(logits / T, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * T * T


def kd_loss(logits, teacher_logits, labels, T=4.0):
    """Knowledge distillation (Hinton et al. 2015): CE(z_s, y) + KL(z_t‖z_s) at temperature T."""
    return F.cross_entropy(logits, labels) + kl_div(teacher_logits, logits, T)


def hint_loss(regressed, teacher_feature):
    """FitNet hint (Romero et al. 2015): mean((r(up_s(x)) − up_t(x))²), the teacher's detached."""
    return F.mse_loss(regressed, teacher_feature.detach())


def dml_loss(logits, others, labels, T=1.0):
    """Deep Mutual Learning: CE(z_i, y) + mean_j KL(z_j‖z_i), z_j in `others`, the other nets'."""
    return F.cross_entropy(logits, labels) + sum(kl_div(t, logits, T) for t in others) / len(others)


def feature_l2(feature, other_feature):
    """The XML+L2 term: mean((up_i(x) − up_j(x))²), the other net's feature detached."""
    return F.mse_loss(feature, other_feature.detach())


def synthesis_loss(own, from_other, into_other):
    """The deck's Experience 1 for net i: BCE(s_ii, 1) + BCE(s_ji, 0) + BCE(s_ij, 1), s_ab the
    synthesis logit of down_b on up_a's feature (down_i tells its own up-half's feature from the
    other's; up_i makes down_j take its feature for down_j's own)."""
    bce = F.binary_cross_entropy_with_logits
    return (bce(own, torch.ones_like(own)) + bce(from_other, torch.zeros_like(from_other))
            + bce(into_other, torch.ones_like(into_other)))


def discriminator_loss(d_on_1, d_on_2):
    """The deck's Experience 2, for the discriminator D: BCE(D(up_1(x)), 1) + BCE(D(up_2(x)), 0),
    on features the caller detaches (D must not train the up-halves)."""
    bce = F.binary_cross_entropy_with_logits
    return bce(d_on_1, torch.ones_like(d_on_1)) + bce(d_on_2, torch.zeros_like(d_on_2))


def generator_loss(d_on_i, label_of_other):
    """Experience 2 for up_i: BCE(D(up_i(x)), the other net's label): look like the other net."""
    return F.binary_cross_entropy_with_logits(d_on_i,
                                              torch.full_like(d_on_i, float(label_of_other)))


def discriminator(channels):
    """Experience 2's discriminator on the cut feature: 3×3 conv + ReLU, pool, linear → a logit."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(channels, 1))


def regressor(c_student, c_teacher):
    """FitNet's regressor from the student's up-half feature to the teacher's: 3×3 conv + BN."""
    return nn.Sequential(nn.Conv2d(c_student, c_teacher, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(c_teacher))


# ------------------------------------------------------------------ K nets × P parts, all methods
# K nets, each cut into P parts: parts[i][k] is part k of net i (for a pair, parts[i] = [up_i,
# down_i]). A path is a tuple of net indices, one per part: path (a, b) runs up_a then down_b, so
# z_ab = out[(a, b)].
def pure_paths(K, P):
    """The K unbroken nets (i, i, …, i)."""
    return [(i,) * P for i in range(K)]


def all_paths(K, P):
    """All K^P paths, pure and crossed."""
    return list(itertools.product(range(K), repeat=P))


def prefix_modules(parts, q, stitches=None):
    """The modules that compute out[q] from out[q[:-1]]: part len(q) of net q[-1], after the stitch
    from net q[-2] where their features differ in channels."""
    k, part = len(q) - 1, parts[q[-1]][len(q) - 1]
    key = stitch_key(q[-2], q[-1], k) if k else None
    return [stitches[key], part] if stitches is not None and key in stitches else [part]


def all_modules(parts, stitches=None):
    """Every net's parts, then the stitches: what switches mode or freezes statistics together."""
    return [part for net in parts for part in net] + (list(stitches.values()) if stitches else [])


def run_paths(parts, x, paths, bn_source=None, out=None, stitches=None):
    """out[q] for every prefix q of every path: out[(a,)] = up_a(x), out[(a, b)] = z_ab. A shared
    prefix runs once, so BatchNorm statistics update once per distinct input. bn_source(q)
    (OwnBatchNorm's track or apply), if given, wraps computing out[q]; `out`: prefixes already
    computed. A ValueError where a part wrote into its input in place (split could not see it)."""
    def version(h):  # bumped by every in-place write, through views (inference tensors keep none)
        return None if h.is_inference() else h._version

    out = {**(out or {}), (): x}
    made = {q: version(h) for q, h in out.items()}
    for path in paths:
        for k in range(1, len(path) + 1):
            q = path[:k]
            if q not in out:
                h = out[q[:-1]]
                with bn_source(q) if bn_source else contextlib.nullcontext():
                    for module in prefix_modules(parts, q, stitches):
                        h = module(h)
                out[q], made[q] = h, version(h)
    changed = [q for q in made if version(out[q]) != made[q]]
    if changed:
        what = f'the output of path {path_name(changed[0])}' if changed[0] else 'the images'
        raise ValueError(f'a part changed its input ({what}) in place, so other paths read a '
                         'changed feature; make that operation out of place or cut after it')
    return out


def batchnorms(module):
    """The BatchNorm layers of `module` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class OwnBatchNorm:
    """Each path's own BatchNorm running statistics (METHOD.md §3): sets[q], for a prefix q of two
    or more nets, the (mean, var) of each BatchNorm in prefix_modules(…, q). Inside track(q) a
    training forward also updates sets[q] (F.batch_norm in a forward pre-hook, same batch and
    momentum, nothing else changed); inside apply(q) the part normalises with sets[q] if training
    updated it. The first part has one source, the images: its shared statistics are its own."""

    def __init__(self, parts, stitches=None):
        K, P = len(parts), len(parts[0])
        self.active = {}  # BatchNorm → (mean, var) being updated
        self.sets, self.updated, self.bns = {}, {}, {}  # bns[q]: the layers sets[q] belongs to
        for q in (q for k in range(2, P + 1) for q in itertools.product(range(K), repeat=k)):
            bns = [bn for m in prefix_modules(parts, q, stitches) for bn in batchnorms(m)]
            if any(bn.momentum is None for bn in bns):
                raise ValueError('OwnBatchNorm needs BatchNorm layers with a momentum (not None)')
            self.sets[q] = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
            self.updated[q], self.bns[q] = False, bns
        active = self.active  # a closure, not a bound method: deepcopy of a part copies no sets

        def update(bn, args):
            if bn in active and bn.training and bn.track_running_stats:
                with torch.no_grad():
                    F.batch_norm(args[0], *active[bn], None, None, True, bn.momentum, bn.eps)
        for bn in dict.fromkeys(bn for bns in self.bns.values() for bn in bns):
            bn.register_forward_pre_hook(update)

    @contextlib.contextmanager
    def track(self, q):
        """Training: prefix q's forward also updates sets[q] where its part tracks statistics."""
        if q not in self.sets:
            yield
            return
        bns = self.bns[q]
        if all(bn.training and bn.track_running_stats for bn in bns):
            self.updated[q] = True  # (a part without BatchNorm keeps nothing: its own is shared)
        self.active.update(zip(bns, self.sets[q]))
        try:
            yield
        finally:
            self.active.clear()

    @contextlib.contextmanager
    def apply(self, q):
        """Evaluation: prefix q's forward normalises with sets[q] (where training updated them)."""
        if q not in self.sets or not self.updated[q]:
            yield
            return
        bns = self.bns[q]
        shared = [(bn.running_mean, bn.running_var) for bn in bns]
        for bn, (mean, var) in zip(bns, self.sets[q]):
            bn.running_mean, bn.running_var = mean.to(bn.running_mean), var.to(bn.running_var)
        try:
            yield
        finally:
            for bn, (mean, var) in zip(bns, shared):
                bn.running_mean, bn.running_var = mean, var

    def fallback(self, path):
        """True where a part of `path` has no own statistics (never trained there, or frozen)."""
        return any(not self.updated[path[:k]] for k in range(2, len(path) + 1))

    def tensors(self, learners):
        """Every statistic of the nets `learners` (to average over processes)."""
        return [t for q, stats in self.sets.items() if q[-1] in learners
                for pair in stats for t in pair]

    def state_dict(self):
        return {path_name(q): {'updated': self.updated[q],
                               'stats': [t for pair in stats for t in pair]}
                for q, stats in self.sets.items()}

    def load_state_dict(self, state):
        """Copied into the existing tensors (a captured CUDA graph and the hooks read them)."""
        for q, stats in self.sets.items():
            if len(state[path_name(q)]['stats']) != 2 * len(stats):
                raise ValueError(f'path {path_name(q)} has {len(stats)} BatchNorm layers, the '
                                 'saved statistics another number (other nets, or older code)')
            self.updated[q] = state[path_name(q)]['updated']
            for t, s in zip((t for pair in stats for t in pair), state[path_name(q)]['stats']):
                t.copy_(s)


def step_paths(method, K, P, paths_per_step=None, rng=None):
    """The paths of a training step: the pure nets without crossing, every path for the XML family,
    or with paths_per_step = R the K pure paths and R crossed ones drawn at random."""
    if not method.startswith('xml'):
        return pure_paths(K, P)
    if paths_per_step is None:
        return all_paths(K, P)
    crossed = [p for p in all_paths(K, P) if len(set(p)) > 1]
    return pure_paths(K, P) + rng.sample(crossed, paths_per_step)


# One function per method: {i: L_i} for each net i in `learners` (the nets that learn), from the
# outputs `out` of run_paths on K nets cut into P parts. The deck's methods, then its experiments.
def independent_losses(out, labels, K, P, learners):
    """Each net alone: L_i = CE(z_ii, y)."""
    return {i: F.cross_entropy(out[(i,) * P], labels) for i in learners}


def kd_losses(out, labels, K, P, learners, T=4.0):
    """The student i of a pair: L_i = CE(z_ii, y) + KL(z_jj‖z_ii) at T, net j the frozen teacher."""
    return {i: kd_loss(out[(i,) * P], out[(1 - i,) * P], labels, T) for i in learners}


def dml_losses(out, labels, K, P, learners, T=1.0):
    """Deep Mutual Learning: L_i = CE(z_ii, y) + mean_{j≠i} KL(z_jj‖z_ii)."""
    pure = [out[p] for p in pure_paths(K, P)]
    return {i: dml_loss(pure[i], pure[:i] + pure[i + 1:], labels, T) for i in learners}


def xml_losses(out, labels, K, P, learners, T=1.0, path_weights='sum'):
    """XML: L_i = Σ_{p ∋ i} [CE(z_p, y) + mean_{j≠i} KL(z_jj‖z_p)] over the paths run that hold a
    part of net i ('mean': ÷ their number). For a pair: xml_pair_losses."""
    pure, losses = [out[p] for p in pure_paths(K, P)], {}
    for i in learners:  # each of net i's paths is a DML term
        terms = [dml_loss(z, pure[:i] + pure[i + 1:], labels, T)
                 for p, z in out.items() if len(p) == P and i in p]
        losses[i] = sum(terms) / len(terms) if path_weights == 'mean' else sum(terms)
    return losses


def xml_l2_losses(out, labels, K, P, learners, T=1.0, path_weights='sum', l2_weight=1.0):
    """The deck's Experience 0: XML + λ · mean over cuts c and other nets j of mean((f_i^c −
    f_j^c)²), f_i^c the output of net i's first c parts (a pair: λ·mean((up_i(x) − up_j(x))²))."""
    losses = xml_losses(out, labels, K, P, learners, T, path_weights)
    for i in learners:
        l2 = sum(feature_l2(out[(i,) * c], out[(j,) * c])
                 for c in range(1, P) for j in range(K) if j != i)
        losses[i] = losses[i] + l2_weight * l2 / ((K - 1) * (P - 1))
    return losses


def xml_disc_losses(out, labels, K, P, learners, T=1.0, path_weights='sum', adv_weight=0.1):
    """The deck's Experience 1 (a pair): each down-half has one output more, its synthesis score
    s_ab; XML on the class logits + adv_weight · synthesis_loss(s_ii, s_ji, s_ij)."""
    scores = {p: z[:, -1] for p, z in out.items() if len(p) == P}
    out = {p: z[:, :-1] if len(p) == P else z for p, z in out.items()}
    losses = xml_losses(out, labels, K, P, learners, T, path_weights)
    for i in learners:
        j = 1 - i
        losses[i] = losses[i] + adv_weight * synthesis_loss(scores[(i, i)], scores[(j, i)],
                                                            scores[(i, j)])
    return losses


def xml_gan_losses(out, labels, K, P, learners, discriminator, T=1.0, path_weights='sum',
                   adv_weight=0.1):
    """The deck's Experience 2 (a pair): XML + adv_weight · generator_loss (up_i makes D take its
    feature for the other's); with 'discriminator' in `learners` D's loss on detached features."""
    losses = xml_losses(out, labels, K, P, [i for i in learners if i != 'discriminator'], T,
                        path_weights)
    for i in list(losses):
        losses[i] = losses[i] + adv_weight * generator_loss(discriminator(out[(i,)]).squeeze(1),
                                                            i == 1)
    if 'discriminator' in learners:
        losses['discriminator'] = discriminator_loss(discriminator(out[(0,)].detach()).squeeze(1),
                                                     discriminator(out[(1,)].detach()).squeeze(1))
    return losses


LOSSES = {'independent': independent_losses, 'kd': kd_losses, 'dml': dml_losses, 'xml': xml_losses,
          'xml+l2': xml_l2_losses, 'xml+disc': xml_disc_losses, 'xml+gan': xml_gan_losses}


@contextlib.contextmanager
def frozen_bn_stats(modules):
    """Inside: train-mode BatchNorm normalises with batch statistics, leaving its running ones."""
    bns = [bn for module in modules for bn in batchnorms(module)]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def distributed():
    """True in a torchrun job of several processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def step_optimizers(optimizers):
    """optimizer.step() for each; under torchrun each gradient first becomes its mean over the ranks
    (as in DistributedDataParallel: the gradient of the mean loss over the whole batch, up to
    BatchNorm normalising each share with its own statistics), in one all-reduce per optimizer."""
    for opt in optimizers:
        if distributed():
            grads = [p.grad for group in opt.param_groups for p in group['params']
                     if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(mean.view_as(g))
        opt.step()


def train_step(parts, optimizers, x, labels, method, update='simultaneous', paths=None, *,
               paths_per_step=None, rng=None, disc_optimizer=None, own_bn=None, stitches=None,
               **loss_kw):
    """One step of each learning net (optimizers[i], with the stitches into net i; None: frozen) on
    `paths` (default: step_paths) with LOSSES[method](…, **loss_kw), and of xml+gan's discriminator
    (disc_optimizer); returns {i: L_i} (and 'discriminator'). simultaneous: one forward, each L_i
    routed to net i; sequential (DML's Algorithm 1): net 1 stepped on L_1, the paths run again
    (BatchNorm statistics not updated twice), net 2 on L_2, …. own_bn: an OwnBatchNorm to update."""
    K, P = len(parts), len(parts[0])
    paths = paths or step_paths(method, K, P, paths_per_step, rng)
    track = own_bn.track if own_bn is not None else None
    learners = {i: opt for i, opt in enumerate(optimizers) if opt is not None}
    if disc_optimizer is not None:
        learners['discriminator'] = disc_optimizer
    rounds = [list(learners)] if update == 'simultaneous' else [[k] for k in learners]
    losses = {}
    for n, keys in enumerate(rounds):
        with frozen_bn_stats(all_modules(parts, stitches)) if n else contextlib.nullcontext():
            out = run_paths(parts, x, paths, track, stitches=stitches)
        new = LOSSES[method](out, labels, K, P, keys, **loss_kw)
        routed_backward([new[k] for k in keys], [learners[k] for k in keys])
        step_optimizers([learners[k] for k in keys])
        losses.update({k: new[k].detach() for k in keys})
    return losses


def hint_step(student_up, teacher_up, regressor, optimizer, x, labels=None, student=0):
    """FitNet's stage 1: one step of the student's up-half and the regressor (`optimizer`) on
    hint_loss(regressor(up_s(x)), up_t(x)); returns {student: loss} (labels: unused)."""
    teacher_feature = teacher_up(x)
    loss = hint_loss(regressor(student_up(x)), teacher_feature)
    routed_backward([loss], [optimizer])
    step_optimizers([optimizer])
    return {student: loss.detach()}


def sgd(params, cfg, fused=False):
    """The recipe's optimizer; fused (one kernel for all parameters) on the GPU."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=fused)


def set_lr(optimizer, lr):
    """Set the lr, in place where it is a device tensor (which a captured CUDA graph reads)."""
    for group in optimizer.param_groups:
        if isinstance(group['lr'], torch.Tensor):
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


# ------------------------------------------------------------------------------------- evaluation
def path_name(path):
    """'1-2' for the 0-based path (0, 1): up-half of net 1, then down-half of net 2."""
    return '-'.join(str(i + 1) for i in path)


def conv_layout(models, device):
    """The memory format to train `models` in: channels_last, which cuDNN and oneDNN read fastest
    (the xml step 1.31x as fast as in NCHW: tools/cpu_layout.py), except on the CPU for nets with a
    strided 1x1 convolution of < 8 input channels a group: oneDNN's AVX2 kernel for its weight
    gradient in channels_last writes past its buffer and hangs, crashes or returns wrong numbers
    (github.com/uxlfoundation/oneDNN/issues/6035, open in torch 2.14; res18 at width 4 has one)."""
    hit = any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
              and m.in_channels // m.groups < 8 for model in models for m in model.modules())
    return torch.contiguous_format if hit and device.type == 'cpu' else torch.channels_last


def layout(module):
    """The memory format of `module`'s first convolution weight (set_up puts the nets in
    conv_layout's): inputs in that layout cost the convolutions no conversion."""
    w = next((p for p in module.parameters() if p.dim() == 4), None)
    return (torch.channels_last if w is not None and not w.is_contiguous()
            and w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def eval_batches(images, labels, mean, std, batch_size, device, fmt=torch.contiguous_format):
    """The test set in order: (normalised images in layout fmt, labels) on `device`."""
    for s in range(0, len(images), batch_size):
        yield (normalize(images[s:s + batch_size].to(device), mean, std, fmt),
               labels[s:s + batch_size].to(device))


@torch.no_grad()
def evaluate(parts, images, labels, mean, std, batch_size=500, fast=False, classes=None,
             own_bn=None, stitches=None):
    """On uint8 images N×H×W×3: top-1 (%) of every path, of the pure nets' ensemble (mean softmax),
    and the feature distance, the mean (f_i − f_j)² of every two nets' features at every cut where
    they have one shape (else None); with the shared BatchNorm statistics and, with own_bn, again
    under 'own_bn' with each path's own ('fallback': the paths training never ran). fast: bf16
    autocast. classes: the number of class logits, where down-halves output more (xml+disc's
    synthesis score: 'synthesis', its accuracy at telling the own up-half from the other)."""
    K, P = len(parts), len(parts[0])
    paths = all_paths(K, P)
    dev = next(parts[0][0].parameters()).device
    sources = {'shared': None, **({'own_bn': own_bn.apply} if own_bn is not None else {})}
    # per source: correct per path, then the ensemble; the summed squared feature distance
    counts = {s: torch.zeros(len(paths) + 1, device=dev, dtype=torch.int64) for s in sources}
    sq_dist = {s: torch.zeros((), device=dev, dtype=torch.float64) for s in sources}
    synthesis, n_dist = None, 0
    with eval_mode(all_modules(parts, stitches)), \
            torch.autocast(dev.type, torch.bfloat16, enabled=fast):
        for x, y in eval_batches(images, labels, mean, std, batch_size, dev, layout(parts[0][0])):
            ups = None  # the first parts have one source, the images: run once for both
            for s, bn_source in sources.items():
                out = run_paths(parts, x, paths, bn_source, ups, stitches)
                ups = {p: z for p, z in out.items() if len(p) == 1}
                if classes is not None and out[paths[0]].shape[1] > classes:  # xml+disc: > 0 is own
                    if s == 'shared':
                        right = torch.stack([((out[p][:, classes] > 0) == (len(set(p)) == 1)).sum()
                                             for p in paths])
                        synthesis = right if synthesis is None else synthesis + right
                    out.update({p: out[p][:, :classes] for p in paths})
                probs = sum(F.softmax(out[p].float(), 1) for p in pure_paths(K, P)) / K
                counts[s] += torch.stack([(z.argmax(1) == y).sum()
                                          for z in [out[p] for p in paths] + [probs]])
                for c in range(1, P):
                    for i, j in itertools.combinations(range(K), 2):
                        if out[(i,) * c].shape == out[(j,) * c].shape:
                            sq_dist[s] += (out[(i,) * c].float()
                                           - out[(j,) * c].float()).pow(2).sum()
                            n_dist += out[(i,) * c].numel() if s == 'shared' else 0

    def report(s):
        correct = counts[s].tolist()  # one host synchronisation for the whole test set
        return {**path_table({p: 100.0 * c / len(images) for p, c in zip(paths, correct)}, K, P),
                'ensemble': 100.0 * correct[-1] / len(images),
                'feature_distance': sq_dist[s].item() / n_dist if n_dist else None}
    result = report('shared')
    if synthesis is not None and P == 2:
        syn = dict(zip(paths, synthesis.tolist()))
        result['synthesis'] = [[100.0 * syn[(a, b)] / len(images) for b in range(K)]
                               for a in range(K)]
    if own_bn is not None:
        result['own_bn'] = {**report('own_bn'),
                            'fallback': [path_name(p) for p in paths if own_bn.fallback(p)]}
    return result


def path_table(acc, K, P):
    """Accuracies by path as reported: 'accuracy' of the pure nets, 'paths' by name, and for P = 2
    the 'cross' matrix, cross[a][b] = up-half of net a+1 → down-half of net b+1."""
    table = {'accuracy': [acc[p] for p in pure_paths(K, P)],
             'paths': {path_name(p): a for p, a in acc.items()}}
    if P == 2:
        table['cross'] = [[acc[(a, b)] for b in range(K)] for a in range(K)]
    return table


# ------------------------------------------------------------ the fast path: changes how, not what
class TrainStep:
    """Normalise a batch of augmented uint8 images, call fn(x, labels) → {learner: loss} (a partial
    of train_step or hint_step) and sum each loss on the device (loss_sum; first_bad: the first
    step, 1-based, whose loss was not finite, 0: none): nothing waits for the host. Optionally
    channels_last and bf16 autocast (losses, BatchNorm statistics, weights: fp32)."""

    def __init__(self, fn, learners, mean, std, device, *, bf16=False, channels_last=False):
        self.fn, self.bf16 = fn, bf16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean, self.std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
        self.loss_sum = {k: torch.zeros((), device=device) for k in learners}
        self.first_bad = {k: torch.zeros((), dtype=torch.int64, device=device) for k in learners}
        self.steps_done = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, images, labels):
        x = normalize(images, self.mean, self.std, self.memory_format)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            losses = self.fn(x, labels)
        self.steps_done += 1
        for k, loss in losses.items():
            self.loss_sum[k] += loss
            self.first_bad[k].copy_(torch.where((self.first_bad[k] == 0) & ~torch.isfinite(loss),
                                                self.steps_done, self.first_bad[k]))

    def new_epoch(self):
        for total in [*self.loss_sum.values(), *self.first_bad.values(), self.steps_done]:
            total.zero_()


class CudaGraphStep:
    """Around a TrainStep: after `warmup` real steps the whole step (forwards, routed backwards,
    optimizers, BatchNorm updates) is captured in a CUDA graph and replayed for each later batch:
    one launch instead of thousands (which bound these nets at batch 128). Needs the lr in a device
    tensor (graph_lr), fused optimizers, the same kernels each step, batches of one shape."""

    def __init__(self, step, batch_shape, device, warmup=3):
        self.step, self.warmup, self.captured, self.calls = step, warmup, None, 0
        self.images = torch.zeros(batch_shape, dtype=torch.uint8, device=device)
        self.labels = torch.zeros(batch_shape[0], dtype=torch.int64, device=device)

    def __getattr__(self, name):  # loss_sum, first_bad, new_epoch: the step's
        if name == 'step':  # (not yet set: a copy in the making)
            raise AttributeError(name)
        return getattr(self.step, name)

    def __call__(self, images, labels):
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.calls += 1
        if self.captured is None and self.calls <= self.warmup:  # real steps, on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.images, self.labels)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.captured is None:
            self.captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.captured):
                self.step(self.images, self.labels)  # recorded, not run
        self.captured.replay()


def graph_lr(optimizers, device):
    """Each optimizer's lr as a device tensor, which a replayed CUDA graph reads from memory."""
    for opt in optimizers:
        for group in opt.param_groups:
            group['lr'] = torch.tensor(float(group['lr']), device=device)


# ------------------------------------------------------------------------------------------- cost
# The deck's "Dynamic Computation" (METHOD.md §6): what each path costs, to pick one by budget.
def forward_flops(module, x):
    """(FLOPs of a forward of `module` on x, its output): 2 × multiply-adds (FlopCounterMode)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops(), out


@torch.no_grad()
def part_flops(parts, paths, image_size=32, stitches=None):
    """{prefix: forward FLOPs per image of its last part and the stitch before it} for `paths`."""
    p = next(parts[0][0].parameters())
    out, flops = {(): torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)}, {}
    with eval_mode(all_modules(parts, stitches)):
        for q in dict.fromkeys(path[:k] for path in paths for k in range(1, len(path) + 1)):
            flops[q], out[q] = forward_flops(nn.Sequential(*prefix_modules(parts, q, stitches)),
                                             out[q[:-1]])
    return flops


@torch.no_grad()
def latency_ms(modules, batch, image_size=32, fast=False, budget_s=0.1):
    """Median wall time (ms) of one forward of `modules` in order, eval mode, at `batch`."""
    # by hand: torch.utils.benchmark's Timer took 0.46 s a number (a summary times 2 per path)
    p = next(modules[0].parameters())
    x = torch.randn(batch, 3, image_size, image_size,
                    device=p.device).contiguous(memory_format=layout(modules[0]))
    sync = torch.cuda.synchronize if p.device.type == 'cuda' else (lambda: None)
    times = []
    with eval_mode(modules), torch.autocast(p.device.type, torch.bfloat16, enabled=fast):
        for k in range(60):
            sync()
            t = time.perf_counter()
            h = x
            for m in modules:
                h = m(h)
            sync()
            times.append(time.perf_counter() - t)
            if k >= 2 and sum(times[1:]) > budget_s:  # the first run warms up
                break
    return 1000 * sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def path_costs(parts, accuracy, image_size=32, fast=False, stitches=None):
    """Per path (with its stitches): top-1 (evaluate()'s 'paths'), parameters, GFLOPs per image,
    latency (ms) at batch 1 and 128; sorted by FLOPs, the Pareto front marked (no other path at most
    as costly and at least as accurate, better in one)."""
    K, P = len(parts), len(parts[0])
    flops = part_flops(parts, all_paths(K, P), image_size, stitches)
    rows = []
    for path in all_paths(K, P):
        modules = [m for k in range(1, P + 1) for m in prefix_modules(parts, path[:k], stitches)]
        rows.append({'path': path_name(path), 'accuracy': accuracy[path_name(path)],
                     'params': sum(num_params(m) for m in modules),
                     'gflops': sum(flops[path[:k]] for k in range(1, P + 1)) / 1e9,
                     'latency_ms_b1': latency_ms(modules, 1, image_size, fast),
                     'latency_ms_b128': latency_ms(modules, 128, image_size, fast)})
    for r in rows:
        r['pareto'] = not any(q['gflops'] <= r['gflops'] and q['accuracy'] >= r['accuracy'] and
                              (q['gflops'] < r['gflops'] or q['accuracy'] > r['accuracy'])
                              for q in rows)
    return sorted(rows, key=lambda r: (r['gflops'], -r['accuracy']))


def cost_table(rows):
    lines = ['path        top-1   params(M)  GFLOP/img  ms@1    ms@128  Pareto']
    lines += [f'{r["path"]:<10} {r["accuracy"]:6.2f}  {r["params"] / 1e6:9.2f}  '
              f'{r["gflops"]:9.3f}  {r["latency_ms_b1"]:6.2f}  {r["latency_ms_b128"]:6.2f}  '
              f'{"*" if r["pareto"] else ""}' for r in rows]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------- training run
def lr_at(step, steps_per_epoch, epochs, lr, warmup_epochs=1):
    """The recipe's lr at `step` (0-based, from the start of the stage; METHOD.md §4): lr·s/S at
    step s of the warm-up epochs' S steps, then in epoch e = 1, 2, … lr × 0.2 per milestone m ≤ e
    (30, 60 and 80 % of the epochs, at least 2): as pytorch-cifar100 calls MultiStepLR.step(e)
    before epoch e, epoch 60 of 200 trains at lr × 0.2."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return lr * step / warmup_steps
    epoch = step // steps_per_epoch + 1
    drops = sum(epoch >= max(2, round(f * epochs)) for f in MILESTONES)
    return lr * LR_DECAY ** drops


def write_atomic(path, write):
    """write(file) to a temporary file, fsync, rename over `path`: a crash leaves old or new."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + '\n').encode()))


def load_checkpoint(path):
    """A checkpoint this script wrote (a dict holding 'config'), on the CPU; else a UsageError."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # not a torch file, truncated, or objects weights_only refuses
        raise UsageError(f'cannot read checkpoint {path} ({type(e).__name__}: {first_line(e)}); '
                         'give a last.pt or best.pt that xml_ref.py wrote') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('config'), dict):
        raise UsageError(f'{path} is not a checkpoint of xml_ref.py (it holds no run config); give '
                         'a last.pt or best.pt that xml_ref.py wrote')
    return ckpt


def net_cuts_of(config):
    """The cuts of each net in a checkpoint's config (earlier runs kept one list for all nets)."""
    cuts = config.get('net_cuts') or config['cuts']
    return cuts if isinstance(cuts[0], list) else [cuts] * len(config['nets'])


def load_net(path, name, model, index=None):
    """Load into `model` the checkpoint's `name`: the one at `index` if so named, else the first."""
    ckpt = load_checkpoint(path)
    names = ckpt['config'].get('nets', [])
    if name not in names:
        raise UsageError(f'{path} holds the nets {", ".join(names) or "(none)"}, not {name}; '
                         f'give a checkpoint (last.pt or best.pt) of a run that trained {name}')
    try:
        model.load_state_dict(ckpt['nets'][index if index is not None and index < len(names)
                                           and names[index] == name else names.index(name)])
    except RuntimeError as e:  # another width or number of classes
        raise UsageError(f'{path}: its {name} does not fit this run '
                         f'({str(e).splitlines()[1].strip()}); train the teacher with the same '
                         '--dataset and --width') from None


def build_nets(cfg, num_classes):
    """The nets of a run; with xml+disc each has one output more, its synthesis score."""
    return [build(n, num_classes + (cfg.method == 'xml+disc'), cfg.width) for n in cfg.nets]


def device_name(dev):
    return (torch.cuda.get_device_name(dev) if dev.type == 'cuda'
            else f'cpu ({torch.get_num_threads()} threads)')


def format_duration(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def progress_line(rec, total_epochs, seconds_left):
    """Per epoch: losses, top-1 of nets and crossings (own statistics bracketed), lr, speed, ETA."""
    def both(key, show):
        return show(rec[key]) + (f' ({show(rec["own_bn"][key])})' if 'own_bn' in rec else '')

    def accs(xs):
        return ' '.join(f'{a:.2f}' for a in xs)

    dist = rec.get('feature_distance')  # None where the features differ in channels
    cross = f'  cross {both("cross", lambda m: " | ".join(map(accs, m)))}' if 'cross' in rec else ''
    tested = (f'  top1 {both("accuracy", accs)}{cross}  ens {rec["ensemble"]:.2f}  '
              f'dist {"-" if dist is None else f"{dist:.4f}"}' if 'accuracy' in rec else '')
    return (f'epoch {rec["epoch"]:>{len(str(total_epochs))}}/{total_epochs} {rec["stage"]:<5} loss '
            + ' '.join('-' if x is None else f'{x:.3f}' for x in rec['loss']) + tested
            + f'  lr {rec["lr"]:.4g}  {rec["img_per_s"]:,.0f} img/s  '
            f'left {format_duration(seconds_left)}')


# What a resumed run must share with the checkpoint it resumes.
RESUME_KEYS = ('nets', 'net_cuts', 'method', 'update', 'path_weights', 'paths_per_step',
               'temperature', 'l2_weight', 'adv_weight', 'freeze', 'hint_epochs', 'epochs',
               'warmup_epochs', 'batch_size', 'lr', 'momentum', 'weight_decay', 'seed', 'dataset',
               'width', 'rotate', 'train_per_class', 'fast', 'sync_bn', 'processes', 'schedule')


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint; main() exits with 128 + the signal."""


class Diverged(Exception):
    """A loss became NaN or infinite; the last checkpoint is the last good epoch."""


@contextlib.contextmanager
def stop_on_signals():
    """Inside: the first SIGINT or SIGTERM asks the run to stop after this epoch's checkpoint (the
    returned dict then holds the signal); a second one stops at once."""
    request = {'signal': 0}

    def handler(signum, _):
        if request['signal']:
            raise KeyboardInterrupt
        request['signal'] = signum
        print(f'\n{signal.Signals(signum).name}: stopping after this epoch\'s checkpoint '
              '(again to stop now)', file=sys.stderr, flush=True)
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield request
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@dataclass
class Run:
    """What a training run holds between its phases (set_up, resume, the epochs, the summary)."""
    cfg: Config
    dev: torch.device
    rank: int  # torchrun: this process; rank 0 alone writes
    world: int
    data: Data
    mean: list
    std: list
    models: list
    parts: list
    shapes: list  # shapes[i][c]: C×H×W of net i's feature at cut c + 1
    stitches: nn.ModuleDict  # make_stitches: where the nets' features differ in channels
    frozen: set  # nets that do not learn: kd's and fitnet's teacher, --freeze's net
    student: object  # kd, fitnet: the student's index, else None
    optimizers: list  # one per net, None for a frozen net
    regressor: object = None  # fitnet: the regressor of stage 1 …
    hint_optimizer: object = None  # … and the optimizer of it and the student's up-half
    discriminator: object = None  # xml+gan: the discriminator and its optimizer
    disc_optimizer: object = None
    own_bn: object = None  # OwnBatchNorm: each path's own BatchNorm statistics
    history: list = field(default_factory=list)
    best: dict = None
    start: int = 0  # epochs done
    wall_before: float = 0.0  # seconds spent before a resume

    def learners(self):
        """The keys of the losses a step returns: the nets, then xml+gan's discriminator."""
        return list(range(len(self.models))) + ['discriminator'] * (self.discriminator is not None)

    def checkpoint_optimizers(self):
        """Every optimizer in the checkpoint's order: nets (None where frozen), the discriminator's,
        then FitNet's stage 1 at the student's position of K more."""
        hint = [self.hint_optimizer if i == self.student else None for i in range(len(self.models))]
        return (self.optimizers + ([self.disc_optimizer] if self.discriminator is not None else [])
                + (hint if self.hint_optimizer is not None else []))


def start_processes(cfg):
    """(device, rank, world size): this process, alone or in torchrun (NCCL on GPUs, else gloo)."""
    dev, rank, world = torch.device(cfg.device), 0, 1
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if dev.type == 'cuda':
            dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', rank)))
            torch.cuda.set_device(dev)
    if cfg.batch_size % world:
        raise UsageError(f'--batch-size {cfg.batch_size} does not split evenly over {world} '
                         'processes')
    return dev, rank, world


def prepare_out(out, force):
    """Create --out, check it can be written, and with --force clear the run already there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / '.write-test').touch()
        os.remove(out / '.write-test')
    except OSError as e:
        raise UsageError(f'--out {out} cannot be written ({e.strerror}); choose another') from None
    if force:
        for name in ('summary.json', 'last.pt', 'best.pt', 'metrics.jsonl'):
            (out / name).unlink(missing_ok=True)


def set_up(cfg):
    """A Run of a checked `cfg` before its first epoch: processes, data, nets, optimizers."""
    dev, rank, world = start_processes(cfg)
    data = load_data(cfg.dataset, cfg.data_dir)
    if cfg.train_per_class:
        data = first_per_class(data, cfg.train_per_class)
    if cfg.batch_size > len(data.train_x):
        raise UsageError(f'--batch-size {cfg.batch_size} is larger than the {len(data.train_x)} '
                         'training images')
    fast = cfg.fast == 'on'
    torch.backends.cudnn.benchmark = fast  # fixed shapes: cuDNN times its kernels once
    torch.manual_seed(cfg.seed)
    models = build_nets(cfg, data.num_classes)
    fmt = conv_layout(models, dev)
    if cfg.sync_bn:  # batch statistics over the whole batch, not each rank's share
        models = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in models]
    models = [m.to(dev, memory_format=fmt) for m in models]
    parts = [split_parts(m, cuts) for m, cuts in zip(models, cfg.net_cuts)]
    try:  # check() tried 32×32 images
        shapes = feature_shapes(parts, data.train_x.shape[1])
        stitches = make_stitches(shapes, cfg.nets).to(dev, memory_format=fmt)
    except Exception as e:
        raise UsageError(f'{",".join(cfg.nets)} on {data.train_x.shape[1]}-pixel images: '
                         f'{first_line(e, 200)}') from None
    if cfg.sync_bn:
        stitches = nn.SyncBatchNorm.convert_sync_batchnorm(stitches)
    K, frozen, student = len(models), set(), None
    if cfg.method in ('kd', 'fitnet'):  # the teacher: the larger net of the pair, loaded and frozen
        teacher = max(range(K), key=lambda i: num_params(models[i]))
        student, frozen = 1 - teacher, {teacher}
        load_net(cfg.teacher, cfg.nets[teacher], models[teacher])
    for i, path in enumerate((cfg.init1, cfg.init2)):
        if path:
            load_net(path, cfg.nets[i], models[i], i)
    if cfg.freeze:  # teacher-student XML
        frozen.add(cfg.freeze - 1)
    for i in frozen:
        models[i].requires_grad_(False)
    optimizers = [None if i in frozen else sgd([*models[i].parameters(), *(
        p for s in stitches_into(stitches, i) for p in s.parameters())], cfg, fast)
        for i in range(K)]
    run = Run(cfg, dev, rank, world, data, *channel_stats(data.train_x), models, parts, shapes,
              stitches, frozen, student, optimizers, own_bn=OwnBatchNorm(parts, stitches),
              best={'accuracy': [-1.0] * K, 'epoch': [0] * K, 'mean': -1.0})
    if cfg.method == 'xml+gan':
        run.discriminator = discriminator(shapes[0][0][0]).to(dev, memory_format=fmt)
        run.disc_optimizer = sgd(run.discriminator.parameters(), cfg, fast)
    if cfg.method == 'fitnet':
        run.regressor = regressor(shapes[student][0][0], shapes[teacher][0][0]).to(
            dev, memory_format=fmt)
        run.hint_optimizer = sgd(list(run.parts[student][0].parameters())
                                 + list(run.regressor.parameters()), cfg, fast)
    # last, so that a problem above (a corrupt --teacher or --init, images the nets cannot take)
    # leaves the run in --out alone, also with --force
    problem = None
    if rank == 0:
        try:
            prepare_out(Path(cfg.out), cfg.force)
        except UsageError as e:
            problem = e
    if world > 1:  # every rank stops on rank 0's problem, or the others would wait for it forever
        failed = torch.tensor([problem is not None], device=dev)
        dist.broadcast(failed, 0)
        problem = problem or (UsageError(f'--out {cfg.out}: rank 0 could not prepare it')
                              if failed.item() else None)
    if problem:
        raise problem
    return run


def resume(run, gen):
    """Continue from last.pt in --out, if there is one: weights, optimizers, random states."""
    out = Path(run.cfg.out)
    if not (out / 'last.pt').exists():
        if run.rank == 0:
            print(f'{out}: no checkpoint yet, starting from the beginning', file=sys.stderr)
        return
    ckpt = load_checkpoint(out / 'last.pt')
    was, now = ckpt.get('data', run.data.signature()), run.data.signature()  # (none before it)
    if was != now:
        def count(v):
            return len(v) if isinstance(v, list) else v
        differ = '; '.join(f'{k} {count(was.get(k))} there, {count(now[k])} here'
                           + ' (other names)' * (count(was.get(k)) == count(now[k]))
                           for k in now if was.get(k) != now[k])
        raise UsageError(f'--resume: {out}/last.pt was trained on other data ({differ}); resume '
                         'with the same --dataset and --data-dir')
    try:
        for m, state in zip(run.models, ckpt['nets']):
            m.load_state_dict(state)
        for opt, state in zip(run.checkpoint_optimizers(), ckpt['optimizers']):
            if opt is not None:
                opt.load_state_dict(state)
        for module, key in ((run.regressor, 'regressor'), (run.discriminator, 'discriminator')):
            if module is not None:
                module.load_state_dict(ckpt[key])
        run.stitches.load_state_dict(ckpt.get('stitches', {}))  # (none before stitches existed)
        run.own_bn.load_state_dict(ckpt['own_bn'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f'--resume: {out}/last.pt does not fit this run ({type(e).__name__}: '
                         f'{first_line(e)}); use the code that wrote it, or --force') from None
    gen.set_state(ckpt['rng']['data'])
    torch.set_rng_state(ckpt['rng']['torch'])
    run.history, run.start, run.wall_before, run.best = (ckpt['history'], ckpt['epoch'],
                                                          ckpt['wall_s'], ckpt['best'])
    if run.rank == 0:
        print(f'resuming {out} after epoch {run.start}', file=sys.stderr)


def loss_options(cfg, method, discriminator=None):
    """The keyword arguments of LOSSES[method] from the command line: those it takes."""
    kw = {'T': cfg.temperature, 'path_weights': cfg.path_weights, 'l2_weight': cfg.l2_weight,
          'adv_weight': cfg.adv_weight, 'discriminator': discriminator}
    return {k: v for k, v in kw.items() if k in inspect.signature(LOSSES[method]).parameters}


def make_step(run, hint, paths_rng):
    """(the step of a stage, its optimizers): FitNet's hint stage, or the method's training
    (fitnet's second stage is kd); a TrainStep, in a CudaGraphStep where that can be captured."""
    cfg, fast = run.cfg, run.cfg.fast == 'on'
    if hint:
        student, teacher = run.student, 1 - run.student
        optimizers, learners = [run.hint_optimizer], [student]
        fn = functools.partial(hint_step, run.parts[student][0], run.parts[teacher][0],
                               run.regressor, run.hint_optimizer, student=student)
    else:
        method = 'kd' if cfg.method == 'fitnet' else cfg.method
        optimizers = [opt for opt in run.optimizers + [run.disc_optimizer] if opt is not None]
        learners = [k for k in run.learners() if k not in run.frozen]
        fn = functools.partial(train_step, run.parts, run.optimizers, method=method,
                               update=cfg.update, paths_per_step=cfg.paths_per_step,
                               rng=paths_rng, disc_optimizer=run.disc_optimizer,
                               own_bn=run.own_bn, stitches=run.stitches,
                               **loss_options(cfg, method, run.discriminator))
    step = TrainStep(fn, learners, run.mean, run.std, run.dev, bf16=fast,
                     channels_last=conv_layout(run.models, run.dev) == torch.channels_last)
    # sampled paths change from step to step, which one captured graph cannot; nor are torchrun's
    # collectives tested inside a capture
    if fast and run.world == 1 and cfg.paths_per_step is None:
        graph_lr(optimizers, run.dev)
        step = CudaGraphStep(step, (cfg.batch_size // run.world, *run.data.train_x.shape[1:]),
                             run.dev)
    return step, optimizers


def train_epoch(run, train_batch, optimizers, epoch, train_x, train_y, gen):
    """One pass over the training set in a fresh random order, the lr set per step (lr_at); returns
    each learner's mean loss (None for those that do not learn in this stage) and the last lr."""
    cfg, H = run.cfg, run.cfg.hint_epochs
    stage_epoch, stage_epochs = (epoch, H) if epoch < H else (epoch - H, cfg.epochs)
    n_steps = len(train_x) // cfg.batch_size  # the last partial batch is dropped
    share, rank = cfg.batch_size // run.world, run.rank  # each rank's share of a batch
    train_batch.new_epoch()
    for i, m in enumerate(run.models):
        m.train(i not in run.frozen)
    run.stitches.train()
    perm = torch.randperm(len(train_x), device=run.dev, generator=gen)
    lr = None
    for s in range(n_steps):
        lr_now = lr_at(stage_epoch * n_steps + s, n_steps, stage_epochs, cfg.lr, cfg.warmup_epochs)
        if lr_now != lr:
            lr = lr_now
            for opt in optimizers:
                set_lr(opt, lr)
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        # the whole batch, so every rank draws alike
        images = augment(train_x[idx], generator=gen, rotate=cfg.rotate)
        mine = slice(rank * share, (rank + 1) * share)
        train_batch(images[mine], train_y[idx[mine]])
    keys, zero = run.learners(), torch.zeros((), dtype=torch.int64, device=run.dev)
    sums = torch.stack([train_batch.loss_sum.get(k, zero.float()) for k in keys])
    first_bad = torch.stack([train_batch.first_bad.get(k, zero) for k in keys])
    # the means over ranks, BatchNorm statistics too; and every rank must see a divergence, or the
    # others would wait for the diverged one forever
    if run.world > 1:
        dist.all_reduce(sums)
        sums /= run.world
        # a frozen net's statistics are the same on every rank: left exact, not re-averaged
        learning = [i for i in range(len(run.models)) if i not in run.frozen]
        modules = [run.models[i] for i in learning] + [s for i in learning
                                                       for s in stitches_into(run.stitches, i)]
        for buf in [b for m in modules for b in m.buffers()
                    if b.is_floating_point()] + run.own_bn.tensors(learning):
            dist.all_reduce(buf)
            buf /= run.world
        first_bad = torch.where(first_bad == 0, n_steps + 1, first_bad)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = torch.where(first_bad == n_steps + 1, 0, first_bad)
    bad = [(at, n) for n, at in enumerate(first_bad.tolist()) if at]
    if bad:
        at, n = min(bad)  # the first step, and the first learner whose loss went bad at it
        name = (f'net {keys[n] + 1} ({cfg.nets[keys[n]]})' if keys[n] != 'discriminator'
                else 'the discriminator')
        kept = (f'{cfg.out}/last.pt still holds epoch {epoch}' if epoch
                else 'no checkpoint was written')
        raise Diverged(f'the loss of {name} became NaN or infinite at epoch {epoch + 1}, batch '
                       f'{at} of {n_steps}; {kept}; lower --lr or check the data')
    return [v / n_steps if k in train_batch.loss_sum else None
            for k, v in zip(keys, sums.tolist())], lr


def save_checkpoint(run, rec, gen, wall_s):
    """Record the epoch: best.pt when the mean top-1 of the learning nets is the best so far,
    last.pt, metrics.jsonl, each written atomically (rank 0 only)."""
    K, best = len(run.models), run.best
    for i in range(K * ('accuracy' in rec)):  # (an epoch that --eval-every skips has none)
        if rec['accuracy'][i] > best['accuracy'][i]:
            best['accuracy'][i], best['epoch'][i] = rec['accuracy'][i], rec['epoch']
    trained = [i for i in range(K) if i not in run.frozen]
    mean_acc = (sum(rec['accuracy'][i] for i in trained) / len(trained) if 'accuracy' in rec
                else -1.0)
    is_best, best['mean'] = mean_acc > best['mean'], max(best['mean'], mean_acc)
    if run.rank:
        return
    state = {'config': vars(run.cfg), 'epoch': rec['epoch'],
             'nets': [m.state_dict() for m in run.models],
             'optimizers': [opt.state_dict() if opt else None
                            for opt in run.checkpoint_optimizers()],
             **{k: m.state_dict() if m is not None else None for k, m in
                (('regressor', run.regressor), ('discriminator', run.discriminator))},
             'own_bn': run.own_bn.state_dict(), 'stitches': run.stitches.state_dict(),
             'rng': {'data': gen.get_state(), 'torch': torch.get_rng_state()},
             'data': run.data.signature(),
             'history': run.history, 'best': best, 'wall_s': wall_s}
    out = Path(run.cfg.out)
    if is_best:
        write_atomic(out / 'best.pt', lambda f: torch.save(state, f))
    write_atomic(out / 'last.pt', lambda f: torch.save(state, f))
    write_atomic(out / 'metrics.jsonl',
                 lambda f: f.write(''.join(json.dumps(r) + '\n' for r in run.history).encode()))


def train(cfg):
    """Train the nets of a parsed `cfg` with its method; writes metrics.jsonl, last.pt, best.pt and
    summary.json into cfg.out, returns the summary. Under torchrun each rank trains on its share."""
    run = set_up(cfg)
    gen = torch.Generator(run.dev).manual_seed(cfg.seed)  # data order, augmentation: all ranks'
    if cfg.resume:
        resume(run, gen)
    train_x, train_y = run.data.train_x.to(run.dev), run.data.train_y.to(run.dev)
    test_x, test_y = run.data.test_x.to(run.dev), run.data.test_y.to(run.dev)
    total = cfg.hint_epochs + cfg.epochs
    steps, paths_rng, t_run = {}, random.Random(), time.time()
    with stop_on_signals() as stop:
        for epoch in range(run.start, total):
            hint = epoch < cfg.hint_epochs
            if hint not in steps:  # one step (one CUDA graph) per stage
                steps[hint] = make_step(run, hint, paths_rng)
            paths_rng.seed(cfg.seed * 1_000_003 + epoch)  # the epoch's paths, after a resume too
            t0 = time.time()
            losses, lr = train_epoch(run, *steps[hint], epoch, train_x, train_y, gen)
            train_s = time.time() - t0
            rec = {'epoch': epoch + 1, 'stage': 'hint' if hint else 'train', 'lr': lr,
                   'loss': losses}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == total:  # evaluation changes no
                rec.update(evaluate(run.parts, test_x, test_y, run.mean, run.std,  # weight
                                    fast=cfg.fast == 'on', classes=run.data.num_classes,
                                    own_bn=run.own_bn, stitches=run.stitches))
            rec.update(img_per_s=len(train_x) // cfg.batch_size * cfg.batch_size / train_s,
                       epoch_s=time.time() - t0)
            run.history.append(rec)
            save_checkpoint(run, rec, gen, run.wall_before + time.time() - t_run)
            if run.rank == 0:
                done = epoch + 1 - run.start
                print(progress_line(rec, total, (time.time() - t_run) / done * (total - epoch - 1)),
                      flush=True)
            signalled = torch.tensor([stop['signal']], device=run.dev)
            if run.world > 1:  # stop together, or the others would wait for the stopped one forever
                dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
            if signalled.item() and epoch + 1 < total:
                raise Stopped(f'stopped after epoch {epoch + 1}; add --resume to the same command '
                              'to continue', signalled.item())
    return summarize(run, run.wall_before + time.time() - t_run)


def summarize(run, wall_s):
    """summary.json (rank 0 writes it): the settings, the last epoch's numbers, the best epochs (the
    first of ties) with shared and own statistics, each path's cost (own statistics: what a path
    shipped alone scores, tools/export_path.py)."""
    cfg, last, student = run.cfg, run.history[-1], run.student
    costs = path_costs(run.parts, last['own_bn']['paths'], run.data.train_x.shape[1],
                       cfg.fast == 'on', run.stitches)
    evaluated = [r for r in run.history if 'accuracy' in r]
    own_best = [max(evaluated, key=lambda r: (r['own_bn']['accuracy'][i], -r['epoch']))
                for i in range(len(run.models))]
    own_best = {'best_accuracy': [r['own_bn']['accuracy'][i] for i, r in enumerate(own_best)],
                'best_epoch': [r['epoch'] for r in own_best]}
    # the regime the run ended in: how far each net fits its training images (no augmentation)
    fit = evaluate(run.parts, run.data.train_x.to(run.dev), run.data.train_y.to(run.dev), run.mean,
                   run.std, fast=cfg.fast == 'on', classes=run.data.num_classes,
                   own_bn=run.own_bn, stitches=run.stitches)
    same = all(c == cfg.net_cuts[0] for c in cfg.net_cuts)
    summary = {'pair': ','.join(cfg.nets),
               'cut': ','.join(cfg.net_cuts[0] if same else [c[0] for c in cfg.net_cuts]),
               **{k: getattr(cfg, k) for k in RESUME_KEYS},  # every setting of the run
               'feature_shape': [[list(s) for s in net] for net in run.shapes],
               'stitch_params': {k: num_params(s) for k, s in run.stitches.items()},
               'frozen': sorted(i + 1 for i in run.frozen),
               'init': {'1': cfg.init1, '2': cfg.init2},
               'teacher': (None if student is None
                           else {'net': 2 - student, 'checkpoint': cfg.teacher}),
               'student': None if student is None else student + 1,
               'params': [[num_params(part) for part in net] for net in run.parts],
               'accuracy': last['accuracy'], 'best_accuracy': run.best['accuracy'],
               'best_epoch': run.best['epoch'],
               'cross': last.get('cross'), 'paths': last['paths'], 'ensemble': last['ensemble'],
               'feature_distance': last['feature_distance'],
               'own_bn': {**last['own_bn'], **own_best},
               'synthesis': last.get('synthesis'), 'path_costs': costs,
               'eval_every': cfg.eval_every,
               'train': {'loss': last['loss'], 'accuracy': fit['accuracy'],
                         'own_bn_accuracy': fit['own_bn']['accuracy']},
               'device': device_name(run.dev), 'torch': torch.__version__,
               'date': time.strftime('%Y-%m-%d'), 'wall_s': wall_s,
               'command': ('torchrun ' if run.world > 1 else 'python ') + 'xml_ref.py '
                          + shlex.join(cfg.argv)}
    if run.rank == 0:
        print(cost_table(costs), flush=True)
        write_json(Path(cfg.out) / 'summary.json', summary)
    return summary


# -------------------------------------------------------------------------------------------- CLI
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def make_parser():
    """The command line, one option per field of Config, in its groups. An option whose default is
    None or False is left out of the parsed values unless given (Config's default applies) and
    shows no '(default: None)' in the help."""
    p = Parser(prog='xml_ref.py',
               description='Xross Mutual Learning and its baselines on CIFAR or an image folder.',
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in fields(Config):
        if 'help' not in f.metadata:
            continue
        kw = {k: v for k, v in f.metadata.items() if k not in ('group', 'help')}
        group = groups.setdefault(f.metadata['group'], p.add_argument_group(f.metadata['group']))
        if f.type is bool:
            kw['action'] = 'store_true'
        elif 'type' not in kw and f.default is not None:
            kw['type'] = type(f.default)
        group.add_argument('--' + f.name.replace('_', '-'), help=f.metadata['help'], **kw,
                           default=argparse.SUPPRESS if f.default is None or f.default is False
                           else f.default)
    return p


def parse_args(argv=None):
    """The command line as a Config, derived and checked (with --list-cuts: derived only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = derive(Config(**vars(make_parser().parse_args(argv)), argv=argv))
    if not cfg.list_cuts:
        check(cfg)
    return cfg


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def derive(cfg):
    """cfg with the values that depend on other options: the nets (of --nets or --pair), each net's
    cuts, the path weights, the temperature, the hint epochs, the device, --fast, the processes
    and --out."""
    nets = cfg.nets or cfg.pair
    cut = cfg.cut or [default_cut(nets)]
    net_cuts = ([cfg.cuts] * len(nets) if cfg.cuts else
                [[c] for c in cut] if len(cut) == len(nets) else [cut] * len(nets))
    device = cfg.device or default_device()
    name = (f'{"-".join(nets)}_{cfg.method}_{"-".join(dict.fromkeys(sum(net_cuts, [])))}'
            f'_seed{cfg.seed}')
    return replace(
        cfg, nets=nets, net_cuts=net_cuts, device=device,
        fast=cfg.fast if cfg.fast != 'auto' else 'on' if device.startswith('cuda') else 'off',
        processes=(dist.get_world_size() if dist.is_available() and dist.is_initialized()
                   else int(os.environ.get('WORLD_SIZE', 1))),
        path_weights=cfg.path_weights or ('mean' if any(n.startswith('tv:') for n in nets) else
                                          'sum'),
        temperature=(cfg.temperature if cfg.temperature is not None
                     else 4.0 if cfg.method in ('kd', 'fitnet') else 1.0),
        hint_epochs=(cfg.hint_epochs if cfg.hint_epochs is not None
                     else max(1, cfg.epochs // 10) if cfg.method == 'fitnet' else 0),
        out=cfg.out or 'runs/' + re.sub(r'[^\w.+-]', '-', name))


def check_nets(cfg):
    """Refuse a --pair or --nets that does not name two (or K ≥ 2) known nets."""
    flag = '--pair' if cfg.nets == cfg.pair else '--nets'
    if len(cfg.nets) < 2 or (flag == '--pair' and len(cfg.nets) != 2) or not all(cfg.nets):
        raise UsageError(f'{flag} takes {"two" if flag == "--pair" else "two or more"} nets joined '
                         f'by a comma, like res18,res34; got {",".join(cfg.nets)!r}')
    for name in cfg.nets:
        if name not in MODELS and not name.startswith('tv:'):
            raise UsageError(f'unknown model {name!r} in {flag}: choose from {", ".join(MODELS)} '
                             'or tv:ARCH (a torchvision model, e.g. tv:resnet18)')


def list_cuts(names, width):
    """--list-cuts: each net's cuts with their feature shapes on 32×32 images."""
    lines = []
    for name in names:
        try:
            cuts = cut_names(build(name, 10, width))
        except Exception as e:  # not a known net, not traceable, not for 32×32 images
            raise UsageError(f'{name}: {first_line(e, 200)}') from None
        lines += [f'{name}: {len(cuts)} cuts (C×H×W on 32×32 images)']
        lines += [f'  {c:<24} {"×".join(map(str, shape))}' for c, shape in cuts.items()]
    return '\n'.join(lines)


def check(cfg):
    """Refuse (one-line UsageError) what in a derived Config would fail later, before any I/O."""
    check_nets(cfg)
    K, P = len(cfg.nets), len(cfg.net_cuts[0]) + 1
    if cfg.cut and cfg.cuts:
        raise UsageError('give --cut (one cut) or --cuts (several), not both')
    if cfg.cut and len(cfg.cut) not in (1, K):
        raise UsageError(f'--cut takes one name, or one per net ({K}); got {",".join(cfg.cut)}')
    if cfg.method in PAIR_ONLY and (K, P) != (2, 2):
        raise UsageError(f'--method {cfg.method} is for a pair cut once, not {K} nets in {P} parts')
    if cfg.paths_per_step is not None:
        crossed = K ** P - K
        if cfg.method not in ('xml', 'xml+l2') or not 1 <= cfg.paths_per_step <= crossed:
            raise UsageError(f'--paths-per-step goes with --method xml or xml+l2 and must be 1 … '
                             f'{crossed} (the crossed paths of {K} nets in {P} parts); got '
                             f'{cfg.paths_per_step}')
    if cfg.freeze and (cfg.method in ('kd', 'fitnet') or K != 2):
        raise UsageError('--freeze is for a pair and a mutual method (kd and fitnet freeze the '
                         'teacher themselves)')
    if cfg.freeze and not getattr(cfg, f'init{cfg.freeze}'):
        raise UsageError(f'--freeze {cfg.freeze} needs --init{cfg.freeze} PATH, the net to keep '
                         'fixed')
    for i, path in enumerate((cfg.init1, cfg.init2)):
        if path and not Path(path).is_file():
            raise UsageError(f'--init{i + 1} {path}: no such file; give a last.pt or best.pt')
    for flag in ('epochs', 'batch_size', 'lr', 'width', 'temperature', 'train_per_class',
                 'eval_every'):
        if getattr(cfg, flag) is not None and not getattr(cfg, flag) > 0:  # (NaN too)
            raise UsageError(f'--{flag.replace("_", "-")} must be positive, '
                             f'got {getattr(cfg, flag)}')
    for flag in ('momentum', 'weight_decay', 'l2_weight', 'adv_weight', 'rotate'):
        if not getattr(cfg, flag) >= 0:  # (NaN too)
            raise UsageError(f'--{flag.replace("_", "-")} must not be negative, '
                             f'got {getattr(cfg, flag)}')
    if (cfg.method == 'fitnet') != (cfg.hint_epochs > 0) or cfg.hint_epochs < 0:
        raise UsageError('--hint-epochs goes with --method fitnet and must be at least 1')
    longest = min(cfg.epochs, cfg.hint_epochs or cfg.epochs)  # each stage warms up on its own
    if not 0 <= cfg.warmup_epochs <= longest:
        raise UsageError(f'--warmup-epochs must be 0 … {longest} (at most --epochs'
                         + ' and --hint-epochs' * bool(cfg.hint_epochs)
                         + f'), got {cfg.warmup_epochs}')
    if cfg.method in ('kd', 'fitnet') and not (cfg.teacher and Path(cfg.teacher).is_file()):
        raise UsageError(f'--method {cfg.method} needs --teacher PATH, a checkpoint of a trained '
                         f'teacher (got {cfg.teacher}); train one first, e.g. --method independent')
    if cfg.teacher and cfg.method not in ('kd', 'fitnet'):
        raise UsageError('--teacher goes with --method kd or fitnet')
    try:  # the nets on the CPU: cheap, and before anything is loaded or written
        parts = [split_parts(build(n, 10, cfg.width), c) for n, c in zip(cfg.nets, cfg.net_cuts)]
        stitched = len(make_stitches(feature_shapes(parts), cfg.nets)) > 0
    except ValueError as e:
        raise UsageError(f'{"--cuts" if P > 2 else "--cut"}: {e} (--list-cuts lists each net\'s '
                         'cuts)') from None
    except Exception as e:  # a net that does not run on 32×32 images (a ViT's fixed input size)
        raise UsageError(f'{",".join(cfg.nets)} on 32×32 images: {type(e).__name__}: '
                         f'{first_line(e)}') from None
    if stitched and (cfg.method in ('xml+l2', 'xml+gan') or cfg.freeze):
        raise UsageError(f'{"--freeze" if cfg.freeze else "--method " + cfg.method} needs '
                         'features of one shape at the cut, and here their channels differ; cut '
                         'where they agree')
    if cfg.dataset == 'folder' and not Path(cfg.data_dir).is_dir():
        raise UsageError(f'--data-dir {cfg.data_dir} is not a directory; --dataset folder needs '
                         'DIR/train/<class>/<image> and DIR/test/<class>/<image>')
    check_device(cfg.device)
    if cfg.fast == 'on' and not cfg.device.startswith('cuda'):
        raise UsageError('--fast on needs a CUDA device (CUDA graphs, bf16); use --fast off on '
                         'the CPU')
    if cfg.sync_bn and (not cfg.device.startswith('cuda') or cfg.processes < 2):
        raise UsageError('--sync-bn needs several GPU processes: launch with torchrun '
                         '--nproc_per_node=N')
    check_out(cfg)


def check_device(name):
    """Refuse a --device that is not one, or not here."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a device; use cuda, cuda:N or cpu') from None
    if dev.type not in ('cuda', 'cpu'):
        raise UsageError(f'--device {name}: xml_ref.py runs on cuda, cuda:N or cpu')
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: no CUDA GPU is visible; use --device cpu')
    if dev.type == 'cuda' and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f'--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are '
                         f'visible, cuda:0 … cuda:{torch.cuda.device_count() - 1}')


def check_out(cfg):
    """--out must be writable; a finished run there is never overwritten without --force, an
    unfinished one continued only with --resume, the same settings and the same kind of device."""
    out = Path(cfg.out)
    existing = next(p for p in [out, *out.parents] if p.exists())  # check now, write nothing yet
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'--out {out} cannot be written ({existing} is not a writable directory); '
                         'choose another')
    if cfg.resume and cfg.force:
        raise UsageError('--resume and --force contradict each other: pick one')
    if cfg.resume and (out / 'summary.json').exists():
        raise UsageError(f'--out {out} holds a finished run: nothing to resume')
    if cfg.resume and (out / 'last.pt').exists():
        ckpt = load_checkpoint(out / 'last.pt')
        saved = {**ckpt['config'], 'net_cuts': net_cuts_of(ckpt['config'])}
        if saved.get('schedule') != cfg.schedule or 'own_bn' not in ckpt:
            raise UsageError(f'--resume: {out}/last.pt was written by an older xml_ref.py (another '
                             'lr schedule, or no per-path BatchNorm statistics); finish it with '
                             'that version or start over with --force')
        k = next((k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k) and not (  # (no paths
            k == 'path_weights' and not cfg.method.startswith('xml'))), None)  # to weigh)
        if k:
            raise UsageError(f'--resume: {out}/last.pt was written with {k}={saved.get(k)!r}, '
                             f'not {getattr(cfg, k)!r}; resume with the same settings or use '
                             'another --out')
        was = torch.device(saved.get('device', 'cpu')).type  # the data order's generator is its own
        if was != torch.device(cfg.device).type:
            raise UsageError(f'--resume: {out}/last.pt was written on {was}, this run is on '
                             f'{cfg.device}; resume it with --device {was} (or start over with '
                             '--force)')
    elif not cfg.force and (out / 'summary.json').exists():
        raise UsageError(f'--out {out} already holds a finished run; use --force to overwrite it '
                         'or another --out')
    elif not cfg.force and (out / 'last.pt').exists():
        raise UsageError(f'--out {out} holds an unfinished run; --resume continues it, --force '
                         'starts over')


def main(argv=None):
    """The command line; returns the exit status: 0 done, 1 diverged, 2 bad input, 128 + N stopped
    by signal N after a checkpoint (argparse's own errors exit with 2 through SystemExit)."""
    try:
        cfg = parse_args(argv)
        if cfg.list_cuts:
            check_nets(cfg)
            print(list_cuts(cfg.nets, cfg.width))
            return 0
        summary = train(cfg)
        if not distributed() or dist.get_rank() == 0:
            print(json.dumps({**{k: summary[k] for k in ('method', 'pair', 'cut', 'accuracy',
                                                         'best_accuracy', 'cross', 'ensemble',
                                                         'feature_distance', 'wall_s')},
                              'own_bn': {k: summary['own_bn'].get(k)
                                         for k in ('accuracy', 'cross', 'ensemble')}}))
        return 0
    except (UsageError, Diverged) as e:
        print(f'xml_ref.py: error: {e}', file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except Stopped as e:
        print(f'xml_ref.py: {e.args[0]}', file=sys.stderr)
        return 128 + e.args[1]
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
