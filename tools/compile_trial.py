"""torch.compile trial of the XML training step: what compiling the step costs, what it
buys, and whether the compiled step computes what the eager step computes.

    python tools/compile_trial.py [--out DIR] [--mode default] [--precision bf16] [--tiny]

The setting of results/bench.md's 'ours' rows: res18,res34 cut after layer2, width 64, batch 128,
CIFAR-100-shaped synthetic data, method xml, simultaneous updates, bf16 autocast, channels_last,
fused SGD with the lr in a device tensor. The step is xml_ref.TrainStep's, restated in Step below
(normalise the uint8 batch, then xml_ref.train_step under autocast: the forward of all four paths,
the two routed backward passes, both optimizer steps; then the loss sums); Step.step is what gets
compiled. Three measurements:
- compile time: the seconds the first compiled steps take beyond the steady-state step time;
- agreement: from identical weights and batches, --check-steps steps eager and the same steps
  compiled; the relative differences of the losses, of the weight updates and of the BatchNorm
  statistics' updates. Beside them the same numbers for eager against eager (run-to-run noise)
  and, in bf16, for eager bf16 against eager fp32 (what bf16 alone changes). The compiled step
  passes if it differs from eager by no more than TOLERANCE's floor or, if larger, the yardstick:
  bf16's own effect (bf16) or 10 × the run-to-run noise (fp32);
- steady-state img/s: eager, eager in one CUDA graph (the fast path the training runs use),
  compiled, and compiled inside one CUDA graph.
--tiny: width 4, batch 8, 16×16 images on the CPU in fp32 (no CUDA graphs): a test of this script,
not a measurement. When the backend cannot compile the step (no C compiler for the CPU, say), the
trial falls back to aot_eager, then to eager (Dynamo's graphs run as they are), and says so.

Writes compile_trial.json (one entry per mode and precision; entries already there are kept) and
compile_trial.md into --out after every stage, so a run cut off by a time limit leaves its results.
Exit status 0 when the check passed and nothing failed."""
import argparse
import copy
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402

# Floors of the agreement check (relative differences, see differences()). bf16: Inductor rounds at
# other points than eager (it fuses, and keeps fused intermediates in fp32), so bf16's own effect is
# the yardstick, and the floor keeps a lucky small bf16 effect from failing an honest compile. fp32:
# summation order alone, amplified a little over the steps.
TOLERANCE = {'bf16': {'loss': 1e-2, 'update': 5e-2, 'bn': 5e-2},
             'fp32': {'loss': 1e-4, 'update': 1e-3, 'bn': 1e-3}}
BACKENDS = ('inductor', 'aot_eager', 'eager')  # each a fallback for the one before


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='.', help='where compile_trial.json and .md go')
    p.add_argument('--mode', default='default',
                   help='torch.compile mode: default, max-autotune-no-cudagraphs, ...')
    p.add_argument('--backend', default='inductor', choices=BACKENDS)
    p.add_argument('--precision', choices=('bf16', 'fp32'), help='default: bf16 on CUDA, else fp32')
    p.add_argument('--pair', default='res18,res34')
    p.add_argument('--cut', default='layer2', help="the deck's cut for res18,res34")
    p.add_argument('--method', default='xml')
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32, help='image side')
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--check-steps', type=int, default=5)
    p.add_argument('--steps', type=int, default=100, help='timed steps per speed measurement')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--tiny', action='store_true', help='width 4, batch 8, 16×16, CPU: a test')
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.batch, args.size, args.device = 4, 8, 16, 'cpu'
        args.check_steps, args.steps = 3, 4
    if torch.device(args.device).type != 'cuda':
        args.precision = 'fp32'  # the fast path (bf16, channels_last, graphs) is the GPU's
    args.precision = args.precision or 'bf16'
    return args


class Step(X.CudaGraphStep):
    """xml_ref.TrainStep around xml_ref.train_step, held in CudaGraphStep's static batch, whose step
    can be swapped: use(fn) makes a call run `fn` (the eager TrainStep or a compiled one) instead,
    with graph: `warmup` real steps, then one CUDA-graph capture of fn, replayed for every later batch
    (CudaGraphStep's own logic); without: eagerly, on the static batch too."""

    def __init__(self, parts, opts, method, mean, std, batch_shape, dev, bf16, channels_last,
                 warmup=3):
        eager = X.TrainStep(functools.partial(X.train_step, parts, opts, method=method),
                            list(range(len(opts))), mean, std, dev, bf16=bf16,
                            channels_last=channels_last)
        super().__init__(eager, batch_shape, dev, warmup)
        self.eager, self.loss_sum, self.graph = eager, eager.loss_sum, False

    def use(self, fn, graph=False):
        self.step, self.graph, self.captured, self.calls = fn, graph, None, 0

    def __call__(self, images, labels):
        if self.graph:
            return super().__call__(images, labels)
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.step(self.images, self.labels)


