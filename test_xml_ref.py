"""Property tests of xml_ref.py against independent references (float64 formulas, torch.distributions,
hand-written gradient routing). Full-size nets only for shapes and parameter counts; tiny widths and
inputs for everything that trains. Run: python -m pytest -q test_xml_ref.py"""
import argparse
import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.distributions import Categorical, kl_divergence

import xml_ref as X
from tools import bench as B, bn_recalib as BN, export_path as EP, flatness as FL, grad_norms as GN, interpolate as I
from tools import report as R
from tools import plant_bugs as PB

HERE = Path(__file__).resolve().parent
FAST = settings(max_examples=25, deadline=None)


def tiny(name, width=4, num_classes=10, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return X.build(name, num_classes, width).to(dtype)


def cut_shape(model, cut, size=32):
    """C×H×W of the model's feature at `cut` for one size×size image."""
    return X.feature_shapes([X.split_parts(model, [cut])], size)[0][0]


# ------------------------------------------------------------------------------ models and splitter
SPLIT_TABLE = [  # METHOD.md §2: (net, cut, up-half, down-half with FC, feature at the cut)
    ('res18', 'layer2', 675_392, 10_544_740, (128, 16, 16)),
    ('res34', 'layer2', 1_340_224, 19_988_068, (128, 16, 16)),
    ('res18', 'layer3', 2_775_104, 8_445_028, (256, 8, 8)),
    ('mbv1', 'layer3', 135_040, 3_180_388, (256, 8, 8)),
]


@pytest.mark.parametrize('name,cut,n_up,n_down,shape', SPLIT_TABLE)
def test_parameter_counts_and_cut_shapes_match_the_decks(name, cut, n_up, n_down, shape):
    model = X.build(name, 100)
    up, down = X.split(model, cut)
    assert (X.num_params(up), X.num_params(down)) == (n_up, n_down)
    assert X.num_params(up) + X.num_params(down) == X.num_params(model)
    assert cut_shape(model, cut) == shape


def test_docs_method_states_the_split_table():
    full = {'ResNet18': 'res18', 'ResNet34': 'res34', 'MobileNetV1': 'mbv1'}
    rows = [line.strip('| ').split(' | ') for line in (HERE / 'docs' / 'METHOD.md').read_text().splitlines()
            if line.startswith('| res18,') and line.count('|') == 7]
    table = [(full[r[1]], r[2].split('`')[-2], int(r[3].replace(',', '')), int(r[4].replace(',', '')),
              tuple(int(v) for v in r[5].split('×'))) for r in rows]
    assert table == SPLIT_TABLE


def test_mobilenet_meets_the_resnets_at_layer2():  # METHOD.md §2: all three nets meet at 128×16×16 too
    shapes = {n: cut_shape(X.build(n, 100), 'layer2') for n in X.MODELS}
    assert set(shapes.values()) == {(128, 16, 16)}


def test_mobilenet_pointwise_convs_have_bias_depthwise_and_stem_do_not():
    convs = [m for m in X.build('mbv1', 100).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].bias is None
    for conv in convs[1:]:
        assert (conv.bias is not None) == (conv.kernel_size == (1, 1))


@FAST
@given(a=st.sampled_from(list(X.MODELS)), b=st.sampled_from(list(X.MODELS)),
       cut=st.sampled_from(['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'layer5']),
       batch=st.integers(1, 3), size=st.sampled_from([8, 12, 16, 32]))
def test_split_shapes_chain_and_differing_channels_get_stitches(a, b, cut, batch, size):
    models = [tiny(a), tiny(b, seed=1)]
    for m in models:
        m.eval()
    if any(cut not in m._modules for m in models):  # res18 and res34 have no layer5
        with pytest.raises(ValueError, match='no submodule of that name'):
            [X.split(m, cut) for m in models]
        return
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    parts = [X.split_parts(m, [cut]) for m in models]
    feats = [up(x) for up, _ in parts]
    stitches = X.make_stitches(X.feature_shapes(parts, size), [a, b]).double().eval()
    if feats[0].shape != feats[1].shape:  # only the stems of resnet (width) and mbv1 (width/2) differ
        assert cut == 'stem' and 'mbv1' in (a, b) and a != b and feats[0].shape[2:] == feats[1].shape[2:]
        assert sorted(stitches) == ['1>2@1', '2>1@1']
        assert [len(X.stitches_into(stitches, i)) for i in (0, 1)] == [1, 1]
    else:
        assert len(stitches) == 0
    out = X.run_paths(parts, x, X.all_paths(2, 2), stitches=stitches)
    for i, m in enumerate(models):  # down(up(x)) == model(x), and each down-half reads the other's feature
        assert torch.equal(out[(i, i)], m(x))
        assert out[(1 - i, i)].shape == (batch, 10)


def test_split_shares_the_model_modules():
    model = tiny('res18')
    up, down = X.split(model, 'layer2')
    assert {id(p) for p in up.parameters()} | {id(p) for p in down.parameters()} == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match='nothing is computed after it'):
        X.split(model, 'head')


# --------------------------------------------------------------- any net: fx splitter and stitches
# Nets written the way other codebases write them: the classifier registered before the pooling,
# flatten by view() in forward, functional pooling, a residual block, channels that differ at the cut.
FOREIGN = '''
import torch
from torch import nn
import torch.nn.functional as F


class CifarStyle(nn.Module):  # pytorch-cifar100's habit: fc registered first, view() in forward
    def __init__(self, c=6, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(2 * c, num_classes)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        out = self.avg_pool(out)
        out = out.view(out.size(0), -1)
        return self.fc(out)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))  # a skip connection inside the block


class Residual(nn.Module):  # functional pooling and flatten in forward
    def __init__(self, c=10, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block = Block(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BuiltInForward(nn.Module):  # pytorch-cifar100's BasicBlock: a new ReLU module at every call
    def __init__(self, c_in, c, stride=1):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return nn.ReLU(inplace=True)(self.residual_function(x) + self.shortcut(x))


class StagedResNet(nn.Module):  # pytorch-cifar100's ResNet: stages conv2_x …, fc registered before the pool
    def __init__(self, c=4, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(inplace=True))
        self.conv2_x = nn.Sequential(BuiltInForward(c, c), BuiltInForward(c, c))
        self.conv3_x = nn.Sequential(BuiltInForward(c, 2 * c, 2), BuiltInForward(2 * c, 2 * c))
        self.conv4_x = nn.Sequential(BuiltInForward(2 * c, 4 * c, 2))
        self.fc = nn.Linear(4 * c, num_classes)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        output = self.conv4_x(self.conv3_x(self.conv2_x(self.conv1(x))))
        output = self.avg_pool(output)
        return self.fc(output.view(output.size(0), -1))
'''


def foreign():
    """The module FOREIGN defines."""
    import types
    mod = types.ModuleType('foreign')
    exec(FOREIGN, mod.__dict__)
    return mod


def tv(name, num_classes=10):
    torch.manual_seed(0)
    return X.build(f'tv:{name}', num_classes).eval()


@pytest.mark.parametrize('name,cuts', [('resnet18', ['conv1', 'maxpool', 'layer2', 'layer3.1', 'avgpool']),
                                       ('resnet34', ['layer1', 'layer3']),
                                       ('mobilenet_v2', ['features.2', 'features.6', 'features.13'])])
def test_split_cuts_torchvision_nets_anywhere_the_forward_allows(name, cuts):
    model = tv(name)
    x = torch.randn(2, 3, 32, 32)
    for cut in cuts:
        up, down = X.split(model, cut)
        torch.testing.assert_close(down(up(x)), model(x), rtol=1e-5, atol=1e-6)
        assert {id(p) for p in up.parameters()} | {id(p) for p in down.parameters()} == \
            {id(p) for p in model.parameters()}
    parts = X.split_parts(model, cuts[:2])  # several cuts at once
    h = x
    for part in parts:
        h = part(h)
    torch.testing.assert_close(h, model(x), rtol=1e-5, atol=1e-6)


def test_split_follows_forward_not_the_order_of_registration():
    f = foreign()
    for model, cut in ((f.CifarStyle(), 'conv1'), (f.Residual(), 'block'), (f.Residual(), 'stem')):
        model.eval()
        x = torch.randn(3, 3, 16, 16)
        up, down = X.split(model, cut)
        assert up(x).dim() == 4
        torch.testing.assert_close(down(up(x)), model(x), rtol=1e-5, atol=1e-6)


def test_split_refuses_skip_connections_untraceable_nets_and_unknown_cuts():
    with pytest.raises(ValueError, match='skip connection across the cut'):
        X.split(tv('resnet18'), 'layer2.0.conv1')
    with pytest.raises(ValueError, match='skip connection across the cut'):
        X.split(foreign().Residual(), 'block.conv')

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h.mean((2, 3)) if h.sum() > 0 else h.amax((2, 3)))  # data-dependent control flow

    with pytest.raises(ValueError, match='torch.fx cannot trace Branchy'):
        X.split(Branchy(), 'a')
    with pytest.raises(ValueError, match='no submodule of that name'):
        X.split(tv('resnet18'), 'layer9')
    with pytest.raises(ValueError, match='more than once'):
        X.split(tv('resnet18'), 'layer1.0.relu')  # torchvision's BasicBlock calls its ReLU twice
    with pytest.raises(ValueError, match='order forward computes'):
        X.split_parts(tv('resnet18'), ['layer3', 'layer2'])
    with pytest.raises(ValueError, match='changes its output in place'):  # bn1 is followed by ReLU(inplace=True)
        X.split(tv('resnet18'), 'bn1')

    class Dropping(torch.nn.Module):  # a traced split would freeze self.training
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.dropout(self.a(x), 0.5, self.training).mean((2, 3)))

    with pytest.raises(ValueError, match='depends on self.training'):
        X.split(Dropping(), 'a')


class WritesIntoTheCut(torch.nn.Module):
    """Conv, then one of the ways a forward writes into its output in place, then another conv."""

    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.b = how, torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1)
        self.same = torch.nn.Identity()

    def forward(self, x):
        h = self.a(x)
        if self.how == 'relu_':
            h = torch.relu_(h)
        elif self.how == 'through a view':
            h = F.relu(h.flatten(1), inplace=True).view(h.shape)
        elif self.how == 'through nn.Identity':
            h = self.same(h).add_(1)
        elif self.how == 'through .to':
            h = h.to(torch.float32).mul_(2)
        elif self.how == 'through .cpu':
            h = h.cpu().relu_()
        elif self.how == 'shaped by it':  # out is shaped like h, not h: out.add_(h) writes into out
            out = self.b(h).view_as(h).reshape(h.shape).to(h)
            h = out.add_(h)
        elif self.how == 'clamp_':
            h = h.clamp_(min=0)
        else:  # only reads the cut's output: out.add_(h) writes into out
            out = self.b(h)
            h = out.add_(h)
        return self.b(h)


@pytest.mark.parametrize('how', ['relu_', 'through a view', 'through nn.Identity', 'through .to', 'through .cpu',
                                 'clamp_'])
def test_split_refuses_a_cut_whose_output_the_next_op_changes_in_place(how):
    """One down-half would change the feature the other reads: a wrong crossed path, not an error, if accepted.
    In an nn.Sequential (sliced, not traced) as well as in a forward fx traces."""
    with pytest.raises(ValueError, match='changes its output in place'):
        X.split(WritesIntoTheCut(how), 'a')
    sequential = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                                     torch.nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="at '1': the next operation changes its output in place"):
        X.split(sequential, '1')
    dropping = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Dropout(0.5, inplace=True),
                                   torch.nn.Linear(144, 2))  # writes through the flattened view, in training
    with pytest.raises(ValueError, match="at '0': the next operation changes its output in place"):
        X.split(dropping, '0')
    up, down = X.split(sequential, '2')  # after the in-place ReLU: a clean cut
    x = torch.randn(2, 3, 8, 8)
    f = up(x)
    kept = f.clone()
    down(f)
    assert torch.equal(f, kept)


@pytest.mark.parametrize('how', ['reads only', 'shaped by it'])
def test_a_net_that_only_reads_the_cut_output_in_an_in_place_op_is_split(how):
    model = WritesIntoTheCut(how).eval()
    up, down = X.split(model, 'a')
    x = torch.randn(2, 3, 8, 8)
    f = up(x)
    kept = f.clone()
    torch.testing.assert_close(down(f), model(x), rtol=0, atol=0)
    assert torch.equal(f, kept)


def test_run_paths_refuses_a_part_that_changes_its_input_where_split_cannot_see_it():
    class Doubles(torch.nn.Module):  # data-dependent control flow: fx cannot trace it, so split cannot look inside
        def forward(self, h):
            return h.mul_(2) if h.sum() > -1e9 else h

    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Doubles(), torch.nn.Flatten(), torch.nn.Linear(4, 2))
            for _ in range(2)]
    parts = [X.split(net, '0') for net in nets]
    x = torch.randn(2, 3, 1, 1)
    with torch.no_grad(), pytest.raises(ValueError, match=r'a part changed its input \(the output of path 1\) in'):
        X.run_paths(parts, x, X.all_paths(2, 2))
    with torch.inference_mode():  # inference tensors keep no version counter: nothing to compare, no error
        X.run_paths(parts, x, X.all_paths(2, 2))
    clean = [X.split(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                                         torch.nn.Linear(4, 2)), '0') for _ in range(2)]
    with torch.no_grad():
        out = X.run_paths(clean, x, X.all_paths(2, 2))
    torch.testing.assert_close(out[(0, 1)], clean[1][1](clean[0][0](x)), rtol=0, atol=0)


def test_a_cut_right_after_another_is_looked_into():
    class Two(torch.nn.Module):  # a traced forward cut at a and at b: b, kept whole, starts with an in-place ReLU
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 1)
            self.b = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 1))
            self.c = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x))).mean((2, 3))

    with pytest.raises(ValueError, match="at 'a': the next operation changes its output in place"):
        X.split_parts(Two(), ['a', 'b'])


def test_a_sequential_is_sliced_only_where_its_forward_is_sequentials():
    from collections import OrderedDict

    class Plain(torch.nn.Sequential):  # a subclass with its own constructor: sliced into plain Sequentials
        def __init__(self, c=4):
            super().__init__(OrderedDict(a=torch.nn.Conv2d(3, c, 1), b=torch.nn.ReLU(), c=torch.nn.Conv2d(c, 2, 1)))

    class Doubled(Plain):  # its own forward: traced
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(2, 3, 8, 8)
    for model in (Plain(), Doubled()):
        up, down = X.split(model, 'b')
        torch.testing.assert_close(down(up(x)), model(x), rtol=0, atol=0)
        assert {id(p) for p in up.parameters()} == {id(p) for p in model.a.parameters()}


def test_cut_names_lists_exactly_the_cuts_split_accepts_with_their_shapes():
    class Twice(torch.nn.Module):  # one activation module called at two places
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.act = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv2(self.act(self.conv1(x)))).mean((2, 3)))

    in_place = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                                   torch.nn.Conv2d(4, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, 2))
    for model in (tv('resnet18'), foreign().CifarStyle(), foreign().Residual(), tiny('mbv1').float(), Twice(),
                  in_place):
        model.eval()
        cuts = X.cut_names(model, 16)
        x = torch.randn(2, 3, 16, 16)
        assert cuts
        for name, module in model.named_modules():
            if not name:  # the model itself
                continue
            try:
                up, down = X.split(model, name)
            except ValueError:
                assert name not in cuts
                continue
            if name in cuts:
                assert tuple(up(x).shape[1:]) == cuts[name]
                torch.testing.assert_close(down(up(x)), model(x), rtol=1e-5, atol=1e-6)
            else:  # split accepts it, but it is no feature map, nothing with parameters follows it, or it is the
                # same point as a listed cut of an outer module (layer1.1 ends where layer1 ends)
                same = [c for c in cuts if name.startswith(c + '.') and torch.equal(X.split(model, c)[0](x), up(x))]
                assert up(x).dim() != 4 or not any(True for _ in down.parameters()) or same, name
    r18 = X.cut_names(tv('resnet18'))
    assert r18['layer2'] == (128, 4, 4) and r18['maxpool'] == (64, 8, 8)
    assert 'layer2.0.conv1' not in r18 and 'fc' not in r18 and 'bn1' not in r18  # skip, output, in-place ReLU
    assert list(r18)[:4] == ['conv1', 'relu', 'maxpool', 'layer1.0']  # in the order forward computes them


def test_split_enters_only_the_cuts_ancestors_so_a_block_fx_cannot_trace_stays_whole():
    """pytorch-cifar100's ResNet (a ReLU module built in each block's forward, which fx cannot trace): every stage
    splits exactly, cut_names lists each point once, a cut inside a block is refused naming the block, and the
    in-place and skip-connection refusals still see through the modules kept whole."""
    model = foreign().StagedResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    cuts = X.cut_names(model, 16)
    assert list(cuts) == ['conv1.0', 'conv1', 'conv2_x.0', 'conv2_x', 'conv3_x.0', 'conv3_x', 'conv4_x', 'avg_pool']
    assert cuts['conv3_x'] == (8, 8, 8)
    for stage in ('conv1', 'conv2_x', 'conv3_x', 'conv4_x'):
        up, down = X.split(model, stage)
        assert torch.equal(down(up(x)), model(x)), stage
    assert X.split(model, 'conv2_x.1')[0](x).shape == (2, 4, 16, 16)  # the same point as conv2_x: not listed again
    with pytest.raises(ValueError, match=r'^torch.fx cannot trace conv3_x.0 \(BuiltInForward\) of StagedResNet '
                                         r'\(NameError: .*\); cut outside it'):
        X.split(model, 'conv3_x.0.residual_function.0')

    class Writes(torch.nn.Module):  # after the cut, a module kept whole that writes its input in place
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3)
            self.post = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(4, 4, 1))
            self.skip = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.stem(x)
            return (self.skip(self.post(h)) + h).mean((1, 2, 3))
    with pytest.raises(ValueError, match='changes its output in place'):
        X.split(Writes(), 'stem')
    with pytest.raises(ValueError, match='skip connection'):
        X.split(Writes(), 'post')


def test_pair_stitches_reads_the_channels_changes_no_statistic_and_mismatches_are_refused_in_one_line():
    f = foreign()
    torch.manual_seed(0)
    a, b = f.StagedResNet(c=4), f.StagedResNet(c=6)
    (up1, down1), (up2, down2) = X.split(a, 'conv3_x'), X.split(b, 'conv3_x')
    before = copy.deepcopy(a.state_dict())
    stitch12, stitch21 = X.pair_stitches(up1, up2, 16)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())  # the probe ran in eval mode
    assert a.training and up1.training  # and left the modes as they were
    assert [(s[0].in_channels, s[0].out_channels) for s in (stitch12, stitch21)] == [(8, 12), (12, 8)]
    same = X.pair_stitches(up1, X.split(f.StagedResNet(c=4), 'conv3_x')[0], 16)  # channels agree
    assert all(type(s) is torch.nn.Identity for s in same)
    with pytest.raises(ValueError, match=r"^the up-halves' features differ in more than channels \(8×8×8 and "
                                         r"24×4×4\); choose cuts of the same height and width$"):
        X.pair_stitches(up1, X.split(b, 'conv4_x')[0], 16)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(10, (4,))
    with pytest.raises(ValueError, match=r'^down_2 reads 12×8×8 from up_2 but would get 8×8×8 from up_1; join them '
                                         r'with pair_stitches\(up1, up2\)$'):
        X.xml_pair_losses(up1, down1, up2, down2, x, y)
    with pytest.raises(ValueError, match=r'^down_1 reads 8×8×8 from up_1 but would get 12×8×8 from up_2;'):
        X.cross_accuracy(up1, down1, up2, down2, [(x, y)], stitch12=stitch12)
    assert len(X.xml_pair_losses(up1, down1, up2, down2, x, y, stitch12=stitch12, stitch21=stitch21)) == 2
    nn = torch.nn  # a hand split whose down-half writes its input in place: refused, not trained on a changed feature
    up, writes = nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                   nn.Linear(4, 10))
    with pytest.raises(ValueError, match='^a down-half changed its input in place'):
        X.xml_pair_losses(up, writes, nn.Conv2d(3, 4, 3), copy.deepcopy(writes), x, y)


def stitched_pair(seed=0, dtype=torch.float64):
    """res18 and mbv1 at width 4 cut after the stem: 4 and 2 channels at 16×16, joined by two stitches."""
    models = [tiny('res18', seed=seed, dtype=dtype), tiny('mbv1', seed=seed + 1, dtype=dtype)]
    parts = [X.split_parts(m, ['stem']) for m in models]
    torch.manual_seed(seed + 2)
    stitches = X.make_stitches(X.feature_shapes(parts, 16), ['res18', 'mbv1']).to(dtype)
    return models, parts, stitches


def test_stitches_join_differing_channels_and_refuse_differing_sizes():
    models, parts, stitches = stitched_pair()
    assert sorted(stitches) == ['1>2@1', '2>1@1']
    assert [m.in_channels for m in (stitches['1>2@1'][0], stitches['2>1@1'][0])] == [4, 2]
    assert X.num_params(stitches['1>2@1']) == 4 * 2 + 2 * 2 and X.num_params(stitches['2>1@1']) == 2 * 4 + 2 * 4
    assert X.stitches_into(stitches, 1) == [stitches['1>2@1']]
    with pytest.raises(ValueError, match=r'res18 and mbv1 at cut 1 differ in more than channels \(64×16×16 and 64×32×32\)'):
        X.make_stitches([[(64, 16, 16)], [(64, 32, 32)]], ['res18', 'mbv1'])
    models, parts, stitches = stitched_pair(dtype=torch.float32)  # latency_ms times float32 inputs
    costs = X.path_costs(parts, {X.path_name(p): 0.0 for p in X.all_paths(2, 2)}, 16, stitches=stitches)
    params = {r['path']: r['params'] for r in costs}
    up_down = [[X.num_params(p) for p in net] for net in parts]
    assert params['1-2'] == up_down[0][0] + X.num_params(stitches['1>2@1']) + up_down[1][1]
    assert params['1-1'] == sum(up_down[0])
    flops = X.part_flops(parts, X.all_paths(2, 2), 16, stitches)
    assert flops[(0, 1)] - flops[(1, 1)] == 2 * 4 * 2 * 16 * 16  # down_2 after the stitch's 1×1 conv, 4 → 2


def test_stitch_into_a_net_is_trained_by_that_nets_loss_only():
    """The stitch into down_b is net b's: L_b trains it, L_a does not (though z_ab depends on it), and L_a
    trains up_a through it as through the rest of the fixed partner."""
    models, parts, stitches = stitched_pair()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(10, (6,), generator=g)
    for m in models:
        m.train()
    ref = copy.deepcopy((parts, stitches))
    out = X.run_paths(ref[0], x, X.all_paths(2, 2), stitches=ref[1])
    L = X.xml_losses(out, y, 2, 2, [0, 1])
    s12 = list(ref[1]['1>2@1'].parameters())
    assert max(g.abs().max() for g in torch.autograd.grad(L[0], s12, retain_graph=True)) > 1e-3  # L_1 reaches it
    expected = {'1>2@1': torch.autograd.grad(L[1], s12, retain_graph=True),
                '2>1@1': torch.autograd.grad(L[0], list(ref[1]['2>1@1'].parameters()), retain_graph=True),
                'up1': torch.autograd.grad(L[0], list(ref[0][0][0].parameters()), retain_graph=True),
                'up2': torch.autograd.grad(L[1], list(ref[0][1][0].parameters()))}
    opts = [torch.optim.SGD([*models[i].parameters(), *(p for s in X.stitches_into(stitches, i)
                                                         for p in s.parameters())], lr=0.0) for i in (0, 1)]
    X.train_step(parts, opts, x, y, 'xml', stitches=stitches)
    got = {'1>2@1': [p.grad for p in stitches['1>2@1'].parameters()],
           '2>1@1': [p.grad for p in stitches['2>1@1'].parameters()],
           'up1': [p.grad for p in parts[0][0].parameters()], 'up2': [p.grad for p in parts[1][0].parameters()]}
    for key in expected:
        for a, b in zip(got[key], expected[key]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=key)


def test_a_stitched_xml_pair_learns():
    torch.manual_seed(0)
    data = X.synthetic_data(n_train=64, n_test=8, size=16)
    models, parts, stitches = stitched_pair(dtype=torch.float32)
    mean, std = X.channel_stats(data.train_x)
    x, y = X.normalize(data.train_x, mean, std), data.train_y
    opts = [torch.optim.SGD([*models[i].parameters(), *(p for s in X.stitches_into(stitches, i)
                                                         for p in s.parameters())], lr=0.05, momentum=0.9)
            for i in (0, 1)]
    for m in [*models, stitches]:
        m.train()
    before = copy.deepcopy(stitches.state_dict())
    losses = [X.train_step(parts, opts, x, y, 'xml', stitches=stitches) for _ in range(25)]
    for i in (0, 1):  # each net's own loss (three paths) falls by more than a third on this fixed batch
        assert losses[-1][i] < 0.66 * losses[0][i], [l[i].item() for l in losses]
    for k, v in stitches.state_dict().items():  # and the stitches learned
        assert k.endswith('num_batches_tracked') or (v - before[k]).abs().max() > 1e-3, k
    state = copy.deepcopy(stitches.state_dict())  # evaluation runs them in eval mode: statistics untouched
    X.evaluate(parts, data.test_x, data.test_y, mean, std, stitches=stitches)
    assert all(torch.equal(v, state[k]) for k, v in stitches.state_dict().items()) and stitches.training


def test_set_up_puts_each_stitch_in_the_optimizer_of_the_net_it_feeds(tmp_path):
    """res18 and mbv1 at width 4 cut after the stem (4 and 2 channels): the CLI's set-up makes both stitches,
    gives each to the net it feeds, and one xml step trains them."""
    cfg = X.parse_args(['--pair', 'res18,mbv1', '--cut', 'stem', '--method', 'xml', '--dataset', 'synthetic',
                        '--width', '4', '--device', 'cpu', '--out', str(tmp_path / 'run')])
    run = X.set_up(cfg)
    step, _ = X.make_step(run, False, __import__('random').Random(0))
    for i in (0, 1):
        params = {id(p) for g in run.optimizers[i].param_groups for p in g['params']}
        into = {id(p) for s in X.stitches_into(run.stitches, i) for p in s.parameters()}
        other = {id(p) for s in X.stitches_into(run.stitches, 1 - i) for p in s.parameters()}
        assert into and into <= params and not other & params
    before = copy.deepcopy(run.stitches.state_dict())
    run.stitches.train()
    step(run.data.train_x[:128], run.data.train_y[:128])
    assert all(not torch.equal(before[k], v) for k, v in run.stitches.state_dict().items() if k.endswith('weight'))


BLOCK_START = '# ------------------------------------------------------- XML for any two nets: the copyable block'


def copyable_block():
    """The section of xml_ref.py the README tells a user to copy, as text."""
    source = Path(X.__file__).read_text()
    start = source.index(BLOCK_START)
    return source[start:source.index('\n# ---', start + 1)]


@pytest.mark.parametrize('nets,cuts', [(('CifarStyle(c=6)', 'Residual(c=10)'), ('conv1', 'block')),
                                       (('StagedResNet(c=4)', 'StagedResNet(c=6)'), ('conv3_x', 'conv3_x'))])