class Trial:
    """The nets, their optimizers and one Step, with the initial state kept to restart from."""

    def __init__(self, args):
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == 'cuda'
        self.batch, self.bf16 = args.batch, args.precision == 'bf16'
        torch.backends.cudnn.benchmark = self.cuda  # as the training runs: fixed shapes
        data = X.synthetic_data(args.batch * 16, 0, num_classes=args.classes, size=args.size)
        mean, std = X.channel_stats(data.train_x)
        self.images, self.labels = data.train_x.to(self.dev), data.train_y.to(self.dev)
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        torch.manual_seed(0)
        self.models = [X.build(n, args.classes, args.width).to(self.dev, memory_format=fmt)
                       for n in args.pair.split(',')]
        parts = [list(X.split(m, args.cut)) for m in self.models]
        cfg = argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.opts = [X.sgd(m.parameters(), cfg, fused=self.cuda) for m in self.models]
        if self.cuda:  # as the fast path: the lr in a device tensor, which a captured graph reads
            for opt in self.opts:
                for group in opt.param_groups:
                    group['lr'] = torch.tensor(cfg.lr, device=self.dev)
        self.ts = Step(parts, self.opts, args.method, mean, std,
                       (args.batch, args.size, args.size, 3), self.dev, self.bf16, self.cuda)
        self.eager_step = self.ts.eager.__call__
        self.init = [copy.deepcopy(m.state_dict()) for m in self.models]
        self.gen = torch.Generator(self.dev).manual_seed(1)
        self.check_batches = [self.sample() for _ in range(args.check_steps)]

    def sample(self):
        """A batch as the training loop makes one: random images, cropped and flipped."""
        idx = torch.randint(len(self.images), (self.batch,), device=self.dev, generator=self.gen)
        return X.augment(self.images[idx], generator=self.gen), self.labels[idx]

    def reset(self):
        """The initial weights and BatchNorm statistics, an empty optimizer state, in place (the
        tensors keep their identity, so a compiled step's guards still hold)."""
        for m, state in zip(self.models, self.init):
            m.load_state_dict(state)
        for opt in self.opts:
            opt.state.clear()
        for total in self.ts.loss_sum.values():
            total.zero_()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def run_check(self, step, bf16=None):
        """The check steps from the initial state on the check batches: the per-step losses, the
        final state and each step's seconds. bf16: this run's precision (default: the trial's)."""
        self.reset()
        self.ts.use(step)
        self.ts.eager.bf16 = self.bf16 if bf16 is None else bf16
        losses, seconds, before = [], [], [0.0] * len(self.ts.loss_sum)
        try:
            for images, labels in self.check_batches:
                t = time.perf_counter()
                self.ts(images, labels)
                self.sync()
                seconds.append(time.perf_counter() - t)
                now = [self.ts.loss_sum[i].item() for i in sorted(self.ts.loss_sum)]
                losses.append([a - b for a, b in zip(now, before)])
                before = now
        finally:
            self.ts.eager.bf16 = self.bf16
        state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models]
        return {'losses': losses, 'state': state, 'seconds': seconds}

    def img_per_s(self, step, graph, steps, warmup):
        """Steady-state images per second of `step` (in a CUDA graph when graph), the making of the
        random batches included (as in the training loop and bench.py)."""
        self.ts.use(step, graph and self.cuda)
        for _ in range(warmup):
            self.ts(*self.sample())
        self.sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.ts(*self.sample())
        self.sync()
        return steps * self.batch / (time.perf_counter() - t)


def differences(a, b, init):
    """Relative differences of two runs of the check: losses (max over steps and nets of
    |a − b| / |a|), weight updates (max over nets of ‖w_a − w_b‖ / ‖w_a − w_0‖), and likewise the
    updates of the BatchNorm running statistics; and whether the BN step counts agree."""
    loss = max(abs(x - y) / max(abs(x), 1e-12)
               for sa, sb in zip(a['losses'], b['losses']) for x, y in zip(sa, sb))
    out = {'loss': loss, 'update': 0.0, 'bn': 0.0, 'bn_counts_equal': True}
    for sa, sb, s0 in zip(a['state'], b['state'], init):
        weights = [k for k in sa if 'running' not in k and 'num_batches' not in k]
        for kind, keys in (('update', weights), ('bn', [k for k in sa if 'running' in k])):
            dev = sa[keys[0]].device
            flat = lambda s: torch.cat([s[k].float().reshape(-1).to(dev) for k in keys])
            wa, wb, w0 = flat(sa), flat(sb), flat(s0)
            rel = ((wa - wb).norm() / (wa - w0).norm().clamp_min(1e-30)).item()
            out[kind] = max(out[kind], rel)
        out['bn_counts_equal'] &= all(torch.equal(sa[k], sb[k]) for k in sa if 'num_batches' in k)
    return out