def test_the_copyable_block_trains_foreign_nets_in_a_fresh_file_as_xml_ref_does(nets, cuts, tmp_path):
    """The block, pasted alone into a fresh file that imports nothing of this project, splits two nets written
    the way other codebases write them (channels that differ at the cut; pytorch-cifar100's blocks, which build a
    module in forward, split at every stage), stitches them and trains them for a few steps: the same losses,
    gradients, weights and cross accuracies as xml_ref's own step and evaluation."""
    torch.manual_seed(0)
    data = X.synthetic_data(n_train=48, n_test=40, size=16)
    mean, std = X.channel_stats(data.train_x)
    g = torch.Generator().manual_seed(0)
    steps = [(X.normalize(X.augment(data.train_x[i], generator=g), mean, std), data.train_y[i])
             for i in torch.randperm(48, generator=g).view(3, 16)]
    test = [(X.normalize(data.test_x, mean, std), data.test_y)]
    torch.save({'steps': steps, 'test': test}, tmp_path / 'batches.pt')
    (tmp_path / 'xml_block.py').write_text(copyable_block())
    (tmp_path / 'foreign.py').write_text(FOREIGN)
    (tmp_path / 'user.py').write_text('''
import sys
import torch
from foreign import CifarStyle, Residual, StagedResNet
from xml_block import split, cut_names, pair_stitches, xml_pair_losses, routed_backward, cross_accuracy

assert not any(name in sys.modules for name in ('xml_ref', 'tools'))
batches = torch.load('batches.pt')
torch.manual_seed(0)
net1, net2 = NETS
x = batches['test'][0][0][:4]
for net in (net1, net2):  # every cut cut_names lists splits exactly
    net.eval()
    for name in cut_names(net, 16):
        up, down = split(net, name)
        assert torch.equal(down(up(x)), net(x)), name
    net.train()
(up1, down1), (up2, down2) = split(net1, CUT1), split(net2, CUT2)
torch.manual_seed(1)
stitch12, stitch21 = pair_stitches(up1, up2, 16)  # into down_2 (net 2's), into down_1 (net 1's)
opt1 = torch.optim.SGD([*net1.parameters(), *stitch21.parameters()], lr=0.05, momentum=0.9)
opt2 = torch.optim.SGD([*net2.parameters(), *stitch12.parameters()], lr=0.05, momentum=0.9)
losses = []
for x, y in batches['steps']:
    l1, l2 = xml_pair_losses(up1, down1, up2, down2, x, y, stitch12=stitch12, stitch21=stitch21)
    routed_backward([l1, l2], [opt1, opt2])
    opt1.step()
    opt2.step()
    losses.append([l1.item(), l2.item()])
torch.save({'losses': losses, 'grads': [p.grad for p in [*opt1.param_groups[0]['params'],
                                                         *opt2.param_groups[0]['params']]],
            'weights': [net1.state_dict(), net2.state_dict(), stitch12.state_dict(), stitch21.state_dict()],
            'cross': cross_accuracy(up1, down1, up2, down2, batches['test'], stitch12, stitch21)}, 'result.pt')
'''.replace('NETS', ', '.join(nets)).replace('CUT1', repr(cuts[0])).replace('CUT2', repr(cuts[1])))
    run = subprocess.run([sys.executable, 'user.py'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
                              'OMP_NUM_THREADS': '1'})
    assert run.returncode == 0, run.stderr
    copied = torch.load(tmp_path / 'result.pt')
    # the same in xml_ref: its splitter, make_stitches and train_step, and evaluate()
    f = foreign()
    torch.manual_seed(0)
    nets = [eval(n, vars(f)) for n in nets]
    parts = [X.split_parts(m, [c]) for m, c in zip(nets, cuts)]
    torch.manual_seed(1)
    stitches = X.make_stitches(X.feature_shapes(parts, 16), ['cifar', 'residual'])
    opts = [torch.optim.SGD([*nets[i].parameters(), *(p for s in X.stitches_into(stitches, i)
                                                       for p in s.parameters())], lr=0.05, momentum=0.9)
            for i in (0, 1)]
    losses = [[v.item() for v in X.train_step(parts, opts, x, y, 'xml', stitches=stitches).values()]
              for x, y in steps]
    torch.testing.assert_close(torch.tensor(copied['losses']), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(copied['grads'], [p.grad for o in opts for p in o.param_groups[0]['params']]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for saved, module in zip(copied['weights'], [*nets, stitches['1>2@1'], stitches['2>1@1']]):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-6, msg=k)
    cross = X.evaluate(parts, data.test_x, data.test_y, mean, std, stitches=stitches)['cross']
    for a in range(2):
        for b in range(2):
            assert abs(copied['cross'][a][b] - cross[a][b]) <= 100 / 40 + 1e-9, (copied['cross'], cross)


def readme_example():
    """The code block of README.md's 'XML in your own code', as text."""
    text = (HERE / 'README.md').read_text().split('## XML in your own code')[1]
    return text.split('```python\n')[1].split('```')[0]


def test_the_readme_example_trains_as_written_with_the_pasted_block(tmp_path, monkeypatch):
    """README.md's example, read from the README and run unchanged against the pasted block, on one batch of 16
    CIFAR-sized images given 4 times an epoch for 3 epochs: the loss of both nets falls (to about half here), and
    it prints the four paths' accuracies."""
    import importlib
    (tmp_path / 'xml_block.py').write_text(copyable_block())
    monkeypatch.syspath_prepend(str(tmp_path))
    block = importlib.import_module('xml_block')
    seen = []

    def recorded(*args, **kwargs):  # the example's own call, its losses kept
        losses = recorded.wrapped(*args, **kwargs)
        seen.append([loss.item() for loss in losses])
        return losses
    recorded.wrapped = block.xml_pair_losses
    monkeypatch.setattr(block, 'xml_pair_losses', recorded)
    data = X.synthetic_data(n_train=16, n_test=16)
    mean, std = X.channel_stats(data.train_x)
    train_loader = [(X.normalize(data.train_x, mean, std), data.train_y)] * 4
    printed = []
    torch.manual_seed(0)
    try:
        exec(readme_example(), {'train_loader': train_loader, 'epochs': 3, 'print': printed.append,
                                'test_loader': [(X.normalize(data.test_x, mean, std), data.test_y)]})
    finally:
        sys.modules.pop('xml_block', None)
    assert len(seen) == 12 and seen[0][0] > 0
    first, last = torch.tensor(seen[:4]).mean(0), torch.tensor(seen[-4:]).mean(0)
    assert (last < 0.8 * first).all(), seen  # both nets' losses fall, clearly
    assert len(printed) == 1 and len(printed[0]) == 2 and all(0 <= a <= 100 for row in printed[0] for a in row)


def test_a_stitched_torchvision_pair_learns_in_the_warm_up_at_the_defaults(tmp_path):
    """With a tv: net the xml family averages its paths by default (the sum diverged with such pairs where the mean
    did not: results/README.md): tv:resnet18 and tv:mobilenet_v2 joined by stitches, the first 12 steps of the
    recipe's warm-up (here over 40 steps, so the lr reaches 0.0275, not the recipe's 0.1) on one batch of 32
    images: both nets' loss falls by at least 15 % (the sum's rises)."""
    args = ['--dataset', 'synthetic', '--device', 'cpu', '--out', str(tmp_path / 'r')]
    assert X.parse_args(['--pair', 'res18,mbv1', *args]).path_weights == 'sum'  # the deck's nets: the deck's sum
    cfg = X.parse_args(['--pair', 'tv:resnet18,tv:mobilenet_v2', '--cut', 'layer2,features.6', *args])
    assert cfg.path_weights == 'mean' and cfg.lr == 0.1 and cfg.warmup_epochs == 1
    run = X.set_up(cfg)
    assert len(run.stitches) == 2
    x, y = X.normalize(run.data.train_x[:32], run.mean, run.std), run.data.train_y[:32]
    seen = []
    for s in range(12):
        for opt in run.optimizers:
            X.set_lr(opt, X.lr_at(s, 40, cfg.epochs, cfg.lr, cfg.warmup_epochs))
        losses = X.train_step(run.parts, run.optimizers, x, y, 'xml', stitches=run.stitches, own_bn=run.own_bn,
                              **X.loss_options(cfg, 'xml'))
        seen.append([loss.item() for loss in losses.values()])
    for i in range(2):
        assert min(step[i] for step in seen[-3:]) < 0.85 * seen[0][i], seen


def test_cli_trains_torchvision_nets_joined_by_stitches(tmp_path, capsys):
    out = tmp_path / 'tv'
    code, cap = run_cli(['--pair', 'tv:resnet18,tv:mobilenet_v2', '--cut', 'layer2,features.6', '--method', 'xml',
                         '--dataset', 'synthetic', '--epochs', '1', '--batch-size', '128', '--device', 'cpu',
                         '--out', str(out)], capsys)
    assert code == 0, cap.err
    s = json.loads((out / 'summary.json').read_text())
    assert s['net_cuts'] == [['layer2'], ['features.6']] and s['feature_shape'] == [[[128, 4, 4]], [[32, 4, 4]]]
    assert s['stitch_params'] == {'1>2@1': 128 * 32 + 2 * 32, '2>1@1': 32 * 128 + 2 * 128}
    assert s['feature_distance'] is None and len(s['path_costs']) == 4
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    assert sorted({k.split('.')[0] for k in ckpt['stitches']}) == ['1>2@1', '2>1@1']
    code, cap = run_cli(['--pair', 'tv:resnet18,mbv1', '--list-cuts'], capsys)
    assert code == 0 and 'layer2                   128×4×4' in cap.out and 'mbv1: ' in cap.out


@pytest.mark.parametrize('args,words', [
    (['--pair', 'tv:resnet18,tv:nosuchnet'], ['tv:nosuchnet', 'list_models']),
    (['--pair', 'tv:resnet18,tv:resnet34', '--cut', 'layer2.0.conv1'], ['--cut', 'skip connection', '--list-cuts']),
    (['--pair', 'res18,tv:resnet18', '--cut', 'layer2'], ['--cut', '128×16×16', '128×4×4']),
    (['--pair', 'res18,mbv1', '--cut', 'layer2,layer3,layer4'], ['--cut', 'one per net']),
    (['--pair', 'tv:resnet18,tv:mobilenet_v2', '--cut', 'layer2,features.6', '--method', 'xml+l2'],
     ['xml+l2', 'channels differ']),
])
def test_cli_refuses_nets_and_cuts_it_cannot_join_in_one_line(args, words, tmp_path, capsys):
    code, cap = run_cli([*args, '--dataset', 'synthetic', '--device', 'cpu', '--out', str(tmp_path / 'x')], capsys)
    one_line_error(code, cap, *words)
    assert not (tmp_path / 'x').exists()


def test_default_cuts_are_the_decks():
    assert X.default_cut(['res18', 'res34']) == 'layer2'
    assert X.default_cut(['res18', 'mbv1']) == 'layer3'


# ----------------------------------------------------------------------------------------- losses
logits_st = st.integers(0, 10_000).map(lambda s: torch.randn(4, 7, generator=torch.Generator().manual_seed(s),
                                                             dtype=torch.float64) * 3)


def ref_kl(t, s, T=1.0):
    return kl_divergence(Categorical(logits=t.double() / T), Categorical(logits=s.double() / T)).mean() * T * T


@FAST
@given(t=logits_st, s=logits_st, T=st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_kl_matches_torch_distributions_and_is_never_negative(t, s, T):
    value = X.kl_div(t, s, T)
    assert value >= 0
    torch.testing.assert_close(value, ref_kl(t, s, T), rtol=1e-10, atol=1e-12)
    assert X.kl_div(t, t.clone(), T).abs() < 1e-12


def test_kl_temperature_scaling_is_T_squared():
    t, s = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    for T in (2.0, 4.0):  # T² × KL of the softened distributions, computed by hand
        p, q = F.softmax(t / T, 1), F.softmax(s / T, 1)
        torch.testing.assert_close(X.kl_div(t, s, T), T * T * (p * (p / q).log()).sum(1).mean())


def test_kl_target_is_detached():
    t = torch.randn(4, 5, requires_grad=True)
    s = torch.randn(4, 5, requires_grad=True)
    X.kl_div(t, s).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


@FAST
@given(z1=logits_st, z2=logits_st, seed=st.integers(0, 100))
def test_dml_losses_match_the_formula_for_each_net_and_swap_with_the_nets(z1, z2, seed):
    y = torch.randint(7, (4,), generator=torch.Generator().manual_seed(seed))
    L = X.dml_losses({(0, 0): z1, (1, 1): z2}, y, 2, 2, [0, 1])
    torch.testing.assert_close(L[0], F.cross_entropy(z1, y) + ref_kl(z2, z1))
    torch.testing.assert_close(L[1], F.cross_entropy(z2, y) + ref_kl(z1, z2))
    swapped = X.dml_losses({(0, 0): z2, (1, 1): z1}, y, 2, 2, [0, 1])
    torch.testing.assert_close((swapped[0], swapped[1]), (L[1], L[0]))


def test_hint_and_feature_l2_targets_are_detached():
    for loss in (X.hint_loss, X.feature_l2):
        a, b = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
        loss(a, b).backward()
        assert b.grad is None and a.grad.abs().sum() > 0


def test_xml_loss_sum_and_mean_and_kd_and_l2_formulas():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    target = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(5, (6,), generator=g)
    terms = [F.cross_entropy(z, y) + ref_kl(target, z) for z in zs]
    out = {(0, 0): zs[0], (0, 1): zs[1], (1, 0): zs[2], (1, 1): target}  # net 1's three paths, net 2's pure one
    torch.testing.assert_close(X.xml_losses(out, y, 2, 2, [0], path_weights='sum')[0], sum(terms))
    torch.testing.assert_close(X.xml_losses(out, y, 2, 2, [0], path_weights='mean')[0], sum(terms) / 3)
    torch.testing.assert_close(X.kd_loss(zs[0], target, y, T=4.0), F.cross_entropy(zs[0], y) + ref_kl(target, zs[0], 4.0))
    a, b = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(X.feature_l2(a, b), ((a - b) ** 2).sum() / a.numel())
    torch.testing.assert_close(X.hint_loss(a, b), ((a - b) ** 2).sum() / a.numel())


# ------------------------------------------------------------------------------- gradient routing
NAMES, CUT = ('res18', 'mbv1'), 'layer3'


def pair_setup(seed=0):
    models = [tiny(n, seed=seed + i) for i, n in enumerate(NAMES)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(10, (6,), generator=g)
    return models, x, y


def halves(models):
    return [list(X.split(m, CUT)) for m in models]


def ref_term(z, target, y):
    return F.cross_entropy(z, y) + ref_kl(target, z)


# Which terms reach which half, written out from docs/METHOD.md §3 for the pair (net indices 0, 1):
# half (net, part) ← [(path, owner)]: L_owner's term on that path, with every other half fixed.
XML_ROUTES = {(0, 0): [((0, 0), 0), ((0, 1), 0)],   # up_1   ← L_1 on z_11, z_12 (through a fixed down_2)
              (0, 1): [((0, 0), 0), ((1, 0), 0)],   # down_1 ← L_1 on z_11, z_21 (on a fixed up_2 feature)
              (1, 0): [((1, 1), 1), ((1, 0), 1)],   # up_2   ← L_2 on z_22, z_21
              (1, 1): [((1, 1), 1), ((0, 1), 1)]}   # down_2 ← L_2 on z_22, z_12
DML_ROUTES = {h: [r for r in routes if r[0][0] == r[0][1]] for h, routes in XML_ROUTES.items()}


def reference_grads(models, x, y, routes):
    """For each half alone: grad of the terms METHOD.md §3 routes to it, every other half frozen (fresh copies)."""
    grads = {}
    for (net, part), terms in routes.items():
        ms = copy.deepcopy(models)
        hs = halves(ms)
        for m in ms:
            m.requires_grad_(False)
        hs[net][part].requires_grad_(True)
        z = {(a, b): hs[b][1](hs[a][0](x)) for a in range(2) for b in range(2)}
        loss = sum(ref_term(z[path], z[(1 - owner, 1 - owner)], y) for path, owner in terms)
        grads[(net, part)] = torch.autograd.grad(loss, list(hs[net][part].parameters()))
    return grads


def step_grads(models, x, y, method):
    """The gradients train_step leaves on each half (plain SGD with lr 0 applies nothing)."""
    hs = halves(models)
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    X.train_step(hs, opts, x, y, method, 'simultaneous')
    return {(n, p): [q.grad for q in hs[n][p].parameters()] for n in range(2) for p in range(2)}


@pytest.mark.parametrize('method,routes', [('xml', XML_ROUTES), ('dml', DML_ROUTES)])
def test_each_path_trains_exactly_the_halves_spec_names(method, routes):
    models, x, y = pair_setup()
    for m in models:
        m.train()
    expected = reference_grads(models, x, y, routes)
    got = step_grads(models, x, y, method)
    for half in routes:
        for g, e in zip(got[half], expected[half]):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_summing_the_losses_into_one_backward_would_route_wrongly():
    """The routing test can fail: one backward of L_1 + L_2 also trains down_2 on L_1's crossed term."""
    models, x, y = pair_setup()
    expected = reference_grads(models, x, y, XML_ROUTES)
    hs = halves(models)
    out = X.run_paths(hs, x, X.all_paths(2, 2))
    L = X.xml_losses(out, y, 2, 2, [0, 1])
    (L[0] + L[1]).backward()
    naive = [p.grad for p in hs[1][1].parameters()]
    assert max((n - e).abs().max() for n, e in zip(naive, expected[(1, 1)])) > 1e-6


def test_loss_of_one_net_gives_the_other_net_no_gradient():
    models, x, y = pair_setup()
    hs = halves(models)
    opts = [torch.optim.SGD(models[0].parameters(), lr=0.0), None]  # only net 1 is trained
    X.train_step(hs, opts, x, y, 'xml')
    assert all(p.grad is None for p in models[1].parameters())
    assert all(p.grad is not None for p in models[0].parameters())


def grads_after_step(models, x, y, method, **kw):
    """{(net, part): gradients} that train_step leaves on every half of the pair (lr 0 applies nothing)."""
    hs = halves(models)
    for m in models:
        m.zero_grad(set_to_none=True)
    X.train_step(hs, [torch.optim.SGD(m.parameters(), lr=0.0) for m in models], x, y, method, **kw)
    return {(n, p): [q.grad.clone() for q in hs[n][p].parameters()] for n in range(2) for p in range(2)}


def test_mean_path_weights_divide_each_nets_gradient_by_its_three_paths():
    models, x, y = pair_setup(seed=1)
    summed = grads_after_step(models, x, y, 'xml')
    mean = grads_after_step(models, x, y, 'xml', path_weights='mean')
    for half in summed:
        for s, m in zip(summed[half], mean[half]):
            torch.testing.assert_close(m, s / 3, rtol=1e-9, atol=1e-12)


def test_xml_l2_adds_lambda_times_the_feature_gradient_to_each_up_half_only():
    models, x, y = pair_setup(seed=2)
    plain = grads_after_step(models, x, y, 'xml')
    with_l2 = grads_after_step(models, x, y, 'xml+l2', l2_weight=0.3)
    for i in range(2):
        ms = copy.deepcopy(models)
        ups = [X.split(m, CUT)[0] for m in ms]
        f = [up(x) for up in ups]  # train mode, as in the step
        term = 0.3 * ((f[i] - f[1 - i].detach()) ** 2).mean()
        expected = torch.autograd.grad(term, list(ups[i].parameters()))
        for w, p, e in zip(with_l2[(i, 0)], plain[(i, 0)], expected):
            torch.testing.assert_close(w - p, e, rtol=1e-7, atol=1e-10)
        for w, p in zip(with_l2[(i, 1)], plain[(i, 1)]):  # the down-half does not see the term
            torch.testing.assert_close(w, p, rtol=1e-12, atol=1e-14)


def test_xml_l2_with_several_cuts_averages_over_the_cuts_and_the_other_nets():
    models, parts = three_nets(seed=3)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    out = X.run_paths(parts, x, X.all_paths(3, 3))
    plain = X.xml_losses(out, y, 3, 3, [0, 1, 2])
    with_l2 = X.xml_l2_losses(out, y, 3, 3, [0, 1, 2], l2_weight=0.5)
    for i in range(3):
        features = [[out[(j,)].detach(), out[(j, j)].detach()] for j in range(3)]
        terms = [((features[i][c] - features[j][c]) ** 2).mean() for c in range(2) for j in range(3) if j != i]
        torch.testing.assert_close(with_l2[i] - plain[i], 0.5 * sum(terms) / 4)


def test_xml_disc_trains_each_net_on_its_synthesis_labels():
    """L_i = XML on the class logits + w·[BCE(s_ii, 1) + BCE(s_ji, 0) + BCE(s_ij, 1)], s_ab down_b's synthesis
    score of up_a's feature (1 = "my own up-half's"), each net i trained on L_i alone, the other net fixed."""
    models = [tiny(n, num_classes=11, seed=i) for i, n in enumerate(NAMES)]
    _, x, y = pair_setup()
    for m in models:
        m.train()
    got = grads_after_step(models, x, y, 'xml+disc', adv_weight=0.5)
    bce = lambda s, t: F.binary_cross_entropy_with_logits(s, torch.full_like(s, t))
    for i in range(2):
        j = 1 - i
        ms = copy.deepcopy(models)
        hs = halves(ms)
        z = {(a, b): hs[b][1](hs[a][0](x)) for a in range(2) for b in range(2)}
        own = [(i, i), (i, j), (j, i)]
        loss = sum(F.cross_entropy(z[p][:, :10], y) + ref_kl(z[(j, j)][:, :10].detach(), z[p][:, :10]) for p in own)
        loss = loss + 0.5 * (bce(z[(i, i)][:, 10], 1.0) + bce(z[(j, i)][:, 10], 0.0) + bce(z[(i, j)][:, 10], 1.0))
        expected = torch.autograd.grad(loss, list(ms[i].parameters()))
        for g, e in zip(got[(i, 0)] + got[(i, 1)], expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_fitnet_hint_step_trains_only_the_students_up_half_and_the_regressor():
    models, x, _ = pair_setup(seed=4)
    hs = halves(models)
    models[0].eval().requires_grad_(False)  # res18, the teacher
    models[1].train()
    torch.manual_seed(0)
    reg = X.regressor(cut_shape(models[0], CUT)[0], cut_shape(models[1], CUT)[0]).double()
    ref_up, ref_reg, teacher_up = copy.deepcopy(hs[1][0]), copy.deepcopy(reg), copy.deepcopy(hs[0][0])
    expected = torch.autograd.grad(((ref_reg(ref_up(x)) - teacher_up(x)) ** 2).mean(),
                                   list(ref_up.parameters()) + list(ref_reg.parameters()))
    before = [copy.deepcopy(m.state_dict()) for m in models]
    params = list(hs[1][0].parameters()) + list(reg.parameters())
    X.hint_step(hs[1][0], hs[0][0], reg, torch.optim.SGD(params, lr=0.1), x)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    after = [m.state_dict() for m in models]
    assert all(torch.equal(before[0][k], after[0][k]) for k in after[0])  # the teacher, statistics included
    down = {k for k in after[1] if not k.startswith(('stem.', 'layer1.', 'layer2.', 'layer3.'))}
    assert down and all(torch.equal(before[1][k], after[1][k]) for k in down)  # the student's down-half
    assert all(not torch.equal(before[1][k], after[1][k]) for k in after[1] if k.endswith('.weight')
               and k not in down)  # every weight of its up-half moved


def test_the_pair_core_copied_alone_computes_what_the_full_step_computes(tmp_path):
    """xml_pair_losses and routed_backward, pasted into a fresh file that imports torch alone, give the losses
    and the gradients of train_step (sum and mean path weights)."""
    import importlib.util
    import inspect
    source = 'import torch\n\n\n' + '\n\n'.join(inspect.getsource(f) for f in (
        X.shape_text, X.crossed, X.xml_pair_losses, X.routed_backward))
    (tmp_path / 'core.py').write_text(source)
    spec = importlib.util.spec_from_file_location('core', tmp_path / 'core.py')
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    assert set(vars(core)) >= {'xml_pair_losses', 'routed_backward'} and 'X' not in vars(core)
    for weights in ('sum', 'mean'):
        models, x, y = pair_setup(seed=6)
        copies = copy.deepcopy(models)
        full = X.train_step(halves(models), [torch.optim.SGD(m.parameters(), lr=0.0) for m in models], x, y,
                            'xml', path_weights=weights)
        (up1, down1), (up2, down2) = halves(copies)
        losses = core.xml_pair_losses(up1, down1, up2, down2, x, y, mean=weights == 'mean')
        core.routed_backward(losses, [torch.optim.SGD(m.parameters(), lr=0.0) for m in copies])
        torch.testing.assert_close([losses[0].detach(), losses[1].detach()], [full[0], full[1]], rtol=1e-12, atol=0)
        for m, c in zip(models, copies):
            for (name, p), q in zip(m.named_parameters(), c.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13, msg=name)
            for (name, p), q in zip(m.named_buffers(), c.buffers()):  # BatchNorm statistics updated alike
                torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=name)


def sgd_reference_step(models, x, y, routes, lr, sequential):
    """Plain SGD, each net on its own L_i with the other net frozen: simultaneous takes both gradients at the
    old weights; sequential steps net 1, then takes net 2's gradient with net 1's new weights."""
    ms = copy.deepcopy(models)
    of_net = lambda n: {h: r for h, r in routes.items() if h[0] == n}

    def apply(grads):
        for (n, part), gs in grads.items():
            for p, g in zip(X.split(ms[n], CUT)[part].parameters(), gs):
                p.data -= lr * g

    grads = reference_grads(ms, x, y, of_net(0))
    if sequential:
        apply(grads)
        apply(reference_grads(ms, x, y, of_net(1)))
    else:
        grads.update(reference_grads(ms, x, y, of_net(1)))
        apply(grads)
    return ms


@pytest.mark.parametrize('update', X.UPDATES)
@pytest.mark.parametrize('method,routes', [('xml', XML_ROUTES), ('dml', DML_ROUTES)])
def test_both_update_orders_equal_each_net_stepped_on_its_own_loss(method, routes, update):
    models, x, y = pair_setup(seed=3)
    for m in models:
        m.train()
    expected = sgd_reference_step(models, x, y, routes, 0.1, update == 'sequential')
    hs = halves(models)
    X.train_step(hs, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], x, y, method, update)
    for m, e in zip(models, expected):
        for (name, p), q in zip(m.named_parameters(), e.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize('method', ['independent', 'dml'])
def test_several_steps_equal_the_textbook_loop(method):
    """Several steps with momentum, weight decay and BatchNorm in train mode equal the loop every DML codebase
    writes, for the whole nets: one backward of L_1 + L_2, which routes correctly when nothing is crossed
    (each KL target is detached, so L_j reaches net i through nothing). Parameters and BN buffers must agree."""
    models, _, _ = pair_setup(seed=7)
    ref = copy.deepcopy(models)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(10, (8,), generator=g))
               for _ in range(4)]
    # a small lr: these tiny nets on batches of 8 amplify float64 rounding (the two KL formulas sum in other
    # orders) about 50× per step at lr 0.1; a routing or loss error moves the weights by more than 1e-4
    make_opts = lambda ms: [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4) for m in ms]
    opts, ref_opts = make_opts(models), make_opts(ref)
    hs = halves(models)
    for x, y in batches:
        X.train_step(hs, opts, x, y, method)
        z1, z2 = ref[0](x), ref[1](x)
        loss = F.cross_entropy(z1, y) + F.cross_entropy(z2, y)
        if method == 'dml':
            loss = loss + ref_kl(z2.detach(), z1) + ref_kl(z1.detach(), z2)
        for opt in ref_opts:
            opt.zero_grad()
        loss.backward()
        for opt in ref_opts:
            opt.step()
    for m, r in zip(models, ref):
        for (name, t), u in zip(m.state_dict().items(), r.state_dict().values()):
            torch.testing.assert_close(t, u, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize('update', X.UPDATES)
@pytest.mark.parametrize('method', ['xml', 'dml'])
def test_batchnorm_statistics_updated_once_per_distinct_input(method, update):
    """up_a sees x once; down_b sees each up-half's feature it reads once (xml: f_1 then f_2; dml: its own)."""
    models, x, y = pair_setup(seed=5)
    ref = copy.deepcopy(models)
    hs_ref = halves(ref)
    feats = [hs_ref[a][0](x) for a in range(2)]  # train mode: the ups see x once
    for b in range(2):
        for a in (range(2) if method == 'xml' else [b]):
            hs_ref[b][1](feats[a].detach())
    hs = halves(models)
    X.train_step(hs, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], x, y, method, update)
    for m, r in zip(models, ref):
        for (name, buf), rbuf in zip(m.named_buffers(), r.buffers()):
            torch.testing.assert_close(buf, rbuf, rtol=1e-12, atol=1e-12, msg=name)


# --------------------------------------------------------------- BatchNorm: each path's own statistics
@pytest.mark.parametrize('method, update', [('xml', 'simultaneous'), ('xml', 'sequential'), ('dml', 'simultaneous'),
                                            ('independent', 'simultaneous')])
def test_own_statistics_are_an_ordinary_batchnorm_per_source_and_change_nothing_else(method, update):
    """After three SGD steps each set equals what an ordinary BatchNorm (momentum 0.1) holds after normalising
    the same sources' features at each step's weights; with or without the sets, weights, losses and shared
    statistics are bitwise the same. xml: every down-half reads both up-halves, so all four sets are updated;
    dml and independent: only each net's own (the crossed sets stay unused: fallback)."""
    models, x, y = pair_setup(seed=3)
    plain = copy.deepcopy(models)
    hs, hs_plain = halves(models), halves(plain)
    own = X.OwnBatchNorm(hs)
    assert set(own.sets) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    reads = {(a, b) for a in range(2) for b in range(2) if method == 'xml' or a == b}
    refs = {q: copy.deepcopy(hs[q[1]][1]) for q in reads}  # per source: a copy of down_b with its own buffers
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    opts_plain = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in plain]
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        xs = x * (1 + step) + torch.randn(x.shape, generator=g, dtype=x.dtype)  # other statistics every step
        with torch.no_grad():
            ups = [copy.deepcopy(hs[a][0]).train()(xs) for a in range(2)]
            for (a, b), ref in refs.items():
                ref.load_state_dict({**ref.state_dict(), **dict(hs[b][1].named_parameters())})
                ref.train()(ups[a])
        losses = X.train_step(hs, opts, xs, y, method, update, own_bn=own)
        expected = X.train_step(hs_plain, opts_plain, xs, y, method, update)
        assert all(torch.equal(losses[i], expected[i]) for i in range(2))
    for m, p in zip(models, plain):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), p.state_dict().values()))
    for q in own.sets:
        assert own.updated[q] == (q in reads), q
        if q not in reads:  # never run in training: still its start, the shared statistics of the start
            continue
        ref_bns = [m for m in refs[q].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(ref_bns) == len(own.sets[q]) > 0
        for bn, (mean, var) in zip(ref_bns, own.sets[q]):
            torch.testing.assert_close(mean, bn.running_mean, rtol=1e-10, atol=1e-12, msg=str(q))
            torch.testing.assert_close(var, bn.running_var, rtol=1e-10, atol=1e-12, msg=str(q))
    if method == 'xml':  # a down-half's shared statistics mix two sources: neither own set equals them
        shared = [m.running_mean for m in hs[1][1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert not torch.allclose(own.sets[(0, 1)][0][0], shared[0], rtol=1e-3)
        assert not torch.allclose(own.sets[(1, 1)][0][0], shared[0], rtol=1e-3)


@pytest.mark.parametrize('method', ['independent', 'dml'])
def test_own_statistics_of_pure_paths_equal_the_shared_ones_where_one_source_feeds_a_part(method):
    """independent and dml run each down-half on its own up-half only: its own set is its shared statistics,
    bitwise, so every pure path scores the same both ways; the crossed paths were never trained and fall back."""
    models, x, y = pair_setup(seed=4)
    hs = halves(models)
    own = X.OwnBatchNorm(hs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(3):
        X.train_step(hs, opts, x * (step + 1), y, method, own_bn=own)
    for i in range(2):
        bns = [m for m in hs[i][1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(torch.equal(m, bn.running_mean) and torch.equal(v, bn.running_var)
                   for bn, (m, v) in zip(bns, own.sets[(i, i)]))
    data = X.synthetic_data(8, 64, size=16)
    mean, std = X.channel_stats(data.train_x)
    for m in models:
        m.float()
    r = X.evaluate(hs, data.test_x, data.test_y, mean, std, own_bn=own)
    assert r['own_bn']['accuracy'] == r['accuracy'] and r['own_bn']['paths'] == r['paths']
    assert r['own_bn']['fallback'] == ['1-2', '2-1']


def test_evaluation_with_own_statistics_is_each_path_alone_with_its_set_and_leaves_the_shared_ones():
    """evaluate(own_bn=…) scores path a-b as an ordinary net (copies of up_a and down_b) whose down-half carries
    set (a, b) in its running buffers; the shared buffers are back in place afterwards."""
    models, x, y = pair_setup(seed=6)
    hs = halves(models)
    own = X.OwnBatchNorm(hs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(4):
        X.train_step(hs, opts, x + step, y, 'xml', own_bn=own)
    for m in models:
        m.float()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    data = X.synthetic_data(8, 200, size=16)
    mean, std = X.channel_stats(data.train_x)
    r = X.evaluate(hs, data.test_x, data.test_y, mean, std, own_bn=own)
    for m, state in zip(models, before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    for a in range(2):
        for b in range(2):
            down = copy.deepcopy(hs[b][1])
            for bn, (mean_, var) in zip([m for m in down.modules() if isinstance(m, torch.nn.BatchNorm2d)],
                                        own.sets[(a, b)]):
                bn.running_mean.copy_(mean_)
                bn.running_var.copy_(var)
            alone = X.evaluate([[copy.deepcopy(hs[a][0]), down]], data.test_x, data.test_y, mean, std)
            assert r['own_bn']['cross'][a][b] == alone['accuracy'][0], (a, b)
    assert r['own_bn']['cross'] != r['cross']  # so that an evaluation ignoring the sets fails


def test_a_part_without_batchnorm_has_no_statistics_to_fall_back_from():
    """Cut after the last stage, the down-half is pooling and the classifier: no BatchNorm, so every path trained
    is its own (no fallback), and evaluation with own statistics is evaluation with the shared ones."""
    _, x, y = pair_setup(seed=1)
    models = [tiny('res18', seed=1), tiny('res34', seed=2)]
    hs = [list(X.split(m, 'layer4')) for m in models]
    own = X.OwnBatchNorm(hs)
    assert all(s == [] for s in own.sets.values())
    X.train_step(hs, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], x, y, 'xml', own_bn=own)
    data = X.synthetic_data(8, 64, size=16)
    for m in models:
        m.float()
    r = X.evaluate(hs, data.test_x, data.test_y, *X.channel_stats(data.train_x), own_bn=own)
    assert r['own_bn']['fallback'] == [] and r['own_bn']['paths'] == r['paths']

def test_three_nets_three_parts_keep_one_set_per_prefix_and_sampled_paths_update_only_theirs():
    """Part k of net i keeps a set for each prefix of k nets that feeds it (3 per middle part, 9 per last); with
    sampled paths exactly the prefixes of the drawn paths are updated, the others keep their start."""
    models, parts = three_nets(seed=2)
    own = X.OwnBatchNorm(parts)
    assert len(own.sets) == 9 + 27
    assert {q for q in own.sets if len(q) == 2 and q[-1] == 1} == {(0, 1), (1, 1), (2, 1)}
    start = {q: [t.clone() for pair in s for t in pair] for q, s in own.sets.items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g)
    paths = X.step_paths('xml', 3, 3, paths_per_step=2, rng=__import__('random').Random(3))
    X.train_step(parts, [torch.optim.SGD(m.parameters(), lr=0.01) for m in models], x, y, 'xml', paths=paths,
                 own_bn=own)
    drawn = {p[:k] for p in paths for k in (2, 3)}
    assert {q for q, u in own.updated.items() if u} == drawn
    for q, s in own.sets.items():
        same = all(torch.equal(t, u) for t, u in zip((t for pair in s for t in pair), start[q]))
        assert same == (q not in drawn), q


def test_a_stitch_fed_by_several_prefixes_keeps_one_set_per_prefix():
    """Two res18 of widths 4 and 8 in three parts: the stitch from net 1's second feature into net 2 reads out[(0, 0)]
    and out[(1, 0)]; its BatchNorm's own sets for the prefixes (0, 0, 1) and (1, 0, 1) are each that BatchNorm's
    update on its one source alone (a copy run on that feature from the same start), not the mix."""
    models = [tiny('res18', width=w, seed=w) for w in (4, 8)]
    parts = [X.split_parts(m, ['layer1', 'layer2']) for m in models]
    stitches = X.make_stitches(X.feature_shapes(parts, 16), ['res18', 'res18']).double()
    bn = stitches[X.stitch_key(0, 1, 2)][1]
    start = copy.deepcopy(stitches[X.stitch_key(0, 1, 2)])
    own = X.OwnBatchNorm(parts, stitches)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out = X.run_paths(parts, x, X.all_paths(2, 3), own.track, stitches=stitches)
    for source in ((0, 0), (1, 0)):
        alone = copy.deepcopy(start).train()
        with torch.no_grad():
            alone(out[source])
        q = source + (1,)
        assert own.bns[q][0] is bn and own.updated[q]
        torch.testing.assert_close(own.sets[q][0], (alone[1].running_mean, alone[1].running_var), rtol=1e-12,
                                   atol=1e-12)
    assert not torch.allclose(own.sets[(0, 0, 1)][0][0], own.sets[(1, 0, 1)][0][0], rtol=1e-3, atol=1e-3)
    with own.apply((1, 0, 1)):
        assert torch.equal(bn.running_mean, own.sets[(1, 0, 1)][0][0])


def test_own_statistics_agree_with_re_estimation_on_the_same_features_within_their_sampling_noise():
    """Weights fixed (no optimizer step), 60 training forwards: each own set is the exponential average
    (momentum 0.1, about 19 batches' worth) of its batch statistics, and tools/bn_recalib.py's re-estimate the
    plain average over 20 other batches of the same distribution. Both estimate the same expectation, so they
    differ by sampling noise only: every channel within 8 standard errors of the difference, estimated from the
    spread of the batch statistics themselves, plus what is left of the set's start (0.9^60). 8, not 3: the batch
    statistics of the small late layers are skewed, and over the ~2,500 channels of the four paths the largest
    reaches 5–6 (seeds 1–8); a set fed the wrong source is off by hundreds. Seeded: the same verdict everywhere."""
    models, _, _ = pair_setup(seed=8)
    hs = halves(models)
    own = X.OwnBatchNorm(hs)
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        for _ in range(60):
            X.run_paths(hs, draw(), X.all_paths(2, 2), own.track)
    batches = [draw() for _ in range(20)]
    for a in range(2):
        for b in range(2):
            copies = [copy.deepcopy(hs[a][0]), copy.deepcopy(hs[b][1])]
            stats = bn_batch_stats([copy.deepcopy(c) for c in copies], batches)[-len(own.sets[(a, b)]):]
            BN.recalibrate_bn(copies, batches)
            bns = [m for m in copies[1].modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for k, (bn, (mean, var)) in enumerate(zip(bns, own.sets[(a, b)])):
                for got, want, seen, start in ((mean, bn.running_mean, stats[k][0], 0.0),
                                               (var, bn.running_var, stats[k][1], 1.0)):
                    # noise of both averages, and what is left of the set's start after 60 steps (0.9^60)
                    bound = 8 * seen.std(0) * math.sqrt(1 / 19 + 1 / 20) + 0.9 ** 60 * (want - start).abs()
                    assert ((got - want).abs() <= bound + 1e-9).all(), (a, b, k)
                assert not torch.equal(mean, bn.running_mean)  # two estimates, not one copied


# --------------------------------------------------------------------------- training on synthetic
def fixed_batch(size=16, n=32):
    data = X.synthetic_data(n, 8, num_classes=10, size=size, seed=1)
    mean, std = X.channel_stats(data.train_x)
    return X.normalize(data.train_x, mean, std), data.train_y


STEP_METHODS = {'independent': {}, 'kd': {'T': 4.0}, 'dml': {}, 'xml': {}, 'xml-mean': {'path_weights': 'mean'},
                'xml+l2': {'l2_weight': 0.5}, 'xml+disc': {'adv_weight': 0.5}, 'xml+gan': {'adv_weight': 0.5}}


def descent_setup(method, seed=0):
    """A float64 pair in train mode (kd: net 1 the frozen teacher in eval mode), its batch, and the loss options."""
    models, x, y = pair_setup(seed)
    if method == 'xml+disc':  # one output more: the synthesis score
        models = [tiny(n, num_classes=11, seed=seed + i) for i, n in enumerate(NAMES)]
    for m in models:
        m.train()
    kw = dict(STEP_METHODS[method])
    if method == 'xml+gan':
        torch.manual_seed(seed)
        kw['discriminator'] = X.discriminator(cut_shape(models[0], CUT)[0]).double()
    if method == 'kd':
        models[0].eval().requires_grad_(False)
    return models, x, y, kw


def loss_of(method, hs, x, y, learner, kw):
    name = method.replace('-mean', '')
    out = X.run_paths(hs, x, X.step_paths(name, 2, 2))
    if learner == 'discriminator':
        d = kw['discriminator']
        return X.discriminator_loss(d(out[(0,)]).squeeze(1), d(out[(1,)]).squeeze(1))
    return X.LOSSES[name](out, y, 2, 2, [learner], **kw)[learner]


@pytest.mark.parametrize('update', X.UPDATES)
@pytest.mark.parametrize('method', list(STEP_METHODS))
def test_one_small_sgd_step_descends_along_each_learners_own_loss(method, update):
    """float64, plain SGD with a small step η: the step of learner i (its own parameters only, the rest fixed)
    lowers L_i by η·|g|² to first order, g the gradient train_step left; a wrong routing, a missing detach or a
    step along another loss's gradient breaks the equality. η is chosen so that the step lowers L_i by about
    0.1 %: far above float64 rounding (1e-16), far below where curvature matters; the margin is ±25 %."""
    learners = [1] if method == 'kd' else [0, 1] + (['discriminator'] if method == 'xml+gan' else [])
    for learner in learners:
        models, x, y, kw = descent_setup(method)
        hs = halves(models)
        module = kw['discriminator'] if learner == 'discriminator' else models[learner]
        opt = torch.optim.SGD(module.parameters(), lr=0.0)
        with torch.no_grad():
            before = loss_of(method, hs, x, y, learner, kw).item()

        def step():
            X.train_step(hs, [opt if i == learner else None for i in range(2)], x, y, method.replace('-mean', ''),
                         update, disc_optimizer=opt if learner == 'discriminator' else None, **kw)
            return sum((p.grad ** 2).sum().item() for p in module.parameters())
        g2 = step()  # lr 0: the gradient alone (in train mode the BatchNorm running statistics play no part)
        assert g2 > 1e-6, (method, learner)
        eta = 1e-3 * before / g2
        opt.param_groups[0]['lr'] = eta
        assert step() == pytest.approx(g2, rel=1e-9)  # the same gradient, now applied
        with torch.no_grad():
            after = loss_of(method, hs, x, y, learner, kw).item()
        assert 0.75 < (before - after) / (eta * g2) < 1.25, (method, update, learner, before - after, eta * g2)


def test_one_small_hint_step_descends_along_the_hint_loss():
    models, x, _ = pair_setup()
    hs = halves(models)
    models[0].eval().requires_grad_(False)  # res18 teaches mbv1
    torch.manual_seed(0)
    reg = X.regressor(cut_shape(models[0], CUT)[0], cut_shape(models[1], CUT)[0]).double()
    params = list(hs[1][0].parameters()) + list(reg.parameters())
    opt = torch.optim.SGD(params, lr=0.0)

    def loss():
        with torch.no_grad():
            return X.hint_loss(reg(hs[1][0](x)), hs[0][0](x)).item()
    before = loss()
    X.hint_step(hs[1][0], hs[0][0], reg, opt, x)
    g2 = sum((p.grad ** 2).sum().item() for p in params)
    eta = opt.param_groups[0]['lr'] = 1e-3 * before / g2
    X.hint_step(hs[1][0], hs[0][0], reg, opt, x)
    assert g2 > 1e-6 and 0.75 < (before - loss()) / (eta * g2) < 1.25


@pytest.mark.parametrize('method,update', [('independent', 'simultaneous'), ('dml', 'sequential'),
                                           ('xml', 'simultaneous'), ('xml', 'sequential'), ('xml+l2', 'simultaneous')])
def test_every_method_learns_a_fixed_batch(method, update):
    """It learns, in a stable regime (float64, plain SGD, a small lr: no chaotic momentum spikes), judged with a
    wide margin: the mean loss of the last 5 of 40 steps is below 0.5 × the first (measured with 1 and with 2
    threads: 0.01 to 0.07)."""
    models = [tiny(n, width=8, seed=i) for i, n in enumerate(NAMES)]
    hs = halves(models)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    x, y = fixed_batch()
    x = x.double()
    history = [X.train_step(hs, opts, x, y, method, update) for _ in range(40)]
    for i in (0, 1):
        first, last = history[0][i].item(), sum(h[i].item() for h in history[-5:]) / 5
        assert last < 0.5 * first, (method, i, first, last)


# ---------------------------------------------------------------------------------- the fast path
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def run_steps(fast, steps=3, device='cpu', graph=False, bf16=False, width=8, size=16):
    """Train the pair for a few steps through TrainStep (fast: fused SGD with a tensor lr) or train_step, keeping
    each path's own BatchNorm statistics (the models carry their OwnBatchNorm as models.own_bn)."""
    data = X.synthetic_data(32 * steps, 8, size=size, seed=2)
    mean, std = X.channel_stats(data.train_x)
    cfg = argparse.Namespace(lr=0.05, momentum=0.9, weight_decay=5e-4)
    models = [tiny(n, width=width, seed=i, dtype=torch.float32).to(device) for i, n in enumerate(NAMES)]
    hs = halves(models)
    own = X.OwnBatchNorm(hs)
    opts = [X.sgd(m.parameters(), cfg, fused=fast) for m in models]
    g = torch.Generator().manual_seed(0)
    batches = [(X.augment(data.train_x[i * 32:(i + 1) * 32], generator=g), data.train_y[i * 32:(i + 1) * 32])
               for i in range(steps)]
    if fast:
        X.graph_lr(opts, device)  # the lr as a device tensor, whether captured or not

        step = X.TrainStep(functools.partial(X.train_step, hs, opts, method='xml', own_bn=own), [0, 1], mean, std,
                           device, bf16=bf16)
        if graph:
            step = X.CudaGraphStep(step, (32, size, size, 3), device)
        for images, labels in batches:
            step(images.to(device), labels.to(device))
        sums = [step.loss_sum[i].item() for i in range(2)]
    else:
        sums = [0.0, 0.0]
        for images, labels in batches:
            losses = X.train_step(hs, opts, X.normalize(images, mean, std).to(device), labels.to(device), 'xml',
                                  own_bn=own)
            sums = [s + losses[i].item() for i, s in enumerate(sums)]
    return sums, OwnSets(models, own)


class OwnSets(list):
    """The models, with their OwnBatchNorm."""
    def __init__(self, models, own):
        super().__init__(models)
        self.own_bn = own


def assert_same_own_sets(a, b, rtol, atol):
    assert all(a.own_bn.updated.values()) and a.own_bn.updated == b.own_bn.updated
    for q in a.own_bn.sets:
        for (m, v), (n, w) in zip(a.own_bn.sets[q], b.own_bn.sets[q]):
            torch.testing.assert_close(n.float(), m.float(), rtol=rtol, atol=atol, msg=str(q))
            torch.testing.assert_close(w.float(), v.float(), rtol=rtol, atol=atol, msg=str(q))


def test_fast_step_computes_what_the_plain_step_computes():
    """fp32, same inputs: TrainStep (normalising inside, fused SGD reading its lr from a tensor, losses summed on
    the device) leaves the same losses, gradients and weights as train_step with the plain SGD."""
    (plain_sums, plain), (fast_sums, fast) = run_steps(False), run_steps(True)
    assert fast_sums == pytest.approx(plain_sums, rel=1e-5)
    for a, b in zip(plain, fast):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, p), q in zip(a.named_buffers(), b.buffers()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_own_sets(plain, fast, rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_graph_step_computes_what_the_eager_step_computes():
    """fp32 with deterministic cuDNN kernels: 3 eager warm-up steps, the captured step and 2 replays leave what 6
    eager steps leave. (Nondeterministic kernels would differ in the last bits, which XML's early steps amplify.)"""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, False, False
    try:
        (eager_sums, eager), (graph_sums, graphed) = (run_steps(True, 6, 'cuda', graph=g, width=16, size=32)
                                                      for g in (False, True))
        assert graph_sums == pytest.approx(eager_sums, rel=1e-5)
        for a, b in zip(eager, graphed):
            for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
                torch.testing.assert_close(q.float(), p.float(), rtol=1e-4, atol=1e-5, msg=name)
        assert_same_own_sets(eager, graphed, rtol=1e-4, atol=1e-5)  # each captured path wrote its own set
        bf16_sums, _ = run_steps(True, 6, 'cuda', graph=True, bf16=True, width=16, size=32)
        assert all(math.isfinite(s) for s in bf16_sums)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = flags


@CUDA
def test_bf16_step_stays_close_to_the_fp32_step():
    """bf16 autocast (losses, BatchNorm and weights in fp32) against the plain fp32 step, eager, same batches:
    the summed losses of 3 steps agree within 2 % and every weight within 0.02 of its own scale."""
    (fp32_sums, fp32), (bf16_sums, bf16) = (run_steps(True, 3, 'cuda', bf16=b, width=16, size=32)
                                            for b in (False, True))
    assert bf16_sums == pytest.approx(fp32_sums, rel=0.02)
    for a, b in zip(fp32, bf16):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert (q - p).abs().max() <= 0.02 * p.abs().max() + 1e-3, name


@CUDA
def test_cli_fast_path_trains_on_cuda(tmp_path, capsys):
    args = ['--pair', 'res18,mbv1', '--method', 'xml', '--dataset', 'synthetic', '--width', '16', '--epochs', '3',
            '--batch-size', '64', '--fast', 'on']
    assert run_cli([*args, '--out', str(tmp_path / 'a')], capsys)[0] == 0
    summary = json.loads((tmp_path / 'a' / 'summary.json').read_text())
    assert summary['fast'] == 'on' and summary['device'] != 'cpu'
    losses = [json.loads(l)['loss'] for l in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for l in losses for x in l)


# ------------------------------------------------------------------------------ data and evaluation
def test_channel_stats_are_exact():
    x = X.synthetic_data(64, 8).train_x
    mean, std = X.channel_stats(x)
    ref = x.double().div(255).reshape(-1, 3)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean(0))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), ref.std(0, unbiased=False))


def test_normalize_matches_torchvision_to_tensor_then_normalize():
    import torchvision.transforms.functional as TF
    x = X.synthetic_data(4, 4).train_x
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = X.normalize(x, mean, std)
    ref = torch.stack([TF.normalize(TF.to_tensor(im.numpy()), mean, std) for im in x])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.is_contiguous()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 40), size=st.sampled_from([8, 32]))
def test_augment_crops_within_padding_flips_and_never_mixes_images(seed, n, size):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    out = X.augment(x, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (0, 0, 4, 4, 4, 4))
    for k in range(n):  # each output is exactly one crop (offsets 0..8), maybe flipped, of its own image
        matches = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                   if torch.equal(out[k], (lambda c: c.flip(1) if f else c)(padded[k, i:i + size, j:j + size]))]
        assert matches, k


def test_augment_offsets_are_uniform_over_the_padding_on_both_axes_and_flips_half():
    """Channel 0 holds each pixel's row + 1, channel 1 its column + 1 (0: padding), so the centre pixel of a crop
    tells its offsets: top (and left) are uniform on 0 … 2·pad = 0 … 8, the flip has probability ½. 4,000
    images: each frequency is 1/9 ± 0.03 and ½ ± 0.05, six standard deviations."""
    n, size = 4000, 32
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(1, size + 1).view(1, size, 1).expand(n, size, size)
    cols = torch.arange(1, size + 1).view(1, 1, size).expand(n, size, size)
    x = torch.stack([rows, cols, torch.zeros_like(rows)], -1).to(torch.uint8).contiguous()
    out = X.augment(x, generator=g).long()
    top = out[:, 16, 16, 0] - 13  # row top − 4 + 16 of the image, plus 1
    flipped = out[:, 16, 20, 1] < out[:, 16, 10, 1]
    left = out[:, 16, 16, 1] - torch.where(flipped, 12, 13)  # a flipped crop's column 16 is its column 15
    assert 0.45 < flipped.float().mean() < 0.55
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and ((counts.float() / n - 1 / 9).abs() < 0.03).all(), counts.tolist()


def rotation_ties(h, w, angle):
    """H×W booleans: output pixels whose source, in float64, lies within 1e-3 px of a rounding boundary of
    nearest-neighbour sampling (a half-integer): there float32 rounding may pick either neighbour."""
    a = math.radians(angle)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5 - h / 2,
                            torch.arange(w, dtype=torch.float64) + 0.5 - w / 2, indexing='ij')
    u = xs * math.cos(a) - ys * math.sin(a) + w / 2 - 0.5  # source column, then row, in pixels
    v = xs * math.sin(a) + ys * math.cos(a) + h / 2 - 0.5
    return ((u - u.floor() - 0.5).abs() < 1e-3) | ((v - v.floor() - 0.5).abs() < 1e-3)


def test_rotation_is_torchvisions_random_rotation_image_by_image():
    """rotate_images against torchvision's rotate (what RandomRotation calls: nearest, fill 0, about the centre,
    size kept) on each image with the same angle: the same pixels, except where the source of an output pixel
    lies within 1e-3 px of a half-integer, where float rounding may pick either neighbour (none here, but
    another machine's libm may differ in the last bit). Angle 0 leaves the images as they are."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 24, 3), generator=g, dtype=torch.uint8)  # not square: h and w apart
    angles = torch.cat([torch.tensor([0.0, 90.0, -90.0, 45.0, 15.0, -15.0]), (torch.rand(58, generator=g) * 2 - 1) * 180])
    out = X.rotate_images(images, angles)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for img, a, got in zip(images, angles.tolist(), out):
        want = rotate(img.permute(2, 0, 1), a, interpolation=InterpolationMode.NEAREST, fill=0).permute(1, 2, 0)
        differ = (got != want).any(-1)
        assert not (differ & ~rotation_ties(32, 24, a)).any(), a
    assert torch.equal(X.rotate_images(images, torch.zeros(64)), images)
    # the corners of a 45° turn are outside the image: filled with 0
    assert (out[3, 0, 0] == 0).all() and (out[3, -1, -1] == 0).all()


def test_augment_rotates_each_image_by_its_own_uniform_angle_and_not_at_all_with_0(monkeypatch):
    """The angles augment() draws: one per image, uniform on [−15, 15] (Kolmogorov–Smirnov distance to the
    uniform CDF below 0.02 over 20,000 draws; 0.0096 would already be rejected only 5 % of the time, a range of
    [0, 15] or [−7.5, 7.5] is at 0.5 or 0.25), applied after the crop and the flip; rotate=0 draws nothing, so a
    run without rotation keeps the random stream it had before the option existed."""
    seen = []
    monkeypatch.setattr(X, 'rotate_images', lambda images, angles: seen.append((images, angles)) or images)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20000, 4, 4, 3), generator=g, dtype=torch.uint8)
    out = X.augment(x, pad=1, generator=g, rotate=15)
    (cropped, angles), = seen
    assert out is cropped and angles.shape == (20000,) and -15 <= angles.min() and angles.max() <= 15
    cdf = (angles.sort().values + 15) / 30
    ks = (cdf - torch.arange(1, 20001) / 20000).abs().max()
    assert ks < 0.02, ks
    seen.clear()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    X.augment(x[:100], generator=g1, rotate=0)
    X.augment(x[:100], generator=g2, rotate=15)
    assert len(seen) == 1  # only the second rotated …
    monkeypatch.undo()
    g3 = torch.Generator().manual_seed(1)
    assert torch.equal(X.augment(x[:100], generator=g3), X.augment(x[:100], generator=torch.Generator().manual_seed(1),
                                                                   rotate=0))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g3))  # … and rotate=0 drew nothing


@CUDA
def test_rotation_on_the_gpu_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 32, 32, 3), generator=g, dtype=torch.uint8)
    angles = (torch.rand(256, generator=g) * 2 - 1) * 15
    cpu, gpu = X.rotate_images(images, angles), X.rotate_images(images.cuda(), angles.cuda()).cpu()
    for a, c, d in zip(angles.tolist(), cpu, gpu):
        assert not ((c != d).any(-1) & ~rotation_ties(32, 32, a)).any(), a

class CodeUp(torch.nn.Module):
    """A hand-set up-half: image n (every pixel n, normalised with mean 0, std 1) → one-hot of code[n]."""

    def __init__(self, code):
        super().__init__()
        self.register_buffer('code', code)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # evaluate() finds the device through a parameter

    def forward(self, x):
        n = (x[:, 0, 0, 0] * 255).round().long()
        return F.one_hot(self.code[n], len(self.code)).float()[:, :, None, None] + self.anchor


class TableDown(torch.nn.Module):
    """A hand-set down-half: logits = feature · table, so code c gives the table's row c."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, h):
        return h.flatten(1) @ self.table


def hand_set_pair(n=200, classes=10):
    """Images 0 … n−1 with random labels; up_1 passes each image's own code, up_2 scrambles 40 % of them;
    down_1 knows 70 % of the labels, down_2 (with 4× larger logits) 40 %: four paths with four accuracies."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(classes, (n,), generator=g)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 4, 4, 3).contiguous()
    scrambled = torch.randperm(n, generator=g)
    codes = [torch.arange(n), torch.where(torch.rand(n, generator=g) < 0.4, scrambled, torch.arange(n))]
    tables = []
    for known, scale in ((0.7, 1.0), (0.4, 4.0)):
        table = torch.randn(n, classes, generator=g)
        table[torch.arange(n), labels] += 3.0 * (torch.rand(n, generator=g) < known)
        tables.append(table * scale)
    parts = [[CodeUp(c), TableDown(tb)] for c, tb in zip(codes, tables)]
    return parts, images, labels, codes, tables


def test_evaluate_reports_each_path_its_ensemble_and_feature_distance():
    """Hand-set nets whose four paths have four different accuracies: a transposed cross matrix, a path that
    ignores one of its halves, an ensemble of logits instead of probabilities or a wrong distance fails."""
    parts, images, labels, codes, tables = hand_set_pair()
    logits = {(a, b): tables[b][codes[a]].double() for a in range(2) for b in range(2)}
    acc = {p: 100 * (z.argmax(1) == labels).double().mean().item() for p, z in logits.items()}
    assert len(set(acc.values())) == 4  # the test can tell every path from every other
    for z in logits.values():  # no near-tie that float32 could break differently
        top2 = z.topk(2, dim=1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    result = X.evaluate(parts, images, labels, (0, 0, 0), (1, 1, 1), batch_size=64)
    assert result['cross'] == [[pytest.approx(acc[(a, b)]) for b in range(2)] for a in range(2)]
    assert result['paths'] == {f'{a + 1}-{b + 1}': pytest.approx(acc[(a, b)]) for a in range(2) for b in range(2)}
    assert result['accuracy'] == [pytest.approx(acc[(0, 0)]), pytest.approx(acc[(1, 1)])]
    probs = (F.softmax(logits[(0, 0)], 1) + F.softmax(logits[(1, 1)], 1)) / 2
    ensemble = 100 * (probs.argmax(1) == labels).double().mean().item()
    mean_logits = 100 * ((logits[(0, 0)] + logits[(1, 1)]).argmax(1) == labels).double().mean().item()
    assert ensemble != mean_logits  # the data tell a mean of probabilities from a mean of logits
    assert result['ensemble'] == pytest.approx(ensemble)
    distance = 2 * (codes[0] != codes[1]).sum().item() / len(labels) ** 2  # two one-hot entries differ
    assert result['feature_distance'] == pytest.approx(distance)


def test_interpolation_is_a_times_up1_plus_1_minus_a_times_up2_fed_to_each_down_half():
    parts, images, labels, codes, tables = hand_set_pair()
    rows = {r['alpha']: r for r in I.interpolation(parts, images, labels, (0, 0, 0), (1, 1, 1), I.ALPHAS,
                                                    batch_size=64)}
    assert len(I.ALPHAS) == 31 and I.ALPHAS[0] == -1.0 and I.ALPHAS[-1] == 2.0 and 0.5 in rows
    cross = X.evaluate(parts, images, labels, (0, 0, 0), (1, 1, 1))['cross']
    for a, up in ((1.0, 0), (0.0, 1)):  # a = 1: up_1's feature; a = 0: up_2's
        assert [rows[a]['down1'], rows[a]['down2']] == pytest.approx(cross[up])
    assert cross[0] != cross[1]  # so a swapped a and 1 − a fails
    one_hot = [F.one_hot(c, len(labels)).double() for c in codes]
    for a in (-1.0, 0.3, 0.5, 1.7):
        h = a * one_hot[0] + (1 - a) * one_hot[1]
        for b in range(2):
            expected = 100 * ((h @ tables[b].double()).argmax(1) == labels).double().mean().item()
            assert rows[a][f'down{b + 1}'] == pytest.approx(expected), (a, b)


def bn_batch_stats(modules, batches):
    """For each BatchNorm of the path (its modules in order, train mode), the batch mean and unbiased batch variance
    of its input at each batch, stacked: [(means B×C, variances B×C), …]."""
    seen = {}

    def hook(m, inputs, _):
        x = inputs[0].transpose(0, 1).flatten(1)
        seen.setdefault(m, []).append((x.mean(1), x.var(1, unbiased=True)))
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(hook) for m in bns]
    with torch.no_grad():
        for mod in modules:
            mod.train()
        for x in batches:
            for mod in modules:
                x = mod(x)
    for h in hooks:
        h.remove()
    return [(torch.stack([s[0] for s in seen[m]]), torch.stack([s[1] for s in seen[m]])) for m in bns]


def bn_reference(modules, batches):
    """Each BatchNorm's running statistics as the plain mean over the batches of its batch mean and unbiased
    batch variance, the batches run through the path's modules in train mode."""
    return [(means.mean(0), variances.mean(0)) for means, variances in bn_batch_stats(modules, batches)]


def test_bn_recalibration_averages_each_paths_own_statistics_and_leaves_the_trained_ones():
    models, x, y = pair_setup(seed=2)
    hs = halves(models)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64) * (1 + k) for k in range(3)]
    for path in X.all_paths(2, 2):
        copies = [copy.deepcopy(hs[i][k]) for k, i in enumerate(path)]
        expected = bn_reference([copy.deepcopy(c) for c in copies], batches)
        BN.recalibrate_bn(copies, batches)
        bns = [m for mod in copies for m in mod.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m, (mean, var) in zip(bns, expected):
            torch.testing.assert_close(m.running_mean, mean, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(m.running_var, var, rtol=1e-9, atol=1e-12)
    data = X.synthetic_data(8, 32, size=16)
    mean, std = X.channel_stats(data.train_x)
    models = [m.float() for m in models]  # in place: hs holds the same modules
    before = [copy.deepcopy(m.state_dict()) for m in models]
    result = BN.evaluate_recalibrated(hs, data.test_x, data.test_y, mean, std, [b.float() for b in batches])
    for m, state in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k  # the trained statistics (and weights) untouched
    for a in range(2):
        for b in range(2):
            copies = [copy.deepcopy(hs[a][0]), copy.deepcopy(hs[b][1])]
            BN.recalibrate_bn(copies, [b.float() for b in batches])
            alone = X.evaluate([copies], data.test_x, data.test_y, mean, std)['accuracy'][0]
            assert result['cross'][a][b] == pytest.approx(alone)


def torch_schedule(epochs, steps_per_epoch, warmup_epochs, lr=0.1):
    """The recipe from torch.optim.lr_scheduler alone, in pytorch-cifar100's loop: LinearLR stepped per step over the
    warm-up (from ~0 to lr), and MultiStepLR (gamma 0.2, milestones at 30/60/80 % of the epochs) stepped at the start
    of every epoch e = 1, 2, … (the codebase calls step(e) there), so that its last_epoch is e during epoch e."""
    param = torch.zeros(1, requires_grad=True)
    warm_opt, step_opt = torch.optim.SGD([param], lr=lr), torch.optim.SGD([param], lr=lr)
    warm_steps = warmup_epochs * steps_per_epoch
    # LinearLR cannot start at exactly 0; 1e-12 · lr is far below any difference the test could confuse
    warm = torch.optim.lr_scheduler.LinearLR(warm_opt, start_factor=1e-12, end_factor=1.0,
                                             total_iters=max(warm_steps, 1))
    milestones = [max(2, round(f * epochs)) for f in (0.3, 0.6, 0.8)]  # a short run's epoch 1 at lr
    steps = torch.optim.lr_scheduler.MultiStepLR(step_opt, milestones=milestones, gamma=0.2)
    by_epoch = []
    for _ in range(epochs):
        step_opt.step()
        steps.step()
        by_epoch.append(step_opt.param_groups[0]['lr'])
    lrs = []
    for s in range(epochs * steps_per_epoch):
        lrs.append(warm_opt.param_groups[0]['lr'] if s < warm_steps else by_epoch[s // steps_per_epoch])
        warm_opt.step()
        warm.step()
    return lrs


@pytest.mark.parametrize('epochs, steps_per_epoch, warmup', [(200, 391, 1), (200, 7, 1), (10, 13, 1), (10, 5, 2),
                                                             (4, 9, 1), (3, 11, 1), (3, 4, 3), (8, 6, 0), (1, 5, 0),
                                                             (2, 5, 0), (4, 5, 0)])
def test_lr_per_step_equals_torch_linear_warmup_then_multistep(epochs, steps_per_epoch, warmup):
    ours = [X.lr_at(s, steps_per_epoch, epochs, 0.1, warmup) for s in range(epochs * steps_per_epoch)]
    ref = torch_schedule(epochs, steps_per_epoch, warmup)
    for s, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f'step {s} (epoch {s // steps_per_epoch + 1})'
    assert ours[0] == 0.0 if warmup else ours[0] == 0.1
    if not warmup:  # without a warm-up the first epoch trains at lr itself, however short the run
        assert ours[:steps_per_epoch] == [0.1] * steps_per_epoch
    if epochs == 200:  # epochs 60, 120, 160 (counted from 1) are the first at the lower lr, as in pytorch-cifar100
        for e, before, after in ((60, 0.1, 0.02), (120, 0.02, 0.004), (160, 0.004, 0.0008)):
            assert ours[(e - 1) * steps_per_epoch - 1] == pytest.approx(before)
            assert ours[(e - 1) * steps_per_epoch] == pytest.approx(after)


# --------------------------------------------------------------------------------------- the CLI
TINY = ['--dataset', 'synthetic', '--width', '4', '--device', 'cpu', '--epochs', '1', '--batch-size', '64']


def run_cli(args, capsys):
    try:
        code = X.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr()


def test_interpolate_tool_refuses_a_folder_without_a_run_in_one_line(tmp_path, capsys):
    (tmp_path / 'keep.txt').write_text('mine')
    assert I.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no last.pt' in err and 'interpolate.py: error:' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']  # nothing written


def test_bn_recalib_tool_reproduces_the_runs_shared_and_own_numbers_and_re_estimates(tmp_path, capsys):
    out = tmp_path / 'xml'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--out', str(out)], capsys)[0] == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert BN.main([str(out), '--device', 'cpu', '--batches', '2', '--out', str(tmp_path / 'study')]) == 0
    result = json.loads((tmp_path / 'study.json').read_text())[0]
    assert result['trained'] == pytest.approx(summary['paths'])  # shared: what the run reported
    assert result['own'] == pytest.approx(summary['own_bn']['paths'])  # own: what the run reported
    assert result['fallback'] == [] and result['recalibrated'].keys() == result['own'].keys()
    # one epoch of 8 steps: the own statistics are still 43 % their start (0.9^8), the re-estimated ones not
    assert result['recalibrated'] != result['own']
    assert f"| 2-2 | {summary['paths']['2-2']:.2f} | {summary['own_bn']['paths']['2-2']:.2f} |" in \
        (tmp_path / 'study.md').read_text()
    assert BN.main([str(tmp_path / 'nothing'), '--device', 'cpu']) == 2
    assert 'no last.pt' in capsys.readouterr().err
    ckpt = torch.load(out / 'last.pt', weights_only=True)  # statistics of another layout (older code): one line
    ckpt['own_bn']['1-2']['stats'] = ckpt['own_bn']['1-2']['stats'][:-2]
    torch.save(ckpt, out / 'last.pt')
    for tool, extra in ((BN, ['--device', 'cpu']), (EP, ['--path', '1-2', '--out', str(tmp_path / 'p.pt2')])):
        assert tool.main([str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'path 1-2 has' in err[0] and 'use the xml_ref.py that wrote it' in err[0], err


@FAST
@given(labels=st.lists(st.integers(0, 3), max_size=40), n=st.integers(1, 5))
def test_first_per_class_keeps_the_first_n_images_of_each_class_in_the_data_sets_order(labels, n):
    y = torch.tensor(labels, dtype=torch.int64)
    x = torch.arange(len(y), dtype=torch.int64)  # each image its own index
    data = X.Data(x, y, x[:2], y[:2], ['a', 'b', 'c', 'd'])
    seen, keep = {}, []
    for i, c in enumerate(labels):  # by hand: walk the data set, keep what its class still needs
        seen[c] = seen.get(c, 0) + 1
        keep += [i] if seen[c] <= n else []
    if min(seen.get(c, 0) for c in range(4)) < n:
        with pytest.raises(X.UsageError, match=rf'--train-per-class {n}: class .* has only \d+ training images'):
            X.first_per_class(data, n)
        return
    sub = X.first_per_class(data, n)
    assert sub.train_x.tolist() == keep and sub.train_y.tolist() == [labels[i] for i in keep]
    assert sub.test_x is data.test_x and sub.classes == data.classes


def test_train_per_class_trains_on_the_subset_is_recorded_and_resume_compares_it(tmp_path, capsys):
    out = tmp_path / 'r'
    args = ['--pair', 'res18,mbv1', '--method', 'independent', *TINY, '--out', str(out)]
    code, cap = run_cli([*args, '--train-per-class', '20'], capsys)
    assert code == 0, cap.err
    assert json.loads((out / 'summary.json').read_text())['train_per_class'] == 20
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    assert ckpt['data']['train'] == 200 and ckpt['data']['test'] == 256  # 10 classes × 20; the test set whole
    sub = X.first_per_class(X.synthetic_data(), 20)  # summary['train']: each whole net on those 200 images
    x = X.normalize(sub.train_x, *X.channel_stats(sub.train_x))
    for i, name in enumerate(('res18', 'mbv1')):
        net = X.build(name, 10, 4)
        net.load_state_dict(ckpt['nets'][i])
        with torch.no_grad():
            right = (net.eval()(x).argmax(1) == sub.train_y).sum().item()
        fit = json.loads((out / 'summary.json').read_text())['train']['accuracy'][i]
        assert abs(fit - right / 2) <= 0.5 + 1e-9  # within one image (a near tie may fall either way)
    (out / 'summary.json').unlink()  # an unfinished run, as far as --resume can tell
    one_line_error(*run_cli([*args, '--train-per-class', '10', '--resume'], capsys), 'train_per_class=20', 'not 10')
    too_many = tmp_path / 'too_many'
    one_line_error(*run_cli([*args[:-1], str(too_many), '--train-per-class', '1000'], capsys),
                   '--train-per-class 1000: class', 'has only', 'give at most')
    assert not too_many.exists()  # refused before anything was written
    one_line_error(*run_cli([*args, '--train-per-class', '0'], capsys), '--train-per-class must be positive')


def test_eval_every_changes_no_weight_and_best_epoch_is_the_best_evaluated_one(tmp_path, capsys):
    runs = {}
    for every in (1, 2):
        out = tmp_path / f'every{every}'
        code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--epochs', '3', '--eval-every',
                             str(every), '--out', str(out)], capsys)
        assert code == 0, cap.err
        runs[every] = ([json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()],
                       json.loads((out / 'summary.json').read_text()),
                       torch.load(out / 'last.pt', weights_only=True)['nets'])
    (all_, _, nets1), (some, summary, nets2) = runs[1], runs[2]
    assert [r['loss'] for r in all_] == [r['loss'] for r in some]  # the same training, step for step
    assert all(torch.equal(a[k], b[k]) for a, b in zip(nets1, nets2) for k in a)
    assert ['accuracy' in r for r in some] == [False, True, True]  # every 2nd epoch and the last
    assert all(some[e]['paths'] == all_[e]['paths'] and some[e]['own_bn'] == all_[e]['own_bn'] for e in (1, 2))
    assert summary['eval_every'] == 2
    for i in range(2):
        best = max((r['accuracy'][i], -r['epoch']) for r in some[1:])
        assert (summary['best_accuracy'][i], -summary['best_epoch'][i]) == best
        best_own = max((r['own_bn']['accuracy'][i], -r['epoch']) for r in some[1:])
        assert (summary['own_bn']['best_accuracy'][i], -summary['own_bn']['best_epoch'][i]) == best_own


def test_summary_train_block_scores_the_training_images(tmp_path, capsys, monkeypatch):
    """With the test set equal to the training set, each net's fit of its training images (summary['train'])
    is its test top-1, with shared and with its own statistics; the loss is the last epoch's."""
    data = X.synthetic_data()
    same = X.Data(data.train_x, data.train_y, data.train_x, data.train_y, data.classes)
    monkeypatch.setattr(X, 'load_data', lambda name, data_dir: same)
    out = tmp_path / 'r'
    code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--out', str(out)], capsys)
    assert code == 0, cap.err
    summary = json.loads((out / 'summary.json').read_text())
    last = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert summary['train']['accuracy'] == summary['accuracy']
    assert summary['train']['own_bn_accuracy'] == summary['own_bn']['accuracy']
    assert summary['train']['loss'] == last['loss']


def test_cli_xml_run_writes_summary_with_cross_matrix(tmp_path, capsys):
    out = tmp_path / 'xml'
    code, _ = run_cli(['--pair', 'res18,res34', '--method', 'xml', *TINY, '--out', str(out)], capsys)
    assert code == 0
    summary = json.loads((out / 'summary.json').read_text())
    for key in ('method', 'pair', 'cut', 'epochs', 'batch_size', 'lr', 'seed', 'accuracy', 'best_accuracy', 'cross',
                'ensemble', 'feature_distance', 'device', 'torch', 'wall_s'):
        assert key in summary, key
    assert summary['pair'] == 'res18,res34' and summary['cut'] == 'layer2'
    assert len(summary['cross']) == 2 and all(len(r) == 2 for r in summary['cross'])
    assert summary['accuracy'] == [summary['cross'][0][0], summary['cross'][1][1]]
    own = summary['own_bn']
    assert len(own['cross']) == 2 and own['accuracy'] == [own['cross'][0][0], own['cross'][1][1]]
    assert own['fallback'] == [] and own['best_epoch'] == [1, 1] and own['best_accuracy'] == own['accuracy']
    assert [r['accuracy'] for r in summary['path_costs']] == [own['paths'][r['path']] for r in summary['path_costs']]
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1
    assert (out / 'last.pt').exists() and (out / 'best.pt').exists()


@pytest.mark.parametrize('cut', [[], ['--cut', 'stem']])  # the deck's cut; stitched (4 and 2 channels)
def test_an_exported_path_runs_without_xml_ref_carries_its_own_statistics_and_scores_the_runs_number(cut, tmp_path,
                                                                                                     capsys):
    out = tmp_path / 'xml'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, *cut, '--out', str(out)], capsys)[0] == 0
    summary = json.loads((out / 'summary.json').read_text())
    own = torch.load(out / 'last.pt', weights_only=True)['own_bn']
    data = X.synthetic_data()
    torch.save({'x': data.test_x, 'y': data.test_y}, tmp_path / 'test.pt')
    for path in (['2-1'] if cut else ['1-2']):  # one crossed path per cut (export is slow), both directions in all
        assert EP.main([str(out), '--path', path, '--out', str(tmp_path / f'{path}.pt2')]) == 0
        assert f'test top-1 {summary["own_bn"]["paths"][path]:.2f} (the run: ' in capsys.readouterr().out
        # a fresh interpreter with torch alone
        script = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); d = torch.load(sys.argv[2]); "
                  "assert 'xml_ref' not in sys.modules; "
                  "print(100.0 * sum((m(d['x'][s:s + 500]).argmax(1) == d['y'][s:s + 500]).sum().item() "
                  "for s in range(0, len(d['x']), 500)) / len(d['x']))")
        r = subprocess.run([sys.executable, '-c', script, str(tmp_path / f'{path}.pt2'), str(tmp_path / 'test.pt')],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-1000:]
        assert float(r.stdout) == summary['own_bn']['paths'][path]
        # the BatchNorm layers of its stitch (if any) and down-half hold the path's own set, not the shared statistics
        state = torch.export.load(str(tmp_path / f'{path}.pt2')).state_dict
        last = max(int(k.split('.')[1]) for k in state if k.startswith('parts.'))  # after the stitch, if any
        assert last == (2 if cut else 1)
        down = [k for k in state if k.startswith('parts.') and int(k.split('.')[1]) >= 1
                and k.endswith(('running_mean', 'running_var'))]
        assert len(down) == len(own[path]['stats']) and own[path]['updated']
        assert all(torch.equal(state[k], t) for k, t in zip(down, own[path]['stats']))
    assert EP.main([str(out), '--path', '1-3', '--out', str(tmp_path / 'x.pt2')]) == 2
    assert 'give 2 net numbers from 1 to 2' in capsys.readouterr().err and not (tmp_path / 'x.pt2').exists()
    (tmp_path / 'folder').mkdir()
    assert EP.main([str(out), '--path', '1-2', '--out', str(tmp_path / 'folder')]) == 2
    assert 'is a directory' in capsys.readouterr().err and not list(tmp_path.glob('folder*.tmp'))