def tolerance(c):
    """The floor, or the yardstick where larger: what bf16 alone changes (bf16), 10 × the
    run-to-run noise (fp32)."""
    floor = TOLERANCE[c['precision']]
    if 'eager_bf16_vs_eager_fp32' in c:
        ref = c['eager_bf16_vs_eager_fp32']
    else:
        ref = {k: 10 * v for k, v in c['eager_vs_eager'].items() if k in floor}
    return {k: max(v, ref[k]) for k, v in floor.items()}


def compile_step(trial, mode, backend):
    """torch.compile of the eager step; it compiles lazily, in the first compiled steps."""
    torch._dynamo.reset()
    if backend != 'inductor':  # a mode is an Inductor setting
        return torch.compile(trial.eager_step, backend=backend)
    return torch.compile(trial.eager_step, mode=None if mode == 'default' else mode)


def dynamo_stats():
    """What Dynamo made of the step: its graphs, and where and why it broke them."""
    from torch._dynamo.utils import counters
    breaks = sorted(counters['graph_break'].items(), key=lambda kv: -kv[1])
    return {'unique_graphs': counters['stats'].get('unique_graphs', 0),
            'graph_breaks': sum(counters['graph_break'].values()),
            'graph_break_reasons': [f'{n}× {one_line(reason)}' for reason, n in breaks[:8]]}


def one_line(reason):
    """A graph-break reason's headline and explanation on one line (they come as paragraphs)."""
    lines = [l.strip() for l in reason.splitlines() if l.strip()]
    keep = lines[:1] + [l for l in lines[1:] if l.startswith('Explanation:')][:1]
    return ' '.join(keep)[:300].rstrip('.')


def failure(entry, what):
    """Record the exception being handled (and print it) without stopping the trial."""
    entry['errors'].append(f'{what}: {traceback.format_exc()[-3000:]}')
    print(entry['errors'][-1], file=sys.stderr, flush=True)


def check(trial, args, entry, save):
    """The agreement check and the compile time; returns the compiled step (None if none)."""
    eager = trial.run_check(trial.eager_step)
    c = entry['check'] = {'steps': args.check_steps, 'precision': args.precision}
    c['eager_vs_eager'] = differences(eager, trial.run_check(trial.eager_step), trial.init)
    if trial.bf16:
        fp32 = trial.run_check(trial.eager_step, bf16=False)
        c['eager_bf16_vs_eager_fp32'] = differences(eager, fp32, trial.init)
    save()
    for backend in BACKENDS[BACKENDS.index(args.backend):]:
        try:
            compiled = compile_step(trial, args.mode, backend)
            t = time.perf_counter()
            run = trial.run_check(compiled)
            entry['compile'] = {'backend': backend, 'first_step_s': run['seconds'][0],
                                'check_steps_s': time.perf_counter() - t, 'step_s': run['seconds']}
            break
        except Exception:  # record why, then try the next backend down
            failure(entry, f'compiling with backend {backend}')
            save()
    else:
        return None
    if backend != args.backend:
        alone = ' (Dynamo alone: eager against eager)' if backend == 'eager' else ''
        entry['fallback'] = (f'backend {args.backend} could not compile the step here; the trial '
                             f'fell back to backend {backend}{alone}')
    c['compiled_vs_eager'] = d = differences(eager, run, trial.init)
    c['tolerance'] = tolerance(c)
    c['passed'] = all(d[k] <= v for k, v in c['tolerance'].items()) and d['bn_counts_equal']
    entry['dynamo'] = dynamo_stats()
    save()
    return compiled


def speed(trial, args, entry, compiled, save):
    """Steady-state img/s of each way to run the step (the compiled ones if something compiled)."""
    ways = [('eager', trial.eager_step, False), ('eager+cuda_graph', trial.eager_step, True)]
    if compiled is not None:
        ways += [('compiled', compiled, False), ('compiled+cuda_graph', compiled, True)]
    warmup = 2 if args.tiny else 10  # more than Step's 3 warm-up steps and the capture
    for name, step, graph in ways:
        entry['img_per_s'][name] = None  # CUDA graphs need CUDA; or the way failed
        if graph and not trial.cuda:
            continue
        try:
            entry['img_per_s'][name] = trial.img_per_s(step, graph, args.steps, warmup)
            print(f'{name}: {entry["img_per_s"][name]:,.0f} img/s', flush=True)
        except Exception:
            failure(entry, name)
        save()
    comp, steady = entry.get('compile'), entry['img_per_s'].get('compiled')
    if comp and steady:  # what the compiled check steps took beyond steady-state steps
        comp['compile_s'] = comp['check_steps_s'] - args.check_steps * args.batch / steady
        save()