def test_cli_kd_and_fitnet_learn_from_a_teacher_checkpoint(tmp_path, capsys):
    teacher = tmp_path / 'teacher'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'independent', *TINY, '--out', str(teacher)], capsys)[0] == 0
    for method in ('kd', 'fitnet'):
        out = tmp_path / method
        code, err = run_cli(['--pair', 'res18,mbv1', '--method', method, *TINY, '--teacher', str(teacher / 'last.pt'),
                             '--out', str(out)], capsys)
        assert code == 0, err
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['student'] == 2 and summary['teacher']['net'] == 1  # res18 is the larger net
        teacher_acc = json.loads((teacher / 'summary.json').read_text())['accuracy'][0]
        assert summary['accuracy'][0] == teacher_acc  # the frozen teacher is unchanged
        stages = [json.loads(l)['stage'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
        assert stages == (['hint', 'train'] if method == 'fitnet' else ['train'])


@pytest.mark.parametrize('cut', [[], ['--cut', 'stem']])  # the deck's cut; stitched (4 and 2 channels)
def test_cli_resume_continues_to_the_same_result(cut, tmp_path, capsys, monkeypatch):
    args = ['--pair', 'res18,mbv1', '--method', 'xml', *TINY[:-4], '--epochs', '2', '--batch-size', '128', *cut]
    full, part = tmp_path / 'full', tmp_path / 'part'
    assert run_cli([*args, '--out', str(full)], capsys)[0] == 0

    def stop(*_):  # stop the run after its first checkpoint, as a crash would
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(X, 'progress_line', stop)
        with pytest.raises(KeyboardInterrupt):
            X.main([*args, '--out', str(part)])
    assert torch.load(part / 'last.pt', weights_only=True)['epoch'] == 1 and not (part / 'summary.json').exists()
    assert run_cli([*args, '--out', str(part)], capsys)[0] == 2  # unfinished: needs --resume or --force
    assert run_cli([*args, '--out', str(part), '--resume'], capsys)[0] == 0
    a, b = (json.loads((d / 'summary.json').read_text()) for d in (full, part))
    assert (a['accuracy'], a['cross'], a['feature_distance']) == (b['accuracy'], b['cross'], b['feature_distance'])
    wa, wb = ([*c['nets'], c['stitches']] for c in (torch.load(d / 'last.pt', weights_only=True) for d in (full, part)))
    assert len(wa[-1]) == (12 if cut else 0)  # each stitch: conv weight, BatchNorm weight, bias and 3 buffers
    for sa, sb in zip(wa, wb):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    code, cap = run_cli([*args, '--out', str(part), '--resume', '--lr', '0.2'], capsys)
    assert code == 2 and 'finished run' in cap.err


def record_lrs(monkeypatch):
    """Patch the step functions to record the learning rate each optimizer holds when a step is taken."""
    seen = []
    real_train, real_hint = X.train_step, X.hint_step

    def train_step(parts, optimizers, *args, **kw):
        seen.append(('train', [float(g['lr']) for o in optimizers if o is not None for g in o.param_groups]))
        return real_train(parts, optimizers, *args, **kw)

    def hint_step(up, teacher_up, reg, optimizer, *args, **kw):
        seen.append(('hint', [float(g['lr']) for g in optimizer.param_groups]))
        return real_hint(up, teacher_up, reg, optimizer, *args, **kw)
    monkeypatch.setattr(X, 'train_step', train_step)
    monkeypatch.setattr(X, 'hint_step', hint_step)
    return seen


def test_the_schedule_is_what_the_optimizers_hold_at_every_step(tmp_path, capsys, monkeypatch):
    """512 synthetic images at batch 64: 8 steps an epoch; 3 epochs with 1 warm-up epoch, and fitnet, whose two
    stages (2 hint epochs, then 3 kd epochs) each warm up on their own."""
    seen = record_lrs(monkeypatch)
    args = ['--pair', 'res18,mbv1', *TINY[:-4], '--batch-size', '64', '--lr', '0.2']
    assert run_cli([*args, '--method', 'dml', '--epochs', '3', '--out', str(tmp_path / 'dml')], capsys)[0] == 0
    expected = [X.lr_at(s, 8, 3, 0.2, 1) for s in range(24)]
    assert [lrs for _, lrs in seen] == [[pytest.approx(lr)] * 2 for lr in expected]
    # 3 epochs: milestones round(0.9, 1.8, 2.4) = 1, 2, 2, so epoch 2 (after the warm-up) trains at 0.2 × 0.2³
    assert expected[0] == 0 and expected[7] == pytest.approx(0.2 * 7 / 8) and expected[8] == pytest.approx(0.0016)
    seen.clear()
    teacher = str(tmp_path / 'dml' / 'last.pt')
    assert run_cli([*args, '--method', 'fitnet', '--teacher', teacher, '--epochs', '3', '--hint-epochs', '2',
                    '--out', str(tmp_path / 'fitnet')], capsys)[0] == 0
    assert [stage for stage, _ in seen] == ['hint'] * 16 + ['train'] * 24
    assert [lrs[0] for _, lrs in seen] == pytest.approx([X.lr_at(s, 8, 2, 0.2, 1) for s in range(16)] + expected)


def test_a_run_resumed_inside_the_warm_up_continues_its_schedule(tmp_path, capsys, monkeypatch):
    args = ['--pair', 'res18,mbv1', '--method', 'xml', *TINY[:-4], '--batch-size', '64', '--epochs', '3',
            '--warmup-epochs', '2', '--out', str(tmp_path / 'r')]
    with monkeypatch.context() as m:
        m.setattr(X, 'progress_line', lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            X.main(args)  # stopped after epoch 1 of the 2 warm-up epochs
    seen = record_lrs(monkeypatch)
    assert run_cli([*args, '--resume'], capsys)[0] == 0
    assert [lrs for _, lrs in seen] == [[pytest.approx(X.lr_at(s, 8, 3, 0.1, 2))] * 2 for s in range(8, 24)]
    summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert summary['warmup_epochs'] == 2


def test_best_epoch_and_best_checkpoint_follow_the_metrics(tmp_path, capsys, monkeypatch):
    """Top-1 per epoch chosen with ties (net 1: 10, 30, 30, 20; net 2: 5, 5, 7, 7; own statistics: 40, 40, 45, 45
    and 50, 60, 60, 55): the best epoch of each net is the first that reached its best, shared and own, and
    best.pt holds the epoch of the best mean (epoch 3: 18.5 against 17.5)."""
    shared, own = [(10.0, 5.0), (30.0, 5.0), (30.0, 7.0), (20.0, 7.0)], [(40.0, 50.0), (40.0, 60.0), (45.0, 60.0),
                                                                           (45.0, 55.0)]
    calls = iter([0, 1, 2, 3, 3])  # the four epochs, then the summary's fit of the training images

    def fake_evaluate(parts, *args, **kw):
        e = next(calls)

        def block(a, b):
            return {'accuracy': [a, b], 'paths': {'1-1': a, '1-2': a, '2-1': b, '2-2': b}, 'cross': [[a, a], [b, b]],
                    'ensemble': a, 'feature_distance': 0.0}
        return {**block(*shared[e]), 'own_bn': {**block(*own[e]), 'fallback': []}}
    monkeypatch.setattr(X, 'evaluate', fake_evaluate)
    out = tmp_path / 'b'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'dml', *TINY[:-4], '--batch-size', '64', '--epochs', '4',
                    '--out', str(out)], capsys)[0] == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['best_accuracy'] == [30.0, 7.0] and summary['best_epoch'] == [2, 3]
    assert summary['own_bn']['best_accuracy'] == [45.0, 60.0] and summary['own_bn']['best_epoch'] == [3, 2]
    assert torch.load(out / 'best.pt', weights_only=True)['epoch'] == 3


@pytest.mark.parametrize('method,T', [('kd', 4.0), ('fitnet', 4.0), ('dml', 1.0), ('xml', 1.0)])
def test_the_default_temperature_is_4_for_kd_and_fitnet_else_1(method, T, tmp_path):
    (tmp_path / 't.pt').write_bytes(b'')
    extra = ['--teacher', str(tmp_path / 't.pt')] if method in ('kd', 'fitnet') else []
    cfg = X.parse_args(['--method', method, '--pair', 'res18,mbv1', *extra, '--out', str(tmp_path / 'o')])
    assert cfg.temperature == T and X.loss_options(cfg, 'kd' if method == 'fitnet' else method)['T'] == T
    assert X.parse_args(['--method', method, '--pair', 'res18,mbv1', *extra, '--temperature', '2', '--out',
                         str(tmp_path / 'o')]).temperature == 2.0


@pytest.mark.parametrize('edit, words', [
    (lambda ckpt: ckpt['config'].update(device='cuda'), ('written on cuda', '--device cuda')),  # as if on a GPU
    (lambda ckpt: ckpt['config'].pop('schedule'), ('older xml_ref.py', '--force')),  # before the milestone fix
    (lambda ckpt: ckpt.pop('own_bn'), ('older xml_ref.py', '--force')),  # before the per-path statistics
    (lambda ckpt: ckpt['own_bn']['1-2'].update(stats=[]), ('does not fit this run', 'ValueError', '--force')),
], ids=['another_kind_of_device', 'older_schedule', 'no_own_statistics', 'own_statistics_that_do_not_fit'])
def test_resuming_a_checkpoint_that_would_change_the_run_is_refused(edit, words, tmp_path, capsys, monkeypatch):
    """A last.pt written on another kind of device (its data order comes from that device's generator) or before
    the lr milestones moved one epoch earlier (no 'schedule' in its config; the schedule would switch in mid-run)
    or before each path kept its own BatchNorm statistics (no 'own_bn'), or whose state does not load into the
    run's (a traceback, were it not caught): refused in one line, the file untouched."""
    args = ['--pair', 'res18,mbv1', '--method', 'xml', *TINY[:-4], '--batch-size', '64', '--epochs', '2',
            '--out', str(tmp_path / 'r')]
    with monkeypatch.context() as m:
        m.setattr(X, 'progress_line', lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            X.main(args)
    ckpt = torch.load(tmp_path / 'r' / 'last.pt', weights_only=True)
    assert ckpt['config']['schedule'] == 'pytorch-cifar100' and ckpt['config']['device'] == 'cpu'
    edit(ckpt)
    torch.save(ckpt, tmp_path / 'r' / 'last.pt')
    before = (tmp_path / 'r' / 'last.pt').read_bytes()
    one_line_error(*run_cli([*args, '--resume'], capsys), *words)
    assert (tmp_path / 'r' / 'last.pt').read_bytes() == before


BAD_INPUTS = [
    (['--pair', 'res18,vgg16'], 'unknown model'),
    (['--method', 'distill'], 'invalid choice'),
    (['--pair', 'res18'], 'two nets'),
    (['--pair', 'res18,res34,mbv1'], 'two nets'),
    (['--pair', 'res18,mbv1', '--cut', 'layer2,layer3'], 'differ in more than channels'),
    (['--cut', 'layer9'], 'no submodule of that name'),
    (['--epochs', '0'], '--epochs must be positive'),
    (['--batch-size', '-1'], '--batch-size must be positive'),
    (['--lr', '0'], '--lr must be positive'),
    (['--lr', 'nan'], '--lr must be positive, got nan'),  # NaN fails every comparison
    (['--rotate', 'nan'], '--rotate must not be negative, got nan'),
    (['--momentum', 'nan'], '--momentum must not be negative, got nan'),
    (['--device', 'mps'], 'runs on cuda, cuda:N or cpu'),
    (['--epochs', 'many'], 'invalid int'),
    (['--dataset', 'folder', '--data-dir', '/nonexistent/dir'], 'not a directory'),
    (['--method', 'kd'], 'needs --teacher'),
    (['--nets', 'res18,res34,mbv1', '--method', 'kd'], 'is for a pair cut once'),
    (['--nets', 'res18,res34,mbv1', '--cuts', 'layer2,layer3', '--paths-per-step', '30'], '--paths-per-step'),
    (['--cuts', 'layer3,layer2'], 'order forward computes them'),
    (['--method', 'xml', '--freeze', '2'], 'needs --init2'),
    (['--cut', 'layer2', '--cuts', 'layer2'], 'not both'),
    (['--epochs', '2', '--warmup-epochs', '3'], '--warmup-epochs must be 0 … 2'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be'),
    (['--pair', 'res18,mbv1', '--method', 'xml+disc', '--paths-per-step', '1'], '--paths-per-step goes with'),
    (['--pair', 'res18,mbv1', '--method', 'xml+gan', '--paths-per-step', '1'], '--paths-per-step goes with'),
    (['--pair', 'res18,mbv1', '--method', 'dml', '--paths-per-step', '1'], '--paths-per-step goes with'),
]


@pytest.mark.parametrize('args,message', BAD_INPUTS)
def test_cli_bad_input_is_one_line_and_exit_status_2(args, message, capsys, tmp_path):
    code, cap = run_cli([*args, '--out', str(tmp_path / 'never')], capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], cap.err
    assert not (tmp_path / 'never').exists()


def test_cli_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    out = tmp_path / 'done'
    args = ['--pair', 'res18,res34', '--method', 'independent', *TINY, '--out', str(out)]
    assert run_cli(args, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, cap = run_cli(args, capsys)
    assert code == 2 and 'finished run' in cap.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_shows_every_default_that_is_a_value():
    """A default of 0 (--seed) is a value to show; only None and False (options that are off or derived) are not."""
    help_text = ' '.join(X.make_parser().format_help().split())
    assert 'augmentation (default: 0)' in help_text and '(default: None)' not in help_text
    assert '(default: False)' not in help_text


def test_cli_as_a_subprocess_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / 'xml_ref.py'), '--pair', 'res18,nope'], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'unknown model' in r.stderr


# ------------------------------------------------------------------ interpolation, report, reproduce
def fake_summary(root, name, method='xml', seed=0, cross=((60.0, 40.0), (50.0, 30.0)), own=None, **settings):
    """A summary.json as a finished run writes it, with chosen numbers (own: the cross matrix with own BatchNorm
    statistics; None: a run from before they existed)."""
    s = {'method': method, 'pair': 'res18,mbv1', 'nets': ['res18', 'mbv1'], 'cut': 'layer3', 'update': 'simultaneous',
         'path_weights': 'sum', 'paths_per_step': None, 'temperature': 1.0, 'l2_weight': 1.0, 'adv_weight': 0.1,
         'frozen': [], 'teacher': None, 'hint_epochs': 0, 'epochs': 8, 'warmup_epochs': 1, 'batch_size': 128,
         'lr': 0.1, 'momentum': 0.9, 'weight_decay': 5e-4, 'seed': seed, 'dataset': 'folder', 'width': 16,
         'rotate': 15.0, 'fast': 'off', 'sync_bn': False, 'schedule': X.SCHEDULE,
         'accuracy': [cross[0][0], cross[1][1]],
         'best_accuracy': [cross[0][0] + 1, cross[1][1] + 1], 'cross': [list(r) for r in cross], 'ensemble': 55.0,
         'feature_distance': 0.5, 'device': 'cpu (2 threads)', 'torch': '2', 'date': '2026-11-29',
         'wall_s': 60.0, 'command': f'python xml_ref.py {name}', **settings,
         'own_bn': own and {'accuracy': [own[0][0], own[1][1]], 'best_accuracy': [own[0][0] + 2, own[1][1] + 2],
                            'cross': [list(r) for r in own], 'ensemble': 57.0}}
    (root / name).mkdir(parents=True)
    (root / name / 'summary.json').write_text(json.dumps(s))


def test_report_keeps_every_setting_apart_pools_seeds_and_reads_the_cross_matrix_right(tmp_path):
    runs = tmp_path / 'runs'
    fake_summary(runs, 'xml_s0', seed=0, cross=((60.0, 40.0), (50.0, 30.0)))
    fake_summary(runs, 'xml_s1', seed=1, cross=((62.0, 42.0), (52.0, 32.0)))
    fake_summary(runs, 'xml_seq', update='sequential', cross=((61.0, 41.0), (51.0, 31.0)))
    fake_summary(runs, 'xml_warm0', warmup_epochs=0, cross=((10.0, 11.0), (12.0, 13.0)))
    fake_summary(runs, 'xml_own0', seed=0, rotate=0.0, own=((70.0, 71.0), (72.0, 73.0)))
    fake_summary(runs, 'xml_own1', seed=1, rotate=0.0, own=((72.0, 71.0), (72.0, 75.0)))
    fake_summary(runs, 'dml', method='dml', cross=((66.0, 6.0), (7.0, 55.0)))
    fake_summary(runs, 'xml_r1', paths_per_step=1, cross=((1.0, 2.0), (3.0, 4.0)))
    fake_summary(runs, 'xml_cut2', cut='layer2', cross=((5.0, 6.0), (7.0, 8.0)))
    fake_summary(runs, 'xml_old', schedule=None, cross=((20.0, 21.0), (22.0, 23.0)))  # before the milestone fix
    R.report(runs, tmp_path / 'out')
    md = (tmp_path / 'out' / 'RESULTS.md').read_text()
    rows = {}  # the first line of each label: its row of the accuracy table
    for line in md.splitlines():
        if line.startswith('| '):
            rows.setdefault(line.split(' | ')[0][2:], line)
    # the two seeds are one row: mean ± sample std over n = 2
    # net 1 shared, net 1 own, net 2 shared, net 2 own; '–' for runs from before the own statistics
    assert rows['xml'].startswith('| xml | 61.00 ± 1.41 / 62.00 ± 1.41 | – / – | 31.00 ± 1.41 / 32.00 ± 1.41 | – / – |')
    assert rows['xml'].endswith('| 2 |')
    assert '| xml, 1 crossed paths a step | 1.00 / 2.00 | – / – | 4.00 / 5.00 | – / – |' in md
    assert '## res18,mbv1, cut layer2, folder, 8 epochs, width 16' in md  # another cut: another table
    assert '| xml | 5.00 / 6.00 | – / – | 8.00 / 9.00 | – / – |' in md
    assert rows['xml, no rotation'].startswith('| xml, no rotation | 60.00 ± 0.00 / 61.00 ± 0.00 | '
                                               '71.00 ± 1.41 / 73.00 ± 1.41 | 30.00 ± 0.00 / 31.00 ± 0.00 | '
                                               '74.00 ± 1.41 / 76.00 ± 1.41 | 55.00 ± 0.00 | 57.00 ± 0.00 |')
    for label in ('xml, sequential update', 'xml, warm-up 0 epochs', 'xml, no rotation', 'dml',
                  'xml, lr × 0.2 one epoch after each milestone (code before 2026-11-29)'):
        lines = sum(line.startswith(f'| {label} |') for line in md.split('## res18,mbv1, cut layer2')[0].splitlines())
        assert lines == (3 if 'rotation' in label else 2), label  # accuracy, cross pairings shared (, own)
    cross = [line for line in md.splitlines() if line.startswith('| dml | 66.00 |')]
    assert cross == ['| dml | 66.00 | 7.00 | 6.00 | 55.00 |']  # up1→down1, up2→down1, up1→down2, up2→down2
    assert '| xml, no rotation | 71.00 ± 1.41 | 72.00 ± 0.00 | 71.00 ± 0.00 | 74.00 ± 1.41 |' in md
    assert 'Shared by these runs:' in md and 'simultaneous update' not in md.split('Shared by these runs:')[1][:200]
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert set(results['runs']) == {'xml_s0', 'xml_s1', 'xml_seq', 'xml_warm0', 'xml_own0', 'xml_own1', 'dml',
                                    'xml_r1', 'xml_cut2', 'xml_old'}
    pooled = next(r for r in results['rows'] if r['label'] == 'xml')
    assert pooled['seeds'] == [0, 1] and pooled['accuracy'][0] == pytest.approx([61.0, math.sqrt(2)])


def test_report_gives_the_paired_difference_of_each_seed_and_its_spread(tmp_path):
    """Three seeds of xml, dml and independent: xml − independent per seed from the same seed's two runs (not from
    the means), for each net, shared and own statistics; mean ± sample std over the seeds."""
    runs = tmp_path / 'runs'
    acc = {'independent': [(70.0, 60.0), (71.0, 61.0), (72.0, 59.0)], 'dml': [(71.0, 62.0), (70.0, 64.0), (74.0, 60.0)],
           'xml': [(69.0, 65.0), (72.0, 66.0), (70.0, 64.0)]}
    for method, per_seed in acc.items():
        for seed, (a, b) in enumerate(per_seed):
            fake_summary(runs, f'{method}_s{seed}', method=method, seed=seed, cross=((a, 0.0), (0.0, b)),
                         own=((a + 1, 0.0), (0.0, b + 10 * seed)))
    R.report(runs, tmp_path / 'out')
    md = (tmp_path / 'out' / 'RESULTS.md').read_text()
    assert '| xml − independent | shared | 1: res18 | s0: -1.00, s1: +1.00, s2: -2.00 | -0.67 ± 1.53 |' in md
    assert '| xml − independent | shared | 2: mbv1 | s0: +5.00, s1: +5.00, s2: +5.00 | +5.00 ± 0.00 |' in md
    assert '| xml − dml | own | 2: mbv1 | s0: +3.00, s1: +2.00, s2: +4.00 | +3.00 ± 1.00 |' in md
    assert '| dml − independent | own | 1: res18 | s0: +1.00, s1: -1.00, s2: +2.00 | +0.67 ± 1.53 |' in md
    paired = json.loads((tmp_path / 'out' / 'results.json').read_text())['paired_differences'][0]['rows']
    assert len(paired) == 3 * 2 * 2 + 2 * 2 and paired[0]['seeds'] == [0, 1, 2]


def test_report_compares_each_crossed_path_with_the_pure_path_of_its_down_half(tmp_path):
    """Within each xml seed: up2→down1 − up1→down1 (net 1's down-half) and up1→down2 − up2→down2 (net 2's), from the
    cross matrix cross[a][b] = up a → down b, shared and own statistics; a run without own statistics gives '–'."""
    runs = tmp_path / 'runs'
    fake_summary(runs, 'xml_s0', seed=0, cross=((70.0, 61.0), (66.0, 60.0)), own=((72.0, 65.0), (71.0, 64.0)))
    fake_summary(runs, 'xml_s1', seed=1, cross=((68.0, 63.0), (67.0, 58.0)), own=None)
    fake_summary(runs, 'dml_s0', method='dml', seed=0, cross=((69.0, 9.0), (8.0, 59.0)))
    R.report(runs, tmp_path / 'out')
    md = (tmp_path / 'out' / 'RESULTS.md').read_text()
    assert '| xml: up2→down1 − up1→down1 | shared | 1: res18 | s0: -4.00, s1: -1.00 | -2.50 ± 2.12 |' in md
    assert '| xml: up1→down2 − up2→down2 | shared | 2: mbv1 | s0: +1.00, s1: +5.00 | +3.00 ± 2.83 |' in md
    assert '| xml: up2→down1 − up1→down1 | own | 1: res18 | s0: -1.00, s1: – | -1.00 |' in md
    assert '| xml: up1→down2 − up2→down2 | own | 2: mbv1 | s0: +1.00, s1: – | +1.00 |' in md
    assert 'dml: up' not in md  # only xml trains its crossed paths


def test_report_states_the_regime_and_plots_each_methods_curve_over_its_seeds(tmp_path):
    runs = tmp_path / 'runs'
    for seed, loss, fit in ((0, (0.10, 0.30), (99.0, 90.0)), (1, (0.20, 0.50), (97.0, 86.0))):
        fake_summary(runs, f'xml_s{seed}', seed=seed, train_per_class=500, own=((70.0, 71.0), (72.0, 73.0)),
                     train={'loss': list(loss), 'accuracy': [0.0, 0.0], 'own_bn_accuracy': list(fit)})
        # evaluated epochs 5 and 10 only (--eval-every 5): epoch 7 has no accuracy
        recs = [{'epoch': e, 'loss': [1.0, 1.0], **({'accuracy': [0.0, 0.0], 'own_bn': {'accuracy': [e + seed, 2.0 * e]}}
                                                    if e % 5 == 0 else {})} for e in (5, 7, 10)]
        (runs / f'xml_s{seed}' / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    fake_summary(runs, 'dml_s0', method='dml', train_per_class=500)  # from before 'train': no regime row
    assert R.curves(runs / 'xml_s1') == ([5, 10], [[6, 10.0], [11, 20.0]])
    R.report(runs, tmp_path / 'out', name='e200')
    md = (tmp_path / 'out' / 'e200.md').read_text()
    assert 'the first 500 training images of each class' in md.split('Shared by these runs:')[1].split('\n')[0]
    # mean ± sample std over the two seeds: loss to 3 digits, the own-statistics training top-1 to 2
    assert '| xml | 0.150 ± 0.071 | 98.00 ± 1.41 | 0.400 ± 0.141 | 88.00 ± 2.83 |' in md
    assert '| dml |' not in md.split('The regime at the end of training')[1].split('\n\n')[1]  # its table
    try:
        import matplotlib  # noqa: F401 (optional: the report has no plot without it)
    except ImportError:
        assert not list((tmp_path / 'out').glob('*.png'))
        return
    assert (tmp_path / 'out' / 'e200_res18-mbv1.png').stat().st_size > 1000
    assert '[e200_res18-mbv1.png](e200_res18-mbv1.png)' in md


def test_report_writes_the_folders_of_this_machine_as_placeholders(tmp_path):
    """--as FOLDER=NAME: no command, path or heading of the report names the folder, the deeper folder first."""
    runs, data = tmp_path / 'runs', tmp_path / 'runs' / 'data'
    fake_summary(runs, 'xml_s0', command=f'python xml_ref.py --data-dir {data} --out {runs}/xml_s0')
    assert R.main([str(runs), '--out', str(tmp_path / 'out'), '--as', f'{runs}=RUNS_DIR',
                   '--as', f'{data}=DATA_DIR']) == 0
    for f in ('RESULTS.md', 'results.json'):
        text = (tmp_path / 'out' / f).read_text()
        assert str(tmp_path) not in text and '--data-dir DATA_DIR --out RUNS_DIR/xml_s0' in text
    assert 'report.py RUNS_DIR`' in (tmp_path / 'out' / 'RESULTS.md').read_text()
    fake_summary(runs, 'xml_s1', seed=1, command=f'python xml_ref.py --out {runs}2/xml_s1')  # another folder
    assert R.main([str(runs), '--out', str(tmp_path / 'out'), '--as', f'{runs}=RUNS_DIR']) == 0
    assert f'--out {runs}2/xml_s1' in (tmp_path / 'out' / 'RESULTS.md').read_text()
    # a folder inside a longer one, a trailing slash, a backslash in NAME, a relative folder that is also a word
    fake_summary(runs, 'xml_s2', seed=2,
                 command=f'PYTHONPATH={runs}:/x python xml_ref.py --data-dir /home{data} --out {runs}/xml_s2')
    assert R.main([str(runs), '--out', str(tmp_path / 'out'), '--as', f'{runs}/=R\\D', '--as', f'{data}=DATA_DIR',
                   '--as', 'runs=RUNS_DIR', '--as', 'folder=F']) == 0
    md = (tmp_path / 'out' / 'RESULTS.md').read_text()
    assert f'PYTHONPATH=R\\D:/x python xml_ref.py --data-dir /home{data} --out R\\D/xml_s2`' in md
    assert 'from the runs below' in md and ', cut layer3, folder, 8 epochs' in md  # words and values stay


def test_report_refuses_a_seed_twice_lists_unfinished_runs_and_counts_what_it_averages(tmp_path, capsys):
    """A second run of the same settings and seed would count as another seed in the table and replace the first in
    the paired differences: refused, naming both. A started run without summary.json is named, not silently left out;
    a row mixing runs with and without own statistics says how many the own cells average."""
    runs = tmp_path / 'runs'
    fake_summary(runs, 'xml_s0', seed=0, own=((70.0, 0.0), (0.0, 60.0)))
    fake_summary(runs, 'xml_s1', seed=1)  # from before the own statistics
    fake_summary(runs, 'dml_s0', method='dml', seed=0, cross=((66.0, 6.0), (7.0, 55.0)))
    (runs / 'dml_s1').mkdir()
    (runs / 'dml_s1' / 'last.pt').write_bytes(b'a checkpoint')
    assert R.main([str(runs), '--out', str(tmp_path / 'out')]) == 0
    md = (tmp_path / 'out' / 'RESULTS.md').read_text()
    assert 'Not finished, so not in the tables: dml_s1.' in md
    assert '| xml | 60.00 ± 0.00 / 61.00 ± 0.00 | 70.00 / 72.00 |' in md
    assert md.count('| 2 (1 with own statistics) |') == 1
    rows = json.loads((tmp_path / 'out' / 'results.json').read_text())['rows']
    row = next(r for r in rows if r['label'] == 'dml')
    assert row['cross'] == [[[66.0, None], [6.0, None]], [[7.0, None], [55.0, None]]] and row['ensemble'] == [55.0, None]
    fake_summary(runs, 'xml_s0_again', seed=0)
    assert R.main([str(runs), '--out', str(tmp_path / 'out2')]) == 2
    assert 'xml_s0, xml_s0_again: the same settings and seed more than once' in capsys.readouterr().err
    assert not (tmp_path / 'out2').exists()


def markdown_links(text):
    """The targets of a Markdown text's links and images, outside code blocks and code spans."""
    import re
    text = re.sub(r'^(```|~~~).*?^\1', '', text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r'^(?: {4}|\t).*$', '', text, flags=re.M)  # indented code blocks
    text = re.sub(r'(`+).+?\1', '', text)  # code spans
    return [m.group(1) for m in re.finditer(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', text)]


def github_anchors(text):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as '-'."""
    import re
    anchors, seen = set(), {}
    for m in re.finditer(r'^#{1,6}\s+(.*?)\s*#*\s*$', re.sub(r'^(```|~~~).*?^\1', '', text, flags=re.S | re.M),
                         flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', m.group(1).lower()).replace(' ', '-')
        anchors.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_the_readme_and_docs_resolves_to_a_file_of_the_repository():
    """README.md, docs/ and results/'s README.md and HISTORY.md link to files (and headings) that exist in the repository,
    never outside it: a moved section or a renamed file breaks no link."""
    assert markdown_links('[a](x.md) `[b](y.md)` [c](<z.md> "t") ![d](p.png)') == ['x.md', 'z.md', 'p.png']
    assert github_anchors('## The CPU layout: channels_last\n# Sum or mean over a net\'s paths') == {
        'the-cpu-layout-channels_last', 'sum-or-mean-over-a-nets-paths'}
    pages = [HERE / 'README.md', *sorted((HERE / 'docs').glob('*.md')), *(HERE / 'results' / f for f in ('README.md', 'HISTORY.md'))]
    checked, broken = 0, []
    for page in pages:
        for link in markdown_links(page.read_text()):
            if link.startswith(('http://', 'https://', 'mailto:')):
                continue
            path, _, anchor = link.partition('#')
            target = (page.parent / path).resolve() if path else page
            if path.startswith('/') or HERE not in (target, *target.parents) or not target.exists():
                broken.append(f'{page.relative_to(HERE)}: {link}')
            elif anchor and target.suffix == '.md' and anchor not in github_anchors(target.read_text()):
                broken.append(f'{page.relative_to(HERE)}: {link} (no such heading)')
            checked += 1
    assert checked > 30 and broken == []


def test_the_decks_numbers_are_those_docs_method_states():
    """METHOD.md §4, top-1 % (net order as in the pair); cross[a][b] = up-half of net a+1 → down-half of net b+1."""
    deck = R.DECK
    assert deck['res18,mbv1']['accuracy'] == {'independent': [74.0, 62.6], 'dml': [74.3, 65.9], 'xml': [73.6, 68.3],
                                              'xml+l2': [None, 68.5]}
    assert deck['res18,res34']['accuracy'] == {'independent': [73.9, 75.5], 'dml': [75.7, 76.6],
                                               'xml': [76.6, 77.0]}
    # the deck's columns: up1→down1, up2→down1, up1→down2, up2→down2
    for pair, (a, b, c, d) in {'res18,mbv1': (73.20, 70.21, 72.25, 68.89),
                               'res18,res34': (76.06, 76.25, 76.61, 76.61)}.items():
        assert deck[pair]['cross'] == [[a, c], [b, d]]
    assert deck['res18,mbv1']['feature_distance'] == {'xml': 0.002, 'xml+l2': 0.001}
    # and docs/METHOD.md, which a reader checks the code against, states the same numbers
    method = (HERE / 'docs' / 'METHOD.md').read_text()
    rows = [line.split(' | ') for line in method.splitlines() if line.startswith(('| res18,', '| res18 ('))]
    nets = {'res18,mbv1': ['ResNet18', 'MobileNetV1'], 'res18,res34': ['ResNet18', 'ResNet34']}
    for pair, names in nets.items():
        for i, name in enumerate(names):
            row = next(r for r in rows if r[0] == f'| {pair}' and r[1] == name and len(r) == 5)
            assert [float(v.split()[0]) for v in row[2:]] == [deck[pair]['accuracy'][m][i] for m in ('independent', 'dml', 'xml')]
    crossed = [[float(v.strip(' |')) for v in r[1:]] for r in rows if r[0].startswith('| res18 (')]
    assert crossed == [[73.20, 70.21, 72.25, 68.89], [76.06, 76.25, 76.61, 76.61]]
    assert '68.5 with +L2' in method and '0.002' in method and '0.001' in method


def resnet_macs(blocks, classes=100, width=64):
    """Multiply-adds of a CIFAR ResNet forward, counted by hand from its architecture."""
    macs, c_in, size = 3 * width * 9 * 32 * 32, width, 32
    for k, n in enumerate(blocks):
        c, size = width * 2 ** k, size // (2 if k else 1)
        macs += c_in * c * 9 * size ** 2 + c * c * 9 * size ** 2 + (c_in * c * size ** 2 if c_in != c else 0)
        macs += (n - 1) * 2 * c * c * 9 * size ** 2
        c_in = c
    return macs + c_in * classes


def test_step_flops_match_a_hand_count():
    models = [X.build(n, 100) for n in ('res18', 'res34')]
    parts = [list(X.split(m, 'layer2')) for m in models]
    fwd = [X.forward_flops(m, torch.zeros(1, 3, 32, 32))[0] for m in models]
    assert fwd == [2 * resnet_macs((2, 2, 2, 2)), 2 * resnet_macs((3, 4, 6, 3))]
    assert B.step_flops(parts, 'dml') == 3 * sum(fwd)
    up = [X.forward_flops(p[0], torch.zeros(1, 3, 32, 32))[0] for p in parts]
    assert B.step_flops(parts, 'xml') == 3 * (up[0] + up[1] + 2 * (fwd[0] - up[0]) + 2 * (fwd[1] - up[1]))
    assert B.step_flops(parts, 'xml') / 1e9 == pytest.approx(15.8, rel=0.01)  # the figure of results/bench.md


def test_reproduce_sh_runs_end_to_end_and_writes_the_table(tmp_path):
    """reproduce.sh --quick for one pair (--pair; each run is a fresh process, so both pairs would double the
    time for the same script lines): its seven runs, the interpolation of the three xml runs, the report; then a
    second call that skips them all, and a third with other settings that is refused before anything runs."""
    env = {**__import__('os').environ, 'PYTHON': sys.executable}
    quick = ['bash', str(HERE / 'reproduce.sh'), '--quick', '--pair', 'res18,mbv1', '--runs', str(tmp_path / 'runs')]
    r = subprocess.run(quick + ['--results', str(tmp_path / 'results')], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / 'results' / 'RESULTS.md').read_text()
    results = json.loads((tmp_path / 'results' / 'results.json').read_text())
    assert set(results['runs']) == {f'res18-mbv1_{m}' for m in ('independent', 'dml', 'xml', 'xml-mean', 'xml+l2',
                                                                 'kd', 'fitnet')}
    assert '## res18,mbv1, cut layer3, synthetic, 1 epoch, width 8' in md and '| xml (mean) |' in md
    assert md.count('each path\'s own BatchNorm statistics') == 1  # the second cross table
    assert all(run['rotate'] == 15 and run['own_bn']['cross'] for run in results['runs'].values())
    for name in ('res18-mbv1_xml', 'res18-mbv1_xml-mean', 'res18-mbv1_xml+l2'):
        run = results['runs'][name]
        by_alpha = {row['alpha']: row for row in run['interpolation']}
        assert [by_alpha[1.0]['down1'], by_alpha[1.0]['down2']] == pytest.approx(run['cross'][0], abs=0.006)
        assert [by_alpha[0.0]['down1'], by_alpha[0.0]['down2']] == pytest.approx(run['cross'][1], abs=0.006)
    teacher = results['runs']['res18-mbv1_kd']['command']  # the pair's independent run teaches kd and fitnet
    assert f'--teacher {tmp_path / "runs"}/res18-mbv1_independent/last.pt' in teacher
    # a second call finds every run finished and only rewrites the table: synthetic, so beside the runs, not results/
    r = subprocess.run(quick, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count('finished, skipped') == 7
    assert f'wrote {tmp_path / "runs"}/RESULTS.md' in r.stdout and (tmp_path / 'runs' / 'results.json').exists()
    # other settings into the same runs folder: stopped before anything runs, not a report of the old runs
    r = subprocess.run(quick + ['--results', str(tmp_path / 'other'), '--', '--seed', '1'], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and 'res18-mbv1_independent/summary.json is of another command' in r.stderr
    assert 'finished, skipped' not in r.stdout and not (tmp_path / 'other').exists()


# ----------------------------------------------------------------- K nets × P parts, beyond the deck
THREE, CUTS = ('res18', 'res34', 'mbv1'), ('layer2', 'layer3')


def three_nets(seed=0):
    models = [tiny(n, seed=seed + i) for i, n in enumerate(THREE)]
    return models, [X.split_parts(m, CUTS) for m in models]


def test_k_nets_p_parts_have_k_to_the_p_paths_whose_shapes_chain():
    models, parts = three_nets()
    paths = X.all_paths(3, 3)
    assert len(paths) == 27 and len(set(paths)) == 27 and len(X.pure_paths(3, 3)) == 3
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = X.run_paths(parts, x, paths)
    assert all(out[p].shape == (2, 10) for p in paths)
    assert len(out) == 1 + 3 + 9 + 27  # every prefix run once
    for p in X.pure_paths(3, 3):  # a pure path is the whole net
        torch.testing.assert_close(out[p], models[p[0]](x))


def test_sampled_paths_reach_every_crossed_path():
    rng = __import__('random').Random(0)
    crossed = {p for p in X.all_paths(3, 3) if len(set(p)) > 1}
    seen = set()
    for _ in range(200):
        paths = X.step_paths('xml', 3, 3, paths_per_step=4, rng=rng)
        assert paths[:3] == X.pure_paths(3, 3) and len(set(paths[3:])) == 4 and set(paths[3:]) <= crossed
        seen |= set(paths[3:])
    assert seen == crossed


def test_k_net_xml_loss_and_routing_match_a_reference():
    """L_i = Σ_{p ∋ i} [CE(z_p) + mean_{j≠i} KL(z_jjj‖z_p)], differentiated w.r.t. net i's parts only."""
    models, parts = three_nets(seed=7)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(10, (4,), generator=g)
    for m in models:
        m.train()
    expected = []
    for i in range(3):
        ms = copy.deepcopy(models)
        ps = [X.split_parts(m, CUTS) for m in ms]
        for j, m in enumerate(ms):
            m.requires_grad_(j == i)
        z = {p: ps[p[2]][2](ps[p[1]][1](ps[p[0]][0](x))) for p in X.all_paths(3, 3)}
        loss = sum(F.cross_entropy(z[p], y) + sum(ref_kl(z[(j,) * 3], z[p]) for j in range(3) if j != i) / 2
                   for p in z if i in p)
        expected.append(torch.autograd.grad(loss, list(ms[i].parameters())))
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    X.train_step(parts, opts, x, y, 'xml')
    for m, e in zip(models, expected):
        for (name, p), q in zip(m.named_parameters(), e):
            torch.testing.assert_close(p.grad, q, rtol=1e-9, atol=1e-12, msg=name)
    for m in models:
        m.zero_grad(set_to_none=True)
    X.train_step(parts, [opts[0], None, None], x, y, 'xml')  # only net 1 learns: the others get nothing
    assert all(p.grad is None for m in models[1:] for p in m.parameters())


def test_cli_pair_as_k_nets_equals_the_pair_run(tmp_path, capsys):
    common = ['--method', 'xml', *TINY]
    assert run_cli(['--pair', 'res18,mbv1', '--cut', 'layer3', *common, '--out', str(tmp_path / 'a')], capsys)[0] == 0
    assert run_cli(['--nets', 'res18,mbv1', '--cuts', 'layer3', *common, '--out', str(tmp_path / 'b')], capsys)[0] == 0
    a, b = (json.loads((tmp_path / d / 'summary.json').read_text()) for d in 'ab')
    assert (a['accuracy'], a['cross'], a['feature_distance']) == (b['accuracy'], b['cross'], b['feature_distance'])


def test_cli_three_nets_three_parts_reports_every_path_with_its_cost(tmp_path, capsys):
    out = tmp_path / 'k3'
    code, cap = run_cli(['--nets', ','.join(THREE), '--cuts', ','.join(CUTS), '--method', 'xml', '--paths-per-step',
                         '5', *TINY, '--out', str(out)], capsys)
    assert code == 0, cap.err
    summary = json.loads((out / 'summary.json').read_text())
    rows = summary['path_costs']
    assert len(rows) == 27 and len(summary['paths']) == 27 and len(summary['accuracy']) == 3
    assert [r['gflops'] for r in rows] == sorted(r['gflops'] for r in rows)
    assert any(r['pareto'] for r in rows) and rows[0]['pareto']  # the cheapest is never dominated in FLOPs
    by_name = {r['path']: r for r in rows}
    for i, name in enumerate(THREE):  # a pure path costs what its net costs
        assert by_name['-'.join([str(i + 1)] * 3)]['params'] == X.num_params(X.build(name, 10, 4))
        assert all(r['latency_ms_b1'] > 0 and r['latency_ms_b128'] > 0 for r in rows)
    assert 'Pareto' in cap.out


def test_pareto_front_of_chosen_accuracies():
    """Four paths in FLOP order c0 < c1 < c2 < c3 given top-1 10, 30, 20, 40: c2 costs more than c1 and is less
    accurate, so the front is c0, c1, c3; then every path at 25 %: only the cheapest is on the front."""
    models = [tiny(n, dtype=torch.float32) for n in NAMES]
    parts = halves(models)
    names = ['1-1', '1-2', '2-1', '2-2']
    rows = X.path_costs(parts, dict.fromkeys(names, 0.0), image_size=16)
    order = [r['path'] for r in rows]  # sorted by FLOPs
    assert len({r['gflops'] for r in rows}) == 4
    rows = X.path_costs(parts, dict(zip(order, [10.0, 30.0, 20.0, 40.0])), image_size=16)
    assert [r['path'] for r in rows] == order
    assert [r['pareto'] for r in rows] == [True, True, False, True]
    rows = X.path_costs(parts, dict.fromkeys(names, 25.0), image_size=16)
    assert [r['pareto'] for r in rows] == [True, False, False, False]


def test_teacher_student_xml_leaves_the_frozen_net_untouched(tmp_path, capsys):
    teacher = tmp_path / 'teacher'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'independent', *TINY, '--out', str(teacher)], capsys)[0] == 0
    out = tmp_path / 'ts'
    code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'xml', '--freeze', '2', '--init2', str(teacher / 'last.pt'),
                         *TINY, '--out', str(out)], capsys)
    assert code == 0, cap.err
    before = torch.load(teacher / 'last.pt', weights_only=True)['nets']
    after = torch.load(out / 'last.pt', weights_only=True)['nets']
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # parameters and BN statistics
    assert any(not torch.equal(before[0][k], after[0][k]) for k in before[0])  # net 1 (fresh) did learn
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['frozen'] == [2] and summary['accuracy'][1] == json.loads(
        (teacher / 'summary.json').read_text())['accuracy'][1]
    # the frozen down-half keeps no own statistics (it normalises with its fixed shared ones, in eval mode)
    own = torch.load(out / 'last.pt', weights_only=True)['own_bn']
    assert [q for q, s in own.items() if s['updated']] == ['1-1', '2-1']
    shared = [v for k, v in after[1].items() if k.startswith(('layer4', 'layer5')) and k.endswith(('_mean', '_var'))]
    assert all(torch.equal(a, b) for q in ('1-2', '2-2') for a, b in zip(own[q]['stats'], shared))
    assert summary['own_bn']['fallback'] == ['1-2', '2-2'] and summary['own_bn']['accuracy'][1] == summary['accuracy'][1]
    # the frozen net's parameters count in its size and in every path's cost
    fresh = [X.split(X.build(name, 10, 4), 'layer3') for name in ('res18', 'mbv1')]
    counts = [[sum(p.numel() for p in half.parameters()) for half in net] for net in fresh]
    assert summary['params'] == counts
    costs = {row['path']: row['params'] for row in summary['path_costs']}
    assert costs == {'1-1': sum(counts[0]), '1-2': counts[0][0] + counts[1][1], '2-1': counts[1][0] + counts[0][1],
                     '2-2': sum(counts[1])}


def test_adversarial_loss_formulas():
    bce = lambda z, t: -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z))).mean()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(X.synthesis_loss(a, b, c), bce(a, 1.0) + bce(b, 0.0) + bce(c, 1.0))
    torch.testing.assert_close(X.discriminator_loss(a, b), bce(a, 1.0) + bce(b, 0.0))
    torch.testing.assert_close(X.generator_loss(a, True), bce(a, 1.0))


def test_gan_discriminator_learns_only_from_its_own_loss():
    models, x, y = pair_setup()
    hs = halves(models)
    disc = X.discriminator(cut_shape(models[0], CUT)[0]).double()
    ref = copy.deepcopy(disc)
    with torch.no_grad():
        f = [h[0](x) for h in copy.deepcopy(hs)]
    expected = torch.autograd.grad(X.discriminator_loss(ref(f[0]).squeeze(1), ref(f[1]).squeeze(1)),
                                   list(ref.parameters()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    losses = X.train_step(hs, opts, x, y, 'xml+gan', disc_optimizer=torch.optim.SGD(disc.parameters(), lr=0.0),
                          discriminator=disc)
    assert set(losses) == {0, 1, 'discriminator'}
    for p, e in zip(disc.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_xml_gan_up_halves_learn_to_pass_for_the_other_net():
    """D labels net 1's feature 1 and net 2's 0 (discriminator_loss), so up_1 as a generator is pulled toward
    D(up_1(x)) = 0 and up_2 toward 1: L_i = L_i^xml + w·BCE(D(up_i(x)), label of net j)."""
    models, x, y = pair_setup(seed=8)
    torch.manual_seed(0)
    disc = X.discriminator(cut_shape(models[0], CUT)[0]).double()
    out = X.run_paths(halves(models), x, X.all_paths(2, 2))
    gan = X.xml_gan_losses(out, y, 2, 2, [0, 1], disc, adv_weight=0.5)
    plain = X.xml_losses(out, y, 2, 2, [0, 1])
    for i, other_label in ((0, 0.0), (1, 1.0)):
        d = disc(out[(i,)]).squeeze(1)
        bce = -(other_label * F.logsigmoid(d) + (1 - other_label) * F.logsigmoid(-d)).mean()
        torch.testing.assert_close(gan[i] - plain[i], 0.5 * bce)


@pytest.mark.parametrize('method', ['xml+disc', 'xml+gan'])
def test_cli_discriminator_experiments_run(method, tmp_path, capsys):
    code, cap = run_cli(['--pair', 'res18,mbv1', '--method', method, *TINY, '--out', str(tmp_path / 'r')], capsys)
    assert code == 0, cap.err
    summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    record = json.loads((tmp_path / 'r' / 'metrics.jsonl').read_text().splitlines()[0])
    assert len(record['loss']) == (3 if method == 'xml+gan' else 2)
    assert (summary['synthesis'] is not None) == (method == 'xml+disc')
    assert len(summary['cross']) == 2 and all(0 <= a <= 100 for a in summary['accuracy'])
    if method == 'xml+disc':  # docs/RUNS.md's "Output files" names every key a run writes, the rarer ones included
        section = (HERE / 'docs' / 'RUNS.md').read_text().split('## Output files')[1].split('\n## ')[0]
        record = json.loads((tmp_path / 'r' / 'metrics.jsonl').read_text().splitlines()[-1])
        keys = {*summary, *record, *record['own_bn'], *json.loads(cap.out.strip().splitlines()[-1])}
        assert 'synthesis' in record and 'fallback' in record['own_bn']
        assert sorted(k for k in keys if f'`{k}`' not in section) == []


# ----------------------------------------------------------------------- reliability and scale
XML_PY = str(HERE / 'xml_ref.py')
RUN = [sys.executable, XML_PY, '--pair', 'res18,mbv1', '--method', 'xml', '--dataset', 'synthetic', '--width', '4',
       '--device', 'cpu', '--batch-size', '64']
TIMING = ('img_per_s', 'epoch_s')


def finished_state(out):
    """What a run ends with, minus timings: every epoch's record, the summary's numbers, the final weights."""
    records = [{k: v for k, v in json.loads(l).items() if k not in TIMING}
               for l in (out / 'metrics.jsonl').read_text().splitlines()]
    summary = json.loads((out / 'summary.json').read_text())
    numbers = {k: summary[k] for k in ('accuracy', 'best_accuracy', 'best_epoch', 'cross', 'paths', 'ensemble',
                                       'feature_distance')}
    return records, numbers, torch.load(out / 'last.pt', weights_only=True)['nets']


def test_killed_at_any_moment_then_resumed_ends_as_an_uninterrupted_run(tmp_path):
    import time
    args = [*RUN, '--epochs', '3']
    t = time.time()
    subprocess.run([*args, '--out', str(tmp_path / 'ref')], check=True, capture_output=True)
    wall = time.time() - t
    ref = finished_state(tmp_path / 'ref')
    for k, moments in enumerate([(0.15,), (0.6, 0.3), (0.85,)]):  # fractions of the run's wall time
        out = tmp_path / f'killed{k}'
        for m in moments:  # kill (SIGKILL), then resume; some runs twice
            p = subprocess.Popen([*args, '--out', str(out), '--resume'], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            time.sleep(m * wall)
            p.kill()
            p.wait()
        if not (out / 'summary.json').exists():
            r = subprocess.run([*args, '--out', str(out), '--resume'], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        got = finished_state(out)
        assert got[0] == ref[0] and got[1] == ref[1], k
        for a, b in zip(got[2], ref[2]):
            assert all(torch.equal(a[n], b[n]) for n in a), k


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_sigterm_and_sigint_stop_after_a_checkpoint(sig, tmp_path):
    import signal
    import time
    out = tmp_path / 'run'
    p = subprocess.Popen([*RUN, '--epochs', '40', '--out', str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    while not (out / 'metrics.jsonl').exists():  # the first epoch is done and checkpointed
        assert p.poll() is None
        time.sleep(0.1)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert 'stopped after epoch' in err and '--resume' in err
    epochs = len((out / 'metrics.jsonl').read_text().splitlines())
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == epochs < 40
    assert not (out / 'summary.json').exists()


def test_a_nan_loss_names_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = X.xml_losses, {'n': 0}

    def poisoned(*args, **kw):  # net 2's loss turns NaN at the 3rd batch of epoch 2 (8 batches an epoch)
        losses = real(*args, **kw)
        calls['n'] += 1
        if calls['n'] == 8 + 3:
            losses[1] = losses[1] * float('nan')
        return losses
    monkeypatch.setitem(X.LOSSES, 'xml', poisoned)
    out = tmp_path / 'nan'
    code, cap = run_cli([*RUN[2:], '--epochs', '3', '--out', str(out)], capsys)
    assert code == 1
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and 'net 2 (mbv1)' in lines[0] and 'epoch 2, batch 3 of 8' in lines[0], cap.err
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == 1
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1 and not (out / 'summary.json').exists()


def make_folder(root, classes=('ant', 'bee'), n=3, size=8, mode='RGB'):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ('train', 'test'):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).convert(mode).save(root / split / c / f'{k}.png')
    return root


def test_cpu_layout_study_times_both_layouts_and_names_its_command(tmp_path):
    from tools import cpu_layout
    out = tmp_path / 'layout.md'
    # width 8: at width 4 res18's strided 1x1 convolution (4 input channels) hits oneDNN's AVX2 bug in
    # channels_last, which this study forces (conv_layout)
    assert cpu_layout.main(['--width', '8', '--batch-size', '8', '--steps', '1', '--repeats', '1', '--out', str(out)]) == 0
    text = out.read_text()
    assert '`python tools/cpu_layout.py --width 8 --batch-size 8 --steps 1 --repeats 1 --out ' in text
    assert '| contiguous (NCHW) |' in text and '| channels_last |' in text and '× as fast as NCHW.' in text


def test_cpu_layout_avoids_the_onednn_strided_1x1_bug_and_is_channels_last_elsewhere(tmp_path):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')  # a device object needs no GPU
    narrow = X.MODELS['res18'](10, 4)  # its first shortcut: 1x1, stride 2, 4 input channels
    assert X.conv_layout([X.MODELS['mbv1'](10, 4), narrow], cpu) == torch.contiguous_format
    assert X.conv_layout([narrow], cuda) == torch.channels_last  # cuDNN has no such bug
    assert X.conv_layout([X.MODELS['res18'](10, 8), X.MODELS['mbv1'](10, 4)], cpu) == torch.channels_last
    grouped = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1, stride=2, groups=4))  # 4 input channels a group
    assert X.conv_layout([grouped], cpu) == torch.contiguous_format
    assert X.conv_layout([torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1))], cpu) == torch.channels_last  # stride 1
    # a CPU run of such a net trains and evaluates in NCHW (channels_last hangs there on AVX2 machines)
    run = X.set_up(X.parse_args(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--out', str(tmp_path / 'r')]))
    assert X.layout(run.models[0]) == X.layout(run.models[1]) == torch.contiguous_format


def test_grad_norms_study_runs_on_an_image_folder(tmp_path):
    root = make_folder(tmp_path / 'data', n=2)
    GN.main([str(root), '--width', '4', '--batches', '1', '--seeds', '0', '--out', str(tmp_path / 'g.md')])
    md = (tmp_path / 'g.md').read_text()
    assert '## res18,mbv1, cut after layer3' in md and '## res18,res34, cut after layer2' in md
    assert md.count('| up_1 (res18) |') == 2 and md.count('| down_2 (') == 2


def folder_cli(root, tmp_path, capsys, *extra):
    return run_cli(['--pair', 'res18,mbv1', '--dataset', 'folder', '--data-dir', str(root), '--width', '4',
                    '--epochs', '1', '--batch-size', '4', '--device', 'cpu', '--out', str(tmp_path / 'out'), *extra],
                   capsys)


def one_line_error(code, cap, *words):
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), cap.err


def test_folder_data_set_converts_grayscale_and_trains(tmp_path, capsys):
    root = make_folder(tmp_path / 'gray', mode='L')
    code, cap = folder_cli(root, tmp_path, capsys)
    assert code == 0, cap.err
    assert X.load_folder(root).train_x.shape == (6, 8, 8, 3)


def test_folder_bad_inputs_are_refused_naming_the_problem(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    one_line_error(*folder_cli(empty, tmp_path, capsys), 'no train/ folder')
    (empty / 'train').mkdir()
    (empty / 'test').mkdir()
    one_line_error(*folder_cli(empty, tmp_path, capsys), str(empty / 'train'))
    corrupt = make_folder(tmp_path / 'corrupt')
    (corrupt / 'train' / 'bee' / 'broken.png').write_bytes(b'this is not a PNG')
    one_line_error(*folder_cli(corrupt, tmp_path, capsys), 'cannot read image', 'broken.png')
    classes = make_folder(tmp_path / 'classes')
    (classes / 'test' / 'bee').rename(classes / 'test' / 'cow')
    one_line_error(*folder_cli(classes, tmp_path, capsys), 'different classes', 'bee', 'cow')
    sizes = make_folder(tmp_path / 'sizes')
    make_folder(tmp_path / 'big', size=10)
    (tmp_path / 'big' / 'test' / 'ant' / '0.png').replace(sizes / 'test' / 'ant' / '0.png')
    one_line_error(*folder_cli(sizes, tmp_path, capsys), 'must share one size', '0.png', '10×10')
    assert not (tmp_path / 'out').exists()  # nothing was written


def test_an_out_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    code, cap = run_cli([*RUN[2:], '--epochs', '1', '--out', str(tmp_path / 'file' / 'run')], capsys)
    one_line_error(code, cap, 'cannot be written')


def test_resume_refuses_a_checkpoint_of_another_pair_cut_or_method(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    with monkeypatch.context() as m:
        m.setattr(X, 'progress_line', lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            X.main([*RUN[2:], '--epochs', '2', '--out', str(out)])
    before = (out / 'last.pt').read_bytes()
    for change, word in ((['--pair', 'res18,res34', '--cut', 'layer3'], 'nets'), (['--cut', 'layer2'], 'net_cuts'),
                         (['--method', 'dml'], 'method')):
        code, cap = run_cli([*RUN[2:], '--epochs', '2', *change, '--out', str(out), '--resume'], capsys)
        one_line_error(code, cap, word, '--resume')
    with monkeypatch.context() as m:  # as if relaunched by torchrun with two processes
        m.setenv('WORLD_SIZE', '2')
        code, cap = run_cli([*RUN[2:], '--epochs', '2', '--out', str(out), '--resume'], capsys)
        one_line_error(code, cap, 'processes=1', '--resume')
    assert (out / 'last.pt').read_bytes() == before


def test_resume_refuses_other_images_in_one_line(tmp_path, capsys, monkeypatch):
    """--data-dir is not a setting --resume compares (the same images may move), but the images are: a folder of
    other classes or counts is refused before anything is loaded into the nets, last.pt untouched."""
    args = ['--pair', 'res18,mbv1', '--method', 'xml', '--dataset', 'folder', '--width', '4', '--epochs', '2',
            '--batch-size', '4', '--device', 'cpu', '--out', str(tmp_path / 'r')]
    with monkeypatch.context() as m:
        m.setattr(X, 'progress_line', lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            X.main([*args, '--data-dir', str(make_folder(tmp_path / 'a'))])
    before = (tmp_path / 'r' / 'last.pt').read_bytes()
    other = make_folder(tmp_path / 'b', classes=('ant', 'bee', 'cow'))
    one_line_error(*run_cli([*args, '--data-dir', str(other), '--resume'], capsys), 'other data',
                   'classes 2 there, 3 here;')
    renamed = make_folder(tmp_path / 'c', classes=('ant', 'cow'))  # what differs is named, not numbers that agree
    one_line_error(*run_cli([*args, '--data-dir', str(renamed), '--resume'], capsys),
                   '(classes 2 there, 2 here (other names)); resume')
    assert (tmp_path / 'r' / 'last.pt').read_bytes() == before
    moved = make_folder(tmp_path / 'moved')  # the same images elsewhere: resumed
    assert run_cli([*args, '--data-dir', str(moved), '--resume'], capsys)[0] == 0


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """As --init1 and as the last.pt to resume: pickled objects torch.load(weights_only=True) refuses (its message
    runs over several lines), a tensor file that is not a dict with a config, and a text file."""
    files = {'objects.pt': lambda f: torch.save(argparse.Namespace(nets=['res18']), f),
             'list.pt': lambda f: torch.save([torch.zeros(2)], f), 'text.pt': lambda f: f.write_text('hello')}
    for name, write in files.items():
        write(tmp_path / name)
        code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'dml', *TINY, '--init1', str(tmp_path / name),
                             '--out', str(tmp_path / 'init')], capsys)
        one_line_error(code, cap, str(tmp_path / name), 'xml_ref.py wrote')
        done = tmp_path / f'done-{name}'  # with --force too, the run already there survives the refusal
        done.mkdir()
        kept = {f: f'{f} of a finished run' for f in ('summary.json', 'last.pt', 'best.pt', 'metrics.jsonl')}
        for f, text in kept.items():
            (done / f).write_text(text)
        code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'dml', *TINY, '--init1', str(tmp_path / name),
                             '--out', str(done), '--force'], capsys)
        one_line_error(code, cap, str(tmp_path / name), 'xml_ref.py wrote')
        assert {p.name: p.read_text() for p in done.iterdir()} == kept
        out = tmp_path / f'resume-{name}'
        out.mkdir()
        write(out / 'last.pt')
        before = (out / 'last.pt').read_bytes()
        code, cap = run_cli(['--pair', 'res18,mbv1', '--method', 'dml', *TINY, '--out', str(out), '--resume'], capsys)
        one_line_error(code, cap, 'last.pt', 'xml_ref.py wrote')
        assert (out / 'last.pt').read_bytes() == before


def test_a_gpu_index_beyond_the_visible_gpus_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # one GPU, without needing one
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    code, cap = run_cli(['--pair', 'res18,mbv1', *TINY[:4], '--device', 'cuda:3', '--out', str(tmp_path / 'n')],
                        capsys)
    one_line_error(code, cap, '--device cuda:3', 'only 1 CUDA GPU')
    assert not (tmp_path / 'n').exists()


def _data_parallel_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: two ranks of 2 threads each on 2 cores crawl
    models, x, y = pair_setup(seed=11)
    for m in models:
        m.eval()  # BatchNorm on running statistics: one sample's loss does not depend on the others'
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models]
    share = len(x) // world
    X.train_step(halves(models), opts, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share], 'xml')
    if rank == 0:
        torch.save([m.state_dict() for m in models], out_file)
    dist.destroy_process_group()


def test_two_processes_step_like_one_process_on_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(_data_parallel_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'dp.pt')),
                                nprocs=2)
    models, x, y = pair_setup(seed=11)
    for m in models:
        m.eval()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models]
    X.train_step(halves(models), opts, x, y, 'xml')
    for m, state in zip(models, torch.load(tmp_path / 'dp.pt', weights_only=True)):
        for name, p in m.state_dict().items():
            torch.testing.assert_close(state[name], p, rtol=1e-9, atol=1e-12, msg=name)