def write_text(path, text):
    """Write to a temporary name, then rename: a kill mid-write leaves the previous file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def write(out, result):
    """compile_trial.json (merged with the entries already there) and compile_trial.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / 'compile_trial.json'
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = {**result, 'trials': {**old.get('trials', {}), **result['trials']}}
    write_text(path, json.dumps(merged, indent=1) + '\n')
    write_text(out / 'compile_trial.md', report(merged))


def fmt(x, spec='.2e'):
    return '–' if x is None else format(x, spec)


def report(result):
    """compile_trial.md: per trial, the compile time, the agreement and the speeds."""
    s = result['setting']
    lines = ['# torch.compile of the XML training step', '',
             f'{result["device"]}, torch {result["torch"]}, {result["date"]}. {s["pair"]} cut '
             f'after {s["cut"]}, width {s["width"]}, batch {s["batch"]}, '
             f'{s["size"]}×{s["size"]} images, {s["method"]}, simultaneous updates'
             + (', channels_last, fused SGD' if s['cuda'] else '') + '. Compiled: Step.step of '
             '`tools/compile_trial.py` (xml_ref.train_step inside).', '']
    for name, e in result['trials'].items():
        lines += trial_report(name, e, s)
    return '\n'.join(lines) + '\n'


def trial_report(name, e, s):
    """compile_trial.md's section of one mode and precision."""
    comp, c = e.get('compile') or {}, e.get('check') or {}
    lines = [f'## {name}, backend {comp.get("backend", e["backend"])}', '']
    if e.get('fallback'):
        lines += [f'**Fallback:** {e["fallback"]}.', '']
    if comp:
        lines += [f'Compile: first step {comp["first_step_s"]:.1f} s; the {s["check_steps"]} check '
                  f'steps {comp["check_steps_s"]:.1f} s, of which about '
                  f'{fmt(comp.get("compile_s"), ".1f")} s compiling (beyond steady-state steps).',
                  '']
    if 'compiled_vs_eager' in c:
        lines += [f'Agreement after {c["steps"]} steps from identical weights and batches: '
                  + ('**passed**' if c['passed'] else '**FAILED**') + '. Relative differences:', '',
                  "| comparison | losses | weight updates | BN statistics' updates |",
                  '|---|---|---|---|']
        for key in ('eager_vs_eager', 'eager_bf16_vs_eager_fp32', 'compiled_vs_eager', 'tolerance'):
            if key in c:
                d = c[key]
                lines.append(f'| {key.replace("_", " ")} | {fmt(d["loss"])} | {fmt(d["update"])} '
                             f'| {fmt(d["bn"])} |')
        lines.append('')
    if e.get('dynamo'):
        d = e['dynamo']
        reasons = '; '.join(d['graph_break_reasons'])
        lines += [f'Dynamo: {d["unique_graphs"]} graphs, {d["graph_breaks"]} graph breaks'
                  + (f': {reasons}' if reasons else '') + '.', '']
    if e.get('img_per_s'):
        lines += ['| way | img/s |', '|---|---|']
        lines += [f'| {k} | {fmt(v, ",.0f")} |' for k, v in e['img_per_s'].items()] + ['']
    for err in e.get('errors', []):
        last = [l for l in err.splitlines() if l.strip()][-1]
        lines += [f'Error in {err.split(":")[0]}: `{last[:400]}`', '']
    return lines


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    dev = torch.device(args.device)
    keys = ('pair', 'cut', 'method', 'width', 'batch', 'size', 'classes', 'check_steps', 'steps',
            'tiny')
    result = {'device': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu',
              'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d'),
              'setting': {k: getattr(args, k) for k in keys}, 'trials': {}}
    result['setting']['cuda'] = dev.type == 'cuda'
    entry = {'backend': args.backend, 'precision': args.precision, 'errors': [], 'img_per_s': {}}
    result['trials'][f'mode {args.mode}, {args.precision}'] = entry
    save = lambda: write(out, result)
    t0 = time.perf_counter()
    trial = Trial(args)
    compiled = check(trial, args, entry, save)
    speed(trial, args, entry, compiled, save)
    entry['wall_s'] = time.perf_counter() - t0
    save()
    print(report(result), flush=True)
    return 0 if entry.get('check', {}).get('passed') and not entry['errors'] else 1


if __name__ == '__main__':
    sys.exit(main())