def _diverging_rank_worker(rank, world, port, out, status_file):
    """One torchrun-like process of a 2-process run in which only rank 1's loss turns NaN (last step, epoch 2)."""
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: two ranks of 2 threads each on 2 cores crawl
    real, calls = X.xml_losses, {'n': 0}

    def poisoned(*args, **kw):
        losses = real(*args, **kw)
        calls['n'] += 1
        if rank == 1 and calls['n'] == 8 + 8:  # the last step: the other rank computes no loss after it
            losses[1] = losses[1] * float('nan')
        return losses
    X.LOSSES['xml'] = poisoned
    code = X.main([*RUN[2:], '--epochs', '3', '--out', out])
    Path(f'{status_file}.{rank}').write_text(str(code))


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """Under torchrun a divergence that one rank sees must stop them all (else the others wait forever)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.spawn(_diverging_rank_worker, args=(2, port, str(tmp_path / 'run'),
                                                                    str(tmp_path / 'status')), nprocs=2, join=False)
    import time
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('a rank hung after another rank diverged')
    assert [(tmp_path / f'status.{r}').read_text() for r in range(2)] == ['1', '1']
    assert torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['epoch'] == 1


def test_torchrun_with_two_processes_writes_one_run(tmp_path):
    out = tmp_path / 'ddp'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', XML_PY,
                        *RUN[2:], '--epochs', '2', '--out', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['processes'] == 2 and summary['command'].startswith('torchrun ')
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 2
    assert r.stdout.count('"method": "xml"') == 1  # rank 0 alone reports


# ------------------------------------------------------------------ every option has its effect
# Each option of Config and how the suite sees its effect with two values: 'effect' — a test of this section
# (test_option_effect_<name>); a test's name — that test asserts it; otherwise the reason no training changes.
OPTION_EFFECTS = {
    'pair': 'test_cli_xml_run_writes_summary_with_cross_matrix',
    'nets': 'test_cli_three_nets_three_parts_reports_every_path_with_its_cost',
    'method': 'test_xml_loss_sum_and_mean_and_kd_and_l2_formulas',
    'cut': 'test_cli_trains_torchvision_nets_joined_by_stitches',
    'cuts': 'test_three_nets_three_parts_keep_one_set_per_prefix_and_sampled_paths_update_only_theirs',
    'list_cuts': 'prints and exits, trains nothing (test_cli_trains_torchvision_nets_joined_by_stitches)',
    'width': 'effect',
    'update': 'test_both_update_orders_equal_each_net_stepped_on_its_own_loss',
    'path_weights': 'effect',
    'paths_per_step': 'test_the_same_seed_draws_the_same_sampled_paths_and_ends_with_the_same_numbers',
    'temperature': 'effect',
    'l2_weight': 'effect',
    'adv_weight': 'effect',
    'teacher': 'test_cli_kd_and_fitnet_learn_from_a_teacher_checkpoint',
    'hint_epochs': 'test_cli_kd_and_fitnet_learn_from_a_teacher_checkpoint',
    'freeze': 'test_teacher_student_xml_leaves_the_frozen_net_untouched',
    'init1': 'test_teacher_student_xml_leaves_the_frozen_net_untouched',
    'init2': 'test_teacher_student_xml_leaves_the_frozen_net_untouched',
    'epochs': 'test_the_schedule_is_what_the_optimizers_hold_at_every_step',
    'warmup_epochs': 'test_a_run_resumed_inside_the_warm_up_continues_its_schedule',
    'batch_size': 'effect',
    'lr': 'effect',
    'momentum': 'effect',
    'weight_decay': 'effect',
    'seed': 'effect',
    'rotate': 'effect',
    'dataset': 'test_folder_data_set_converts_grayscale_and_trains',
    'train_per_class': 'test_train_per_class_trains_on_the_subset_is_recorded_and_resume_compares_it',
    'data_dir': 'locates the data (test_folder_data_set_converts_grayscale_and_trains)',
    'device': 'where it runs: the CUDA tests (skipped without a GPU) and every CPU test',
    'fast': 'test_fast_step_computes_what_the_plain_step_computes',
    'sync_bn': 'NOT TESTED: SyncBatchNorm needs several GPUs under torchrun; elsewhere refused '
               '(test_sync_bn_is_refused_without_several_gpu_processes)',
    'eval_every': 'test_eval_every_changes_no_weight_and_best_epoch_is_the_best_evaluated_one',
    'out': 'locates the run',
    'resume': 'test_cli_resume_continues_to_the_same_result',
    'force': 'test_cli_refuses_to_overwrite_a_finished_run',
}


def test_sync_bn_is_refused_without_several_gpu_processes(tmp_path, capsys):
    one_line_error(*run_cli(['--pair', 'res18,mbv1', '--sync-bn', *TINY, '--out', str(tmp_path / 'x')], capsys),
                   '--sync-bn needs several GPU processes')


def test_every_option_of_config_has_a_row_in_the_effects_table():
    options = {f.name for f in X.fields(X.Config) if 'help' in f.metadata}
    assert set(OPTION_EFFECTS) == options, 'a new option needs a row in OPTION_EFFECTS and a test of its effect'
    for name, how in OPTION_EFFECTS.items():
        test = f'test_option_effect_{name}' if how == 'effect' else how.split('(')[-1].rstrip(')')
        assert not test.startswith('test_') or test in globals(), (name, test)


def option_run(tmp_path, *args, pair='res18,mbv1', method='xml'):
    """A set-up run of tiny nets on the synthetic data, nothing trained yet."""
    return X.set_up(X.parse_args(['--pair', pair, '--method', method, *TINY, *args, '--out', str(tmp_path / 'r')]))


def one_step(run, steps=1, lr=None):
    """The weights of every net after `steps` training steps on the first 64 training images, unaugmented."""
    x = X.normalize(run.data.train_x[:64], run.mean, run.std)
    for _ in range(steps):
        for opt in run.optimizers:
            X.set_lr(opt, lr if lr is not None else run.cfg.lr)
        X.train_step(run.parts, run.optimizers, x, run.data.train_y[:64], run.cfg.method, stitches=run.stitches,
                     own_bn=run.own_bn, **X.loss_options(run.cfg, run.cfg.method))
    return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in run.models]


def test_option_effect_weight_decay(tmp_path):
    """One SGD step: w' = w − lr·(g + wd·w), so two decays differ by −lr·(wd_a − wd_b)·w."""
    w0 = one_step(option_run(tmp_path), steps=0)
    a, b = (one_step(option_run(tmp_path, '--weight-decay', wd)) for wd in ('0', '0.05'))
    for w, wa, wb in zip(w0, a, b):
        torch.testing.assert_close(wb - wa, -0.1 * 0.05 * w, rtol=1e-3, atol=1e-6)  # float32 weights: a few ulps


def test_option_effect_momentum(tmp_path):
    """The first step takes no momentum; the second adds m · the first step: w2(m) − w2(0) = −m·(w0 − w1)."""
    w0 = one_step(option_run(tmp_path), steps=0)
    w1 = one_step(option_run(tmp_path, '--momentum', '0.5'))
    still, moved = (one_step(option_run(tmp_path, '--momentum', m), steps=2) for m in ('0', '0.5'))
    for a, b, c, d in zip(w0, w1, still, moved):
        torch.testing.assert_close(d - c, -0.5 * (a - b), rtol=1e-3, atol=1e-6)  # float32 weights: a few ulps


def test_option_effect_lr(tmp_path):
    """One step from the same weights and momentum buffers: the step is proportional to --lr."""
    w0 = one_step(option_run(tmp_path), steps=0)
    a, b = (one_step(option_run(tmp_path, '--lr', lr)) for lr in ('0.1', '0.3'))
    for w, wa, wb in zip(w0, a, b):
        torch.testing.assert_close(wb - w, 3 * (wa - w), rtol=1e-3, atol=1e-6)  # float32 weights: a few ulps


def test_option_effect_width():
    cfg = ['--pair', 'res18,mbv1', '--dataset', 'synthetic', '--device', 'cpu']
    for width in (4, 8):
        nets = X.build_nets(X.parse_args([*cfg, '--width', str(width), '--out', 'x']), 10)
        assert [next(m.parameters()).shape[0] for m in nets] == [width, width // 2]  # res18's stem, mbv1's 32/64


def option_loss(run, **options):
    """Each net's loss on the first 64 training images from the run's nets as they are, with some options set."""
    cfg = X.replace(run.cfg, **options)
    out = X.run_paths(run.parts, X.normalize(run.data.train_x[:64], run.mean, run.std),
                      X.step_paths(cfg.method, 2, 2), stitches=run.stitches)
    kw = X.loss_options(cfg, cfg.method, run.discriminator)
    return torch.stack(list(X.LOSSES[cfg.method](out, run.data.train_y[:64], 2, 2, [0, 1], **kw).values()))


@pytest.mark.parametrize('method,option', [('xml+disc', 'adv_weight'), ('xml+gan', 'adv_weight'),
                                           ('xml+l2', 'l2_weight')])
def test_option_effect_adv_weight_and_l2_weight(method, option, tmp_path):
    """Each net's loss is linear in the weight of its extra term: L(w) = L(0) + w·(L(1) − L(0)), with L(1) ≠ L(0)."""
    run = option_run(tmp_path, method=method)
    torch.manual_seed(0)
    with torch.no_grad():
        at = {w: option_loss(run, **{option: w}) for w in (0.0, 1.0, 0.3)}
    assert (at[1.0] != at[0.0]).all()
    torch.testing.assert_close(at[0.3], at[0.0] + 0.3 * (at[1.0] - at[0.0]), rtol=1e-5, atol=1e-6)


test_option_effect_adv_weight = test_option_effect_l2_weight = test_option_effect_adv_weight_and_l2_weight


@pytest.mark.parametrize('method', ['dml', 'xml'])
def test_option_effect_temperature(method, tmp_path):
    """The KL terms at T: the loss minus its cross-entropy terms is T² · the KL of the softened predictions."""
    run = option_run(tmp_path, method=method)
    with torch.no_grad():
        out = X.run_paths(run.parts, X.normalize(run.data.train_x[:64], run.mean, run.std), X.step_paths(method, 2, 2))
        y = run.data.train_y[:64]
        for T in (1.0, 3.0):
            loss = option_loss(run, temperature=T)[0]
            pure = out[(1, 1)]
            paths = [(0, 0)] if method == 'dml' else [(0, 0), (0, 1), (1, 0)]
            ref = sum(F.cross_entropy(out[p], y) + T * T * kl_divergence(
                Categorical(logits=pure / T), Categorical(logits=out[p] / T)).mean() for p in paths)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_option_effect_path_weights(tmp_path):
    """A pair's L_i has three paths: 'mean' is 'sum' / 3."""
    run = option_run(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(3 * option_loss(run, path_weights='mean'), option_loss(run, path_weights='sum'))


class Recorder:
    """A training step that keeps the batches it is given and trains nothing."""

    def __init__(self):
        self.loss_sum, self.first_bad, self.batches = {}, {}, []

    def new_epoch(self):
        pass

    def __call__(self, images, labels):
        self.batches.append((images.clone(), labels.clone()))


def batches_of(tmp_path, *args):
    run = option_run(tmp_path, *args)
    step = Recorder()
    gen = torch.Generator().manual_seed(run.cfg.seed)
    X.train_epoch(run, step, [], 0, run.data.train_x, run.data.train_y, gen)
    return step.batches, run


def test_option_effect_batch_size(tmp_path):
    for size in (64, 128):
        batches, run = batches_of(tmp_path, '--batch-size', str(size))
        assert [len(y) for _, y in batches] == [size] * (len(run.data.train_x) // size)


def test_option_effect_seed(tmp_path):
    """Another seed: other initial weights and another data order; the same seed: the same."""
    (a, run_a), (b, run_b), (c, run_c) = (batches_of(tmp_path, '--seed', s) for s in ('0', '0', '1'))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert X.num_params(run_a.models[0]) == X.num_params(run_c.models[0])
    w = [torch.cat([p.reshape(-1) for p in r.models[0].parameters()]) for r in (run_a, run_b, run_c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_option_effect_rotate(tmp_path, monkeypatch):
    """The training images are turned by --rotate: the same crops and flips (drawn first, from the same
    generator) as without rotation, each then turned by its own angle, uniform within ±DEG; at 0 none is."""
    flat, _ = batches_of(tmp_path, '--rotate', '0')
    angles, real = [], X.rotate_images
    monkeypatch.setattr(X, 'rotate_images', lambda images, a: angles.append(a) or real(images, a))
    turned, _ = batches_of(tmp_path, '--rotate', '30')
    assert len(angles) == len(turned) and torch.equal(flat[0][1], turned[0][1])
    assert torch.equal(turned[0][0], real(flat[0][0], angles[0])) and not torch.equal(turned[0][0], flat[0][0])
    every = torch.cat(angles)
    assert every.abs().max() <= 30 and every.min() < -15 and every.max() > 15  # spread over ±30°


def test_a_three_part_path_evaluated_alone_with_its_own_sets_scores_what_evaluate_reports(tmp_path):
    """P = 3: after a few XML steps, each path copied out alone, every part after the first given that path's own
    set for its prefix (the middle part too), scores on the test set what evaluate() reports for it with the own
    statistics, to one image."""
    run = option_run(tmp_path, '--cuts', 'layer2,layer3')
    x = X.normalize(run.data.train_x[:64], run.mean, run.std)
    for _ in range(3):
        X.train_step(run.parts, run.optimizers, x, run.data.train_y[:64], 'xml', own_bn=run.own_bn)
    images, labels = run.data.test_x, run.data.test_y
    reported = X.evaluate(run.parts, images, labels, run.mean, run.std, own_bn=run.own_bn)['own_bn']['paths']
    for path in [(0, 1, 0), (1, 0, 1), (0, 0, 1), (1, 1, 1)]:
        alone = []
        for k in range(1, 4):
            part = copy.deepcopy(run.parts[path[k - 1]][k - 1])
            if k > 1:
                assert run.own_bn.updated[path[:k]]
                for bn, (mean, var) in zip(X.batchnorms(part), run.own_bn.sets[path[:k]]):
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
            alone.append(part)
        with torch.no_grad():
            z = torch.nn.Sequential(*alone).eval()(X.normalize(images, run.mean, run.std, X.layout(alone[0])))
        right = (z.argmax(1) == labels).sum().item()
        assert abs(reported[X.path_name(path)] - 100 * right / len(labels)) <= 100 / len(labels) + 1e-9, path


def test_the_combinations_a_method_cannot_train_are_refused_in_one_line(tmp_path, capsys):
    """Methods that need one feature shape at the cut, each with stitched nets; one cut given twice; a warm-up
    longer than fitnet's shorter stage: one line, exit 2, nothing written."""
    stitched = ['--pair', 'res18,mbv1', '--cut', 'stem', '--dataset', 'synthetic', '--width', '4']
    teacher = tmp_path / 'teacher.pt'
    torch.save({'config': {'nets': ['res18', 'mbv1']}}, teacher)
    for extra in (['--method', 'xml+l2'], ['--method', 'xml+gan'], ['--freeze', '1', '--init1', str(teacher)]):
        one_line_error(*run_cli([*stitched, *extra, '--out', str(tmp_path / 'x')], capsys), 'channels differ')
    one_line_error(*run_cli(['--pair', 'res18,mbv1', '--cuts', 'layer2,layer2', '--width', '4', '--out',
                             str(tmp_path / 'x')], capsys), 'cuts layer2 and layer2: the same cut twice')
    one_line_error(*run_cli(['--pair', 'res18,mbv1', '--cuts', 'layer2,layer2.0', '--width', '4', '--out',
                             str(tmp_path / 'x')], capsys), 'cuts layer2 and layer2.0: one holds the other')
    one_line_error(*run_cli(['--pair', 'res18,mbv1', '--method', 'fitnet', '--teacher', str(teacher), '--hint-epochs',
                             '1', '--epochs', '10', '--warmup-epochs', '2', '--width', '4', '--out',
                             str(tmp_path / 'x')], capsys), '--warmup-epochs must be 0 … 1')
    assert not (tmp_path / 'x').exists()


def test_report_keeps_an_accuracy_of_exactly_zero_in_its_mean(tmp_path):
    assert R.mean_std([0.0, 2.0]) == (1.0, math.sqrt(2)) and R.mean_std([0.0]) == (0.0, None)
    runs = tmp_path / 'runs'
    fake_summary(runs, 'xml_s0', seed=0, cross=((0.0, 40.0), (50.0, 30.0)))
    fake_summary(runs, 'xml_s1', seed=1, cross=((2.0, 40.0), (50.0, 30.0)))
    R.report(runs, tmp_path / 'out')
    assert '| xml | 1.00 ± 1.41 / 2.00 ± 1.41 |' in (tmp_path / 'out' / 'RESULTS.md').read_text()


def test_bn_recalibration_draws_with_the_runs_rotation(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'xml'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--rotate', '25', '--out', str(out)],
                   capsys)[0] == 0
    seen, real = [], X.augment
    monkeypatch.setattr(X, 'augment', lambda *a, **kw: seen.append(kw.get('rotate')) or real(*a, **kw))
    assert BN.main([str(out), '--device', 'cpu', '--batches', '2', '--out', str(tmp_path / 'study')]) == 0
    assert seen == [25.0, 25.0]



# ------------------------------------------------------------ properties a user relies on without seeing
def test_pair_only_methods_and_paths_per_step_are_refused_outside_their_range(tmp_path, capsys):
    """A method defined for a pair cut once is refused for two nets cut twice too; --paths-per-step R must be
    1 … K^P − K (the crossed paths): its exact ends pass, one past them is refused."""
    for method in X.PAIR_ONLY:
        extra = ['--teacher', __file__] if method in ('kd', 'fitnet') else []
        code, cap = run_cli(['--pair', 'res18,mbv1', '--cuts', 'layer2,layer3', '--method', method, *extra,
                             '--width', '4', '--out', str(tmp_path / 'x')], capsys)
        one_line_error(code, cap, 'is for a pair cut once')
    for nets, cuts, crossed in (('res18,mbv1', 'layer3', 2), ('res18,mbv1', 'layer2,layer3', 6),
                                ('res18,res34,mbv1', 'layer2,layer3', 24)):
        for r in (1, crossed):
            cfg = X.parse_args(['--nets', nets, '--cuts', cuts, '--paths-per-step', str(r), '--width', '4', '--out',
                                str(tmp_path / 'x')])
            assert cfg.paths_per_step == r
        for r in (0, crossed + 1):
            code, cap = run_cli(['--nets', nets, '--cuts', cuts, '--paths-per-step', str(r), '--width', '4',
                                 '--out', str(tmp_path / 'x')], capsys)
            one_line_error(code, cap, f'must be 1 … {crossed}')
    assert not (tmp_path / 'x').exists()


def test_the_default_cut_of_every_pair_is_the_same_in_either_order(tmp_path):
    for a, b in __import__('itertools').product(X.MODELS, repeat=2):
        if a == b:
            continue
        cuts = [X.parse_args(['--pair', p, '--width', '4', '--out', str(tmp_path / 'x')]).net_cuts
                for p in (f'{a},{b}', f'{b},{a}')]
        assert cuts[0] == cuts[1] == [['layer3' if 'mbv1' in (a, b) else 'layer2']] * 2, (a, b)
        parts = [X.split_parts(X.build(n, 10, 4), c) for n, c in zip((a, b), cuts[0])]
        assert len(X.make_stitches(X.feature_shapes(parts), [a, b])) == 0  # a cut where they agree


@pytest.mark.parametrize('method', ['xml', 'xml+l2', 'xml+disc', 'xml+gan'])
def test_mean_path_weights_divide_the_xml_terms_of_every_xml_method_and_reach_it_from_the_cli(method, tmp_path):
    """--path-weights mean divides the XML sum of each method of the family by its 3 paths and leaves the extra
    term (λ·L2, the synthesis or generator loss) as it is: L(sum) − L(mean) = ⅔ · XML(sum), whatever the method."""
    cfg = X.parse_args(['--pair', 'res18,mbv1', '--method', method, '--path-weights', 'mean', '--width', '4',
                        '--out', str(tmp_path / 'x')])
    models, x, y = pair_setup(seed=9)
    disc = X.discriminator(cut_shape(models[0], CUT)[0]).double()
    if method == 'xml+disc':  # its down-halves have one output more
        models = [tiny(n, num_classes=11, seed=9 + i) for i, n in enumerate(NAMES)]
    kw = X.loss_options(cfg, method, disc)
    assert kw['path_weights'] == 'mean'
    out = X.run_paths(halves(models), x, X.all_paths(2, 2))
    mean = X.LOSSES[method](out, y, 2, 2, [0, 1], **kw)
    total = X.LOSSES[method](out, y, 2, 2, [0, 1], **{**kw, 'path_weights': 'sum'})
    plain = X.xml_losses({p: z[:, :10] if len(p) == 2 else z for p, z in out.items()}, y, 2, 2, [0, 1])
    for i in range(2):
        torch.testing.assert_close(total[i] - mean[i], plain[i] * 2 / 3, rtol=1e-10, atol=1e-12)


def test_the_same_seed_draws_the_same_sampled_paths_and_ends_with_the_same_numbers(tmp_path, capsys, monkeypatch):
    drawn = {}
    real = X.step_paths

    def spy(method, K, P, paths_per_step=None, rng=None):
        paths = real(method, K, P, paths_per_step, rng)
        drawn.setdefault(run, []).append(paths)
        return paths
    monkeypatch.setattr(X, 'step_paths', spy)
    args = ['--pair', 'res18,mbv1', '--cuts', 'layer2,layer3', '--method', 'xml', '--paths-per-step', '2',
            '--dataset', 'synthetic', '--width', '4', '--device', 'cpu', '--epochs', '2', '--batch-size', '128']
    for run in ('a', 'b'):
        assert run_cli([*args, '--out', str(tmp_path / run)], capsys)[0] == 0
    assert drawn['a'] == drawn['b'] and len(drawn['a']) == 8  # 4 steps an epoch, 2 epochs
    assert len({tuple(p) for p in drawn['a']}) > 1  # drawn anew each step
    a, b = ([{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, (tmp_path / d / 'metrics.jsonl')
             .read_text().splitlines())] for d in 'ab')
    assert a == b


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """Checkpoints, metrics and the summary are replaced atomically: a write that dies half-way (disk full, a kill
    between the bytes) leaves the previous file byte for byte, never a truncated one."""
    target = tmp_path / 'last.pt'
    target.write_bytes(b'previous checkpoint')

    def dies(f):
        f.write(b'half of the new')
        raise OSError('disk full')
    with pytest.raises(OSError):
        X.write_atomic(target, dies)
    assert target.read_bytes() == b'previous checkpoint'
    summary = tmp_path / 'summary.json'
    X.write_json(summary, {'a': 1})
    monkeypatch.setattr(X.json, 'dumps', lambda *a, **k: (_ for _ in ()).throw(OSError('killed')))
    with pytest.raises(OSError):
        X.write_json(summary, {'a': 2})
    assert json.loads(summary.read_text()) == {'a': 1}
    # a training run whose checkpoint write dies keeps the last good last.pt
    monkeypatch.undo()
    out = tmp_path / 'run'
    args = ['--pair', 'res18,mbv1', '--method', 'xml', *TINY[:-4], '--batch-size', '64', '--epochs', '2', '--out',
            str(out)]
    real_save, saves = torch.save, {'n': 0}

    def save_dies_on_epoch_2(obj, f, *a, **k):
        saves['n'] += 1
        if isinstance(obj, dict) and obj.get('epoch') == 2:
            f.write(b'partial')
            raise OSError('disk full')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(X.torch, 'save', save_dies_on_epoch_2)
    with pytest.raises(OSError):
        X.main(args)
    monkeypatch.undo()
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == 1
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1


def tiny_run(tmp_path, *extra):
    """A Run of the CLI's own set-up on synthetic data (width 4, CPU), and its TrainStep."""
    cfg = X.parse_args(['--pair', 'res18,mbv1', '--method', 'xml', '--dataset', 'synthetic', '--width', '4',
                        '--device', 'cpu', '--out', str(tmp_path / 'run'), *extra])
    run = X.set_up(cfg)
    return run, *X.make_step(run, False, __import__('random').Random(0))


def test_an_epoch_uses_every_image_at_most_once_and_drops_only_the_last_partial_batch(tmp_path, monkeypatch):
    """512 training images, batch 96: 5 steps of 96 distinct images, 32 left out (the partial batch), a new
    order the next epoch."""
    run, step, opts = tiny_run(tmp_path, '--batch-size', '96')
    seen = []
    real = X.augment
    monkeypatch.setattr(X, 'augment', lambda images, **kw: seen.append(images.clone()) or real(images, **kw))
    key = {bytes(img.numpy().tobytes()): n for n, img in enumerate(run.data.train_x)}
    assert len(key) == len(run.data.train_x) == 512  # every image tells which it is
    gen = torch.Generator().manual_seed(0)
    orders = []
    for epoch in range(2):
        seen.clear()
        X.train_epoch(run, step, opts, epoch, run.data.train_x, run.data.train_y, gen)
        assert [len(b) for b in seen] == [96] * 5
        ids = [key[bytes(img.numpy().tobytes())] for b in seen for img in b]
        assert len(set(ids)) == 480
        orders.append(ids)
    assert orders[0] != orders[1]


def test_normalisation_comes_from_the_training_set_and_evaluation_leaves_the_nets_as_they_were(tmp_path):
    """The mean and std the inputs are normalised with are the training images' (never the test set's), and
    evaluate() runs in eval mode: its numbers are those of the nets in eval mode, their BatchNorm statistics and
    their train/eval modes unchanged by it."""
    run, _, _ = tiny_run(tmp_path)
    assert (run.mean, run.std) == X.channel_stats(run.data.train_x)
    assert (run.mean, run.std) != X.channel_stats(run.data.test_x)
    for m in run.models:
        m.train()
    before = [copy.deepcopy(m.state_dict()) for m in run.models]
    r = X.evaluate(run.parts, run.data.test_x, run.data.test_y, run.mean, run.std)
    assert all(m.training for m in run.models)
    for m, state in zip(run.models, before):
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        x = X.normalize(run.data.test_x, run.mean, run.std, X.layout(run.models[0]))
        for m in run.models:
            m.eval()
        acc = [100.0 * (m(x).argmax(1) == run.data.test_y).sum().item() / len(x) for m in run.models]
    assert r['accuracy'] == acc


def test_interpolation_study_runs_on_the_test_set(tmp_path, capsys):
    """a = 1 and a = 0 are the cross pairings the run reported on the test set, exactly (the training set, a
    different one, would give other numbers)."""
    out = tmp_path / 'xml'
    assert run_cli(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--out', str(out)], capsys)[0] == 0
    rows = {r['alpha']: r for r in I.interpolate_run(out, 'cpu')}
    cross = json.loads((out / 'summary.json').read_text())['cross']
    assert [[rows[a]['down1'], rows[a]['down2']] for a in (1.0, 0.0)] == cross


def test_the_xml_gan_generator_term_trains_each_up_half_through_the_discriminator():
    """The generator term w·BCE(D(up_i(x)), label of j) sends up_i the gradient of that term (not zero: the feature
    is not detached on its way into D), and train_step gives D only its own loss's gradient."""
    models, x, y = pair_setup(seed=8)
    torch.manual_seed(0)
    disc = X.discriminator(cut_shape(models[0], CUT)[0]).double()
    hs = halves(models)
    out = X.run_paths(hs, x, X.all_paths(2, 2))
    gan = X.xml_gan_losses(out, y, 2, 2, [0, 1], disc, adv_weight=0.5)
    plain = X.xml_losses(out, y, 2, 2, [0, 1])
    for i, label in ((0, 0.0), (1, 1.0)):
        up = list(hs[i][0].parameters())
        got = torch.autograd.grad(gan[i] - plain[i], up, retain_graph=True)
        d = disc(out[(i,)]).squeeze(1)
        want = torch.autograd.grad(0.5 * F.binary_cross_entropy_with_logits(d, torch.full_like(d, label)), up,
                                   retain_graph=True)
        assert sum(g.abs().sum() for g in got) > 1e-6
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def _two_rank_worker(rank, world, port, out, record, extra):
    """One process of a 2-process CLI run (1 epoch) that records the batches it drew and every BatchNorm statistic
    it keeps (the nets', the stitches', each path's own sets) just before the end-of-epoch averaging and after."""
    import os
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: two ranks of 2 threads each on 2 cores crawl
    seen, stats, real_set_up, real_reduce, real_augment = [], {}, X.set_up, X.dist.all_reduce, X.augment

    def statistics():
        run = stats['run']
        return [b for m in [*run.models, run.stitches] for b in m.buffers() if b.is_floating_point()] + \
            run.own_bn.tensors([0, 1])

    def set_up(cfg):
        stats['run'] = real_set_up(cfg)
        return stats['run']

    def all_reduce(t, *a, **k):
        if 'before' not in stats and any(t is b for b in statistics()):  # the first statistic averaged
            stats['before'] = [b.clone() for b in statistics()]
        return real_reduce(t, *a, **k)
    X.set_up, X.dist.all_reduce = set_up, all_reduce
    X.augment = lambda images, **kw: seen.append(images.clone()) or real_augment(images, **kw)
    assert X.main([*RUN[2:], *extra, '--epochs', '1', '--out', out]) == 0
    run = stats['run']
    where = [sum(1 for m in run.models for b in m.buffers() if b.is_floating_point()),
             sum(1 for b in run.stitches.buffers() if b.is_floating_point())]  # the nets', then the stitches'
    torch.save({'seen': seen, 'before': stats['before'], 'after': [b.clone() for b in statistics()],
                'where': where}, f'{record}.{rank}')


@pytest.mark.parametrize('setting', ['stitched', 'frozen'])
def test_two_ranks_draw_the_same_batches_and_average_their_batchnorm_statistics(setting, tmp_path, capsys):
    """Under torchrun every rank draws the same data order (each then trains on its share), and at the end of an
    epoch every BatchNorm statistic a rank keeps becomes the mean over the ranks (the same on both, not a sum,
    not left per rank): the nets', the stitches' (stitched: res18 and mbv1 cut after the stem, 4 and 2 channels)
    and each path's own sets, also where a frozen net feeds a learning one (frozen: --freeze 1)."""
    import socket
    extra = ['--cut', 'stem']
    if setting == 'frozen':
        assert run_cli([*RUN[2:], '--method', 'independent', '--epochs', '1', '--out', str(tmp_path / 'init')],
                       capsys)[0] == 0
        extra = ['--freeze', '1', '--init1', str(tmp_path / 'init' / 'last.pt')]
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_worker, args=(2, port, str(tmp_path / 'run'), str(tmp_path / 'rec'), extra),
                                nprocs=2)
    r0, r1 = (torch.load(tmp_path / f'rec.{r}', weights_only=True) for r in range(2))
    assert len(r0['seen']) == 8 and all(torch.equal(a, b) for a, b in zip(r0['seen'], r1['seen']))
    assert len(r0['before']) == len(r0['after']) > 0
    for b0, b1, a0, a1 in zip(r0['before'], r1['before'], r0['after'], r1['after']):
        assert torch.equal(a0, a1)
        torch.testing.assert_close(a0, (b0 + b1) / 2)
    differed = [not torch.equal(b0, b1) for b0, b1 in zip(r0['before'], r1['before'])]
    nets, stitches = r0['where']
    assert any(differed[:nets]) and any(differed[nets + stitches:])  # the shares differed: nets', own sets
    if setting == 'stitched':
        assert stitches == 4 and any(differed[nets:nets + stitches])  # the stitches' statistics differed too


def test_the_road_from_train_to_kl_div_is_at_most_six_calls(tmp_path, monkeypatch):
    """A reader follows train() to the loss in six calls or fewer: train_epoch → the step → train_step →
    xml_losses → dml_loss → kl_div (the plain path; the CUDA graph wraps the step on the GPU)."""
    import inspect
    depths, real = [], X.kl_div

    def kl_div(*args, **kw):
        # the calls from train() to here; comprehensions are frames in some Pythons, not calls
        names = [f.function for f in inspect.stack()[1:] if not f.function.endswith('comp>')
                 and f.function != '<genexpr>']
        depths.append(names.index('train') + 1)
        return real(*args, **kw)
    monkeypatch.setattr(X, 'kl_div', kl_div)
    X.train(X.parse_args(['--pair', 'res18,mbv1', '--method', 'xml', *TINY, '--out', str(tmp_path / 'x')]))
    assert depths and max(depths) <= 6, depths


def test_every_planted_bug_finds_its_one_line_and_names_tests_that_exist(capsys):
    """tools/plant_bugs.py's patterns follow the code: each occurs once where it is planted (else the bug is not
    planted at all) and each -k expression selects tests of this file."""
    assert len({m[0] for m in PB.M}) == len(PB.M)
    names = [n for n in globals() if n.startswith('test_')]
    source = Path(__file__).read_text()  # test ids (parametrize's ids=) are in it too
    for name, f, old, new, k in PB.M:
        assert (HERE / f).read_text().count(old) == 1 and old != new, name
        words = [w for w in k.replace('(', ' ').replace(')', ' ').split() if w not in ('or', 'and', 'not')]
        assert all(any(w in n for n in names) or f"'{w}'" in source for w in words), (name, k)
    assert PB.main(['--list', 'reversed KL']) == 0 and 'reversed KL' in capsys.readouterr().out


# --------------------------------------------------------------- the deck's explanation, measured (issue 40)
def linear_softmax(seed=0, d=5, c=4, n=24):
    """A linear softmax layer in float64 and three fixed batches of its inputs and labels."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(d, c).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(c, (n,))
    return net, [(x[s:s + n // 3], y[s:s + n // 3]) for s in range(0, n, n // 3)]


def test_flatness_power_iteration_finds_the_top_hessian_eigenvalue():
    """Against Hessians known whole: quadratics ½θᵀAθ (A's eigenvalues 5, 4, 3, −1, 0.5, 0, and −6, 5, 4, 3, 0.5,
    0, whose largest magnitude is not the largest) and the training cross-entropy of a linear softmax layer, whose
    Hessian torch.autograd.functional.hessian gives (float64)."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = q @ torch.diag(torch.tensor([5.0, 4.0, 3.0, -1.0, 0.5, 0.0], dtype=torch.float64)) @ q.T
    theta, v = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theta.requires_grad_()
    quadratic = lambda: [0.5 * theta @ A @ theta]  # noqa: E731
    assert torch.allclose(FL.hessian_vector_product(quadratic, [theta], [v])[0], A @ v, rtol=1e-12, atol=1e-12)
    r = FL.top_eigenvalue(quadratic, [theta], torch.Generator().manual_seed(1), max_iter=5000, tol=1e-13)
    assert r['converged'] and r['iterations'] > 10 and r['eigenvalue'] == pytest.approx(5.0, rel=1e-9)
    assert r['shift'] is None
    capped = FL.top_eigenvalue(quadratic, [theta], torch.Generator().manual_seed(1), max_iter=3, tol=1e-13)
    assert capped['iterations'] == 3 and not capped['converged']
    # the largest |λ| negative (−6): the largest λ (5) from the Hessian shifted by −6
    B = q @ torch.diag(torch.tensor([-6.0, 5.0, 4.0, 3.0, 0.5, 0.0], dtype=torch.float64)) @ q.T
    r = FL.top_eigenvalue(lambda: [0.5 * theta @ B @ theta], [theta], torch.Generator().manual_seed(1), max_iter=5000,
                          tol=1e-13)
    assert r['converged'] and r['eigenvalue'] == pytest.approx(5.0, rel=1e-9) and r['shift'] == pytest.approx(-6.0)

    net, batches = linear_softmax()
    names, params = zip(*net.named_parameters())

    def loss(flat):  # the same cross-entropy as a function of all parameters in one vector
        split = dict(zip(names, (t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in params]), params))))
        return sum(F.cross_entropy(torch.func.functional_call(net, split, (x,)), y) for x, y in batches) / len(batches)
    flat = torch.cat([p.detach().flatten() for p in params])
    H = torch.autograd.functional.hessian(loss, flat)
    u = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    hv = FL.hessian_vector_product(FL.loss_terms(net, batches), list(params), u)
    assert torch.allclose(torch.cat([h.flatten() for h in hv]), H @ torch.cat([w.flatten() for w in u]),
                          rtol=1e-10, atol=1e-12)
    top = torch.linalg.eigvalsh(H)[-1].item()
    r = FL.top_eigenvalue(FL.loss_terms(net, batches), list(params), torch.Generator().manual_seed(2),
                          max_iter=5000, tol=1e-12)
    assert r['converged'] and r['iterations'] > 3 and r['eigenvalue'] == pytest.approx(top, rel=1e-8)


def test_flatness_directions_are_filter_normalised_and_leave_1d_parameters_alone():
    """Li et al. 2018: each filter's direction has that filter's norm (filters of norms 10⁻³ … 10³ here, so that a
    layer-wide scale would miss all but about one); BatchNorm weights and biases get direction 0."""
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(7, 3, 3, 3, dtype=torch.float64, generator=g) * torch.logspace(-3, 3, 7).view(7, 1, 1, 1)
    fc = torch.randn(4, 9, dtype=torch.float64, generator=g) * torch.tensor([0.01, 1.0, 100.0, 5.0]).view(4, 1)
    bn_weight, bias = torch.ones(7, dtype=torch.float64), torch.randn(4, dtype=torch.float64, generator=g)
    d = FL.filter_directions([conv, bn_weight, fc, bias], torch.Generator().manual_seed(1))
    for p, u in ((conv, d[0]), (fc, d[2])):
        assert u.shape == p.shape
        assert torch.allclose(u.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1), rtol=1e-12)
        cos = F.cosine_similarity(u.flatten(1), p.flatten(1), dim=1).abs()
        assert (cos < 0.99).all()  # a random direction, not the weights themselves
    assert not d[1].any() and not d[3].any() and d[1].shape == (7,) and d[3].shape == (4,)


def test_flatness_rise_is_the_mean_two_sided_change_of_the_loss_zero_at_step_0_and_growing_with_the_step():
    """A linear softmax layer's cross-entropy is convex, so (L(θ + a·d) + L(θ − a·d))/2 − L(θ) grows with a from
    0 at a = 0; the tool's numbers are that, by hand, over the same draws."""
    net, batches = linear_softmax()
    steps = (0.0, 0.05, 0.1, 0.2)
    r = FL.flatness(net, batches, torch.Generator().manual_seed(3), draws=4, steps=steps)
    assert r['0.0'] == {'mean': 0.0, 'se': 0.0}
    assert 0 < r['0.05']['mean'] < r['0.1']['mean'] < r['0.2']['mean'] and r['0.2']['se'] > 0
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    W, b = net.weight.detach(), net.bias.detach()
    ce = lambda w: F.cross_entropy(x @ w.T + b, y).item()  # noqa: E731  (equal batches: the mean of the means)
    assert r['loss'] == pytest.approx(ce(W), rel=1e-12)
    gen, rises = torch.Generator().manual_seed(3), {a: [] for a in steps}
    for _ in range(4):
        dW, db = FL.filter_directions([W, b], gen)
        assert not db.any()
        for a in steps:
            rises[a].append((ce(W + a * dW) + ce(W - a * dW)) / 2 - ce(W))
    for a in steps[1:]:
        t = torch.tensor(rises[a], dtype=torch.float64)
        assert r[str(a)]['mean'] == pytest.approx(t.mean().item(), rel=1e-9)
        assert r[str(a)]['se'] == pytest.approx(t.std().item() / 2, rel=1e-9)


def test_flatness_jacobian_estimate_matches_the_exact_frobenius_norm():
    """softmax(Wx + b) has the Jacobian (diag p − ppᵀ)W. Each image's estimate of ‖J‖_F² is a mean of 200 draws of
    vᵀMv (M = JJᵀ), of relative standard deviation √(2 tr M²)/(tr M √200) ≤ √(2/200) = 10 %, at most 5 % for its
    square root, so at most 0.63 % (1.25 % for ‖J‖_F²) for the mean over 64 images: 3 % (6 %) margins are over 4.5
    of them. The norms are well below 1, so a missing square root is far off; the standard error is over images."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    with torch.no_grad():
        p = F.softmax(net(x), 1)
        exact = ((torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ net.weight).flatten(1).norm(dim=1)
    assert exact.mean() < 0.5
    r = FL.jacobian_norms(net, [x[:40], x[40:]], torch.Generator().manual_seed(0), projections=200)
    assert r['images'] == 64 and r['projections'] == 200
    assert r['frobenius'] == pytest.approx(exact.mean().item(), rel=0.03)
    assert r['frobenius_sq'] == pytest.approx(exact.pow(2).mean().item(), rel=0.06)
    assert r['se'] == pytest.approx(exact.std().item() / 8, rel=0.5)


def test_flatness_agreement_of_a_net_with_itself_is_total_and_its_kl_zero():
    """And of two nets: the share of images with the same top-1 and the mean of KL(p_a‖p_b) + KL(p_b‖p_a), by
    hand with torch.distributions; each net's top-1 and the ensemble's (mean softmax)."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()
    x, y = torch.randn(50, 6, dtype=torch.float64), torch.randint(4, (50,))
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]
    with torch.no_grad():
        za, zb = a(x), b(x)
    acc = [100.0 * (z.argmax(1) == y).double().mean().item() for z in (za, zb)]
    same = FL.agreement([a, a], batches)
    assert same['pairs'] == [{'nets': [1, 2], 'top1_agree': 100.0, 'sym_kl': 0.0}]
    assert same['top1'] == [acc[0], acc[0]] and same['ensemble'] == pytest.approx(acc[0]) and acc[0] < 100
    r = FL.agreement([a, b], batches)
    agree = 100.0 * (za.argmax(1) == zb.argmax(1)).double().mean().item()
    pa, pb = Categorical(logits=za), Categorical(logits=zb)
    sym_kl = (kl_divergence(pa, pb) + kl_divergence(pb, pa)).mean().item()
    assert 0 < agree < 100 and agree not in acc
    assert r['pairs'][0]['top1_agree'] == pytest.approx(agree)
    assert r['pairs'][0]['sym_kl'] == pytest.approx(sym_kl, rel=1e-9)
    assert r['top1'] == pytest.approx(acc)
    assert r['ensemble'] == pytest.approx(100.0 * ((pa.probs + pb.probs).argmax(1) == y).double().mean().item())


def test_flatness_tool_measures_both_nets_of_a_run_on_its_own_training_images(tmp_path, capsys):
    """A run with --train-per-class 4: the tool (and load_run, which it shares with the other tools) takes the
    run's 40 training images and their mean and std; each net is its pure path with its own statistics, so its
    test top-1 here is the run's own_bn number."""
    out = tmp_path / 'xml'
    args = ['--pair', 'res18,mbv1', '--method', 'xml', '--dataset', 'synthetic', '--width', '4', '--device', 'cpu',
            '--epochs', '1', '--batch-size', '20', '--train-per-class', '4', '--out', str(out)]
    assert run_cli(args, capsys)[0] == 0
    summary = json.loads((out / 'summary.json').read_text())
    _, _, data, mean, std, *_ = I.load_run(out, 'cpu')
    sub = X.first_per_class(X.synthetic_data(), 4)
    assert torch.equal(data.train_x, sub.train_x) and (mean, std) == X.channel_stats(sub.train_x)
    assert FL.main([str(out), '--device', 'cpu', '--batches', '1', '--max-iter', '2', '--draws', '2',
                    '--projections', '1', '--test-images', '8']) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / 'flatness.json').read_text())
    assert r['train_images'] == 40 and r['train_per_class'] == 4 and (r['batches'], r['batch_size']) == (1, 20)
    assert [(n['net'], n['name'], n['path']) for n in r['per_net']] == [(1, 'res18', '1-1'), (2, 'mbv1', '2-2')]
    for n, name in zip(r['per_net'], ('res18', 'mbv1')):
        s = n['sharpness']  # --max-iter 2, twice where the largest |λ| is negative
        assert s['iterations'] == (2 if s['shift'] is None else 4) and math.isfinite(s['eigenvalue'])
        assert set(n['flatness']) == {'0.05', '0.1', '0.2'} and all(set(f) == {'mean', 'se'}
                                                                      for f in n['flatness'].values())
        assert n['jacobian']['images'] == 8 and math.isfinite(n['jacobian']['frobenius']) and n['train_loss'] > 0
        assert n['test_top1'] == summary['own_bn']['accuracy'][n['net'] - 1] == n['run_top1']
        assert not n['fallback'] and name in printed
    a = r['agreement']
    assert [p['nets'] for p in a['pairs']] == [[1, 2]] and 0 <= a['pairs'][0]['top1_agree'] <= 100
    assert a['ensemble'] == a['run_ensemble'] == summary['own_bn']['ensemble']
    assert a['ensemble_gain'] == pytest.approx(summary['own_bn']['ensemble'] - max(summary['own_bn']['accuracy']))
    assert FL.main([str(out), '--device', 'cpu', '--batches', '3']) == 2  # 60 images of 40
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'give at most 2' in err


def test_flatness_collect_averages_each_measure_over_the_runs_of_a_method_and_keeps_methods_apart(tmp_path,
                                                                                                  capsys):
    """--collect: one row per method and net in the order of X.METHODS, mean ± sample std over that method's
    seeds (here two seeds of xml: mean 3, std √2 of 2 and 4), one seed's value with its draws' standard error;
    refused in one line: a folder without flatness.json, a run without summary.json, runs measured with other
    settings, a seed twice, a run measured before its last epoch."""
    def fake(method, seed, v, folder=None, **measured):
        net = {'train_loss': v, 'sharpness': {'eigenvalue': 10 * v}, 'jacobian': {'frobenius': v / 10, 'se': 0.5},
               'flatness': {str(a): {'mean': a * v, 'se': 0.25} for a in (0.05, 0.1, 0.2)}, 'test_top1': 50 + v}
        run = tmp_path / (folder or f'{method}_s{seed}')
        run.mkdir()
        (run / 'summary.json').write_text(json.dumps({
            'seed': seed, 'method': method, 'pair': 'res18,mbv1', 'nets': ['res18', 'mbv1'], 'cut': 'layer3',
            'dataset': 'folder', 'epochs': 200, 'width': 16}))
        (run / 'flatness.json').write_text(json.dumps({
            'nets': ['res18', 'mbv1'], 'method': method, 'epoch': 200, 'batches': 4, 'batch_size': 128, 'seed': 0,
            'max_iter': 50, 'tol': 1e-3, 'draws': 10, 'steps': [0.05, 0.1, 0.2], 'projections': 10,
            'test_images': 1000, **measured,
            'per_net': [{**net, 'net': 1, 'name': 'res18'}, {**net, 'net': 2, 'name': 'mbv1'}],
            'agreement': {'pairs': [{'nets': [1, 2], 'top1_agree': 60 + v, 'sym_kl': v}], 'ensemble_gain': -v}}))
        return run
    fake('xml', 0, 2.0, folder='a_xml_s0'), fake('xml', 1, 4.0), fake('dml', 0, 7.0)  # folders not in method order
    assert FL.main(['--collect', str(tmp_path), '--out', str(tmp_path / 't.md')]) == 0
    text = (tmp_path / 't.md').read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith('| xml') or line.startswith('| dml')]
    sd = f'{math.sqrt(2):.2g}'
    assert rows[0] == '| dml | 1: res18 | 1 | 7 | 70 | 0.35 (se 0.25) | 0.7 (se 0.25) | 1.4 (se 0.25) | 0.7 (se 0.5) | 57 | 0 |'
    assert rows[2] == (f'| xml | 1: res18 | 2 | 3 ± {sd} | 30 ± {10 * math.sqrt(2):.2g} | 0.15 ± '
                       f'{0.05 * math.sqrt(2):.2g} | 0.3 ± {0.1 * math.sqrt(2):.2g} | 0.6 ± {0.2 * math.sqrt(2):.2g}'
                       f' | 0.3 ± {0.1 * math.sqrt(2):.2g} | 53 ± {sd} | 0, 1 |')
    assert rows[1].startswith('| dml | 2: mbv1 | 1 | 7 |') and rows[3].startswith('| xml | 2: mbv1 | 2 |')
    assert rows[4:] == ['| dml | 1, 2 | 1 | 67 | 7 | -7 |', f'| xml | 1, 2 | 2 | 63 ± {sd} | 3 ± {sd} | -3 ± {sd} |']

    def refused(why):
        assert FL.main(['--collect', str(tmp_path), '--out', str(tmp_path / 't.md')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and why in err and (tmp_path / 't.md').read_text() == text
    (tmp_path / 'empty').mkdir()
    assert FL.main(['--collect', str(tmp_path / 'empty')]) == 2 and 'no RUN/flatness.json' in capsys.readouterr().err
    run = fake('independent', 0, 1.0, draws=20)
    refused('--draws')
    (run / 'summary.json').unlink()
    refused('without summary.json')
    shutil.rmtree(run)
    run = fake('xml', 1, 1.0, folder='xml_s1_again')
    refused('more than once')
    shutil.rmtree(run)
    fake('independent', 0, 1.0, epoch=150)
    refused('epoch 150 of 200')
