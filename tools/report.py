"""The results table: RESULTS.md and results.json from finished runs, our numbers beside the deck's.

    python tools/report.py RUNS_DIR [--out results] [--name RESULTS] [--as /my/data=DATA_DIR ...]

Runs are grouped by pair, cut, data set, schedule (epochs) and width. Within a group one row per setting: runs that
differ only in their seed are one row, mean ± sample std over the n seeds; runs that differ in anything else
(method, path weights, update order, warm-up, rotation, T, λ, …) are separate rows, labelled by
what differs; two runs of one row with the same seed are refused (which one counts?), and runs started but not
finished are named above the tables. The settings every run of a group shares are stated above its table (the open choices are named
in every result). Every number is given twice: with the shared BatchNorm statistics (the deck's plain
BatchNorm) and with each path's own statistics (README, "BatchNorm"); '–' where a run predates the latter."""
import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import xml_ref as X  # noqa: E402

# METHOD.md §4: what the deck reports on CIFAR-100 (top-1 %, best model), net order as in the pair.
DECK = {'res18,mbv1': {'accuracy': {'independent': [74.0, 62.6], 'dml': [74.3, 65.9], 'xml': [73.6, 68.3],
                                    'xml+l2': [None, 68.5]},
                       'cross': [[73.20, 72.25], [70.21, 68.89]], 'feature_distance': {'xml': 0.002, 'xml+l2': 0.001}},
        'res18,res34': {'accuracy': {'independent': [73.9, 75.5], 'dml': [75.7, 76.6], 'xml': [76.6, 77.0]},
                        'cross': [[76.06, 76.61], [76.25, 76.61]], 'feature_distance': {}}}

# The settings that make two runs different experiments (the seed does not: seeds are averaged): the value a
# summary written before the setting existed had, the recipe's default (a row label names only what differs
# from it) and how to say it.
SETTINGS = {'path_weights': ('sum', 'sum', lambda v: f'{v} over paths'),
            'update': ('simultaneous', 'simultaneous', lambda v: f'{v} update'),
            'warmup_epochs': (0, 1, lambda v: f'warm-up {v} epoch' + ('s' if v != 1 else '')),
            'schedule': (None, X.SCHEDULE, lambda v: ('lr × 0.2 from each milestone epoch on' if v == X.SCHEDULE
                                                      else 'lr × 0.2 one epoch after each milestone (code before '
                                                           '2026-11-29)')),
            'temperature': (1.0, 1.0, lambda v: f'T {v:g}'),
            'l2_weight': (1.0, 1.0, lambda v: f'λ {v:g}'),
            'adv_weight': (0.1, 0.1, lambda v: f'adversarial weight {v:g}'),
            'paths_per_step': (None, None, lambda v: 'all paths a step' if v is None else f'{v} crossed paths a step'),
            'frozen': ([], [], lambda v: f'net {", ".join(map(str, v))} frozen' if v else 'no net frozen'),
            'hint_epochs': (0, 0, lambda v: f'{v} hint epoch' + ('s' if v != 1 else '')),
            'batch_size': (128, 128, lambda v: f'batch {v}'),
            'lr': (0.1, 0.1, lambda v: f'lr {v:g}'),
            'momentum': (0.9, 0.9, lambda v: f'momentum {v:g}'),
            'weight_decay': (5e-4, 5e-4, lambda v: f'weight decay {v:g}'),
            'rotate': (0, X.Config.rotate, lambda v: f'rotation ±{v:g}°' if v else 'no rotation'),
            'train_per_class': (None, None, lambda v: f'the first {v} training images of each class' if v
                                else 'all training images'),
            'fast': ('off', 'off', lambda v: 'bf16 + CUDA graph' if v == 'on' else 'fp32'),
            'processes': (1, 1, lambda v: f'{v} process' + ('es' if v != 1 else '')),
            'sync_bn': (False, False, lambda v: 'SyncBatchNorm' if v else 'per-process BatchNorm'),
            'init': ({'1': None, '2': None}, {'1': None, '2': None},
                     lambda v: ', '.join(f'net {k} from {p}' for k, p in v.items() if p) or 'fresh nets')}
XML_FAMILY = ('xml', 'xml+l2', 'xml+disc', 'xml+gan')
# Only where the method uses them: T for the KL methods, λ for xml+l2, … (independent has no T to differ in).
USES = {'path_weights': XML_FAMILY, 'temperature': ('kd', 'fitnet', 'dml') + XML_FAMILY, 'l2_weight': ('xml+l2',),
        'adv_weight': ('xml+disc', 'xml+gan'), 'paths_per_step': XML_FAMILY, 'hint_epochs': ('fitnet',),
        'frozen': ('independent', 'dml') + XML_FAMILY}  # kd and fitnet freeze their teacher by definition


def applies(summary, key):
    """Whether the run's method has the setting (independent has no temperature, …)."""
    return summary['method'] in USES.get(key, X.METHODS)


def setting(summary, key):
    """The run's value of a setting (None is a value: e.g. all paths a step); NA where it has none."""
    return summary.get(key, SETTINGS[key][0]) if applies(summary, key) else NA


NA = object()  # a setting the run's method does not have


def own(summary):
    """The run's numbers with each path's own BatchNorm statistics ('–' for a run from before they existed)."""
    return summary.get('own_bn') or {'accuracy': [None] * len(summary['nets']),
                                     'best_accuracy': [None] * len(summary['nets']), 'ensemble': None}


def default(method, key):
    return 4.0 if key == 'temperature' and method in ('kd', 'fitnet') else SETTINGS[key][1]


def mean_std(values):
    """(mean, sample std or None for one value) of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(stats, digits=2, sign=''):
    """'mean ± std' of mean_std's pair; sign='+' writes the mean with its sign (for differences)."""
    if stats is None:
        return '–'
    mean, std = stats
    return f'{mean:{sign}.{digits}f}' + ('' if std is None else f' ± {std:.{digits}f}')


def unfinished(runs_dir):
    """The run folders under runs_dir that a run has started (a checkpoint or metrics) but not finished."""
    return sorted(p.name for p in Path(runs_dir).glob('*') if p.is_dir() and not (p / 'summary.json').exists()
                  and ((p / 'last.pt').exists() or (p / 'metrics.jsonl').exists()))


def load_runs(runs_dir):
    """{run directory name: its summary.json (with its interpolation.csv, where there is one)}."""
    runs = {}
    for path in sorted(Path(runs_dir).glob('*/summary.json')):
        summary = json.loads(path.read_text())
        interp = path.parent / 'interpolation.csv'
        if interp.exists():
            summary['interpolation'] = [dict(zip(('alpha', 'down1', 'down2'), map(float, line.split(','))))
                                        for line in interp.read_text().splitlines()[1:]]
        runs[path.parent.name] = summary
    if not runs:
        raise X.UsageError(f'--report {runs_dir}: no finished runs (*/summary.json) there')
    return runs


def rows_of(group):
    """The group's runs as rows: one per setting (seeds pooled), each with its label and its runs."""
    varying = [k for k in SETTINGS if len({json.dumps(setting(s, k)) for s in group.values()
                                           if applies(s, k)}) > 1]
    rows = {}
    for name, s in group.items():
        key = (s['method'],) + tuple(json.dumps(setting(s, k)) if applies(s, k) else '-' for k in SETTINGS)
        rows.setdefault(key, []).append(name)
    table = []
    for key in rows:
        seeds = [group[r]['seed'] for r in rows[key]]
        twice = sorted(r for r in rows[key] if seeds.count(group[r]['seed']) > 1)
        if twice:  # averaged as two seeds, or one dropped from the paired differences: neither is right
            raise X.UsageError(f'{", ".join(twice)}: the same settings and seed more than once; keep one of '
                               'them under the runs folder')
        first = group[rows[key][0]]
        extras = [SETTINGS[k][2](setting(first, k)) for k in varying
                  if k != 'path_weights' and applies(first, k)
                  and setting(first, k) != default(first['method'], k)]
        label = first['method'] + (f' ({first["path_weights"]})' if setting(first, 'path_weights') == 'mean' else '')
        table.append({'label': label + (', ' + ', '.join(extras) if extras else ''), 'method': first['method'],
                      'runs': sorted(rows[key]), 'seeds': sorted(group[r]['seed'] for r in rows[key]),
                      'order': (X.METHODS.index(first['method']), label, len(extras))})
    table.sort(key=lambda row: row.pop('order'))  # by method, then the recipe's own setting first
    return table, varying


def shared_settings(group, varying):
    """The settings every run of the group has, in words (what the table does not repeat per row)."""
    some = next(iter(group.values()))
    words = [f'seeds {", ".join(map(str, sorted({s["seed"] for s in group.values()})))}']
    for k in SETTINGS:
        if k in varying:
            continue
        values = [setting(s, k) for s in group.values() if applies(s, k)]
        if values:
            words.append(SETTINGS[k][2](values[0]))
    return ', '.join(words)


PAIRS = (('xml', 'independent'), ('dml', 'independent'), ('xml', 'dml'))


def paired_differences(table, group, nets):
    """Per comparison (xml − independent, dml − independent, xml − dml; the rows of the recipe's own settings), per
    net and per BatchNorm statistics (shared, own): the last epoch's top-1 difference at each seed both rows ran, and
    their mean ± sample std. Seeds fix the initialisation and the data order of both runs alike, so the paired
    difference is the sharp test of a method's effect. Then, within each xml run, each net's down-half fed the other
    net's up-half against its own pure path (the deck's claim that crossed paths work about as well as pure ones)."""
    by_label = {row['label']: row for row in table}
    out = []
    for a, b in PAIRS:
        if a not in by_label or b not in by_label:
            continue
        runs = [{group[r]['seed']: group[r] for r in by_label[m]['runs']} for m in (a, b)]
        seeds = sorted(set(runs[0]) & set(runs[1]))
        if not seeds:
            continue
        for kind, block in (('shared', lambda s: s), ('own', own)):
            for i, net in enumerate(nets):
                both = [(block(runs[0][k])['accuracy'][i], block(runs[1][k])['accuracy'][i]) for k in seeds]
                diffs = [None if None in ab else ab[0] - ab[1] for ab in both]
                out.append({'comparison': f'{a} − {b}', 'statistics': kind, 'net': f'{i + 1}: {net}',
                            'seeds': seeds, 'differences': diffs, 'mean_std': mean_std(diffs)})
    if 'xml' in by_label and len(nets) == 2:  # crossed ≈ pure: each down-half fed the other up-half, against its own
        xml_runs = [group[r] for r in sorted(by_label['xml']['runs'], key=lambda r: group[r]['seed'])]
        for kind, block in (('shared', lambda s: s), ('own', own)):
            for i, net in enumerate(nets):  # cross[a][b]: up a → down b
                j = 1 - i
                diffs = [block(s)['cross'][j][i] - block(s)['cross'][i][i] if block(s).get('cross') else None
                         for s in xml_runs]
                out.append({'comparison': f'xml: up{j + 1}→down{i + 1} − up{i + 1}→down{i + 1}', 'statistics': kind,
                            'net': f'{i + 1}: {net}', 'seeds': [s['seed'] for s in xml_runs], 'differences': diffs,
                            'mean_std': mean_std(diffs)})
    return out


def placeholders(obj, names):
    """obj (text, or lists and dicts of it) with each folder in names (folder → placeholder) written as its
    placeholder, the deepest folder first: committed results name no machine's folders."""
    if isinstance(obj, str):
        if not re.search(r'[\s/\\]', obj):  # a value such as 'folder', not a path or a command
            return obj
        for folder, name in sorted(names.items(), key=lambda item: -len(item[0].rstrip('/\\'))):
            # whole folders only: /my/runs is not a part of /my/runs2 nor of /other/my/runs
            obj = re.sub(r'(?<![^\s\'"`(=\[:,])' + re.escape(folder.rstrip('/\\') or folder) +
                         r'(?![^/\\\s\'"`|,;:)\]}])', lambda _: name, obj)
        return obj
    if isinstance(obj, (list, dict)):
        items = [placeholders(v, names) for v in (obj.values() if isinstance(obj, dict) else obj)]
        return dict(zip(obj, items)) if isinstance(obj, dict) else items
    return obj


def curves(run_dir):
    """(epochs, own-statistics top-1 per net at them) of the evaluated epochs in a run's metrics.jsonl."""
    path = Path(run_dir) / 'metrics.jsonl'
    if not path.exists():
        return [], []
    recs = [r for r in map(json.loads, path.read_text().splitlines()) if 'own_bn' in r]
    return [r['epoch'] for r in recs], [r['own_bn']['accuracy'] for r in recs]


def plot_curves(group, table, nets, out_dir, stem, runs_dir):
    """stem.png in out_dir: test top-1 with each path's own statistics against the epoch, one panel per net,
    one line per method (the mean over its seeds); its file name, or None without matplotlib or metrics."""
    lines = {}
    for row in table:
        per_run = [curves(Path(runs_dir) / n) for n in row['runs']]
        epochs = per_run[0][0]
        if len(epochs) < 2 or any(e != epochs for e, _ in per_run):  # a curve needs two points
            continue
        lines[row['label']] = (epochs, [[statistics.fmean(acc[k][i] for _, acc in per_run)
                                         for k in range(len(epochs))] for i in range(len(nets))], len(per_run))
    if not lines:
        return None
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:  # optional, as for the interpolation plot
        print('matplotlib is not installed: no plot', file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 3.6), sharey=True)
    for i, ax in enumerate(axes):
        for label, (epochs, acc, n) in lines.items():
            ax.plot(epochs, acc[i], label=f'{label} (n={n})')
        ax.set(title=f'net {i + 1}: {nets[i]}', xlabel='epoch', ylabel='test top-1 (%), own statistics')
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out_dir) / f'{stem}.png', dpi=100)
    plt.close(fig)
    return f'{stem}.png'


def report(runs_dir, out_dir, name='RESULTS', names=None):
    """<name>.md and <name>.json (RESULTS.md and results.json by default) in out_dir from the finished runs
    under runs_dir: our numbers beside the deck's, each run with its command, epochs, device and date; names:
    {folder: placeholder} for the folders of this machine (placeholders(): in what the runs wrote, not in the
    report's own words)."""
    names, out_dir = names or {}, Path(out_dir)
    runs = placeholders(load_runs(runs_dir), names)
    lines = ['# Results', '', f'Generated by `python tools/report.py {placeholders(str(runs_dir), names)}` on {time.strftime("%Y-%m-%d")} from '
             'the runs below. Top-1 (%) on the test set: last epoch / best epoch (mean ± sample std over the seeds '
             'where a row has several); for CIFAR-100 runs the deck\'s number (best model) in brackets where it '
             'reports one.', '']
    started = placeholders(unfinished(runs_dir), names)
    if started:
        lines += [f'Not finished, so not in the tables: {", ".join(started)}.', '']
    groups = {}
    for run, s in runs.items():
        groups.setdefault((s['pair'], s['cut'], s['dataset'], s['epochs'], s['width']), {})[run] = s
    json_rows, json_paired = [], []
    for (pair, cut, dataset, epochs, width), group in groups.items():
        table, varying = rows_of(group)
        deck = DECK.get(pair) if dataset == 'cifar100' else None  # the deck's numbers are CIFAR-100's
        deck = deck or {'accuracy': {}, 'cross': None, 'feature_distance': {}}
        nets = next(iter(group.values()))['nets']
        lines += [f'## {pair}, cut {cut}, {dataset}, {epochs} epoch{"s" if epochs != 1 else ""}, '
                  f'width {width}', '',
                  f'Shared by these runs: {shared_settings(group, varying)}.', '',
                  '| method | ' + ' | '.join(f'net {i + 1}: {n}, {bn}' for i, n in enumerate(nets)
                                            for bn in ('shared', 'own')) +
                  ' | ensemble, shared | ensemble, own | feature distance | n |', '|---' * (2 * len(nets) + 5) + '|']
        for row in table:
            ss = [group[r] for r in row['runs']]
            d = deck['accuracy'].get(row['label'], [None] * len(nets))
            cells = []
            for i in range(len(nets)):
                frozen = ' (teacher, frozen)' if ss[0].get('teacher') and ss[0]['teacher']['net'] == i + 1 else ''
                for block in (lambda s: s, own):
                    last, best = (mean_std([block(s)[key][i] for s in ss]) for key in ('accuracy', 'best_accuracy'))
                    cells.append(f'{cell(last)} / {cell(best)}' + (f' [{d[i]}]' if d[i] is not None else '') + frozen)
            dist = cell(mean_std([s['feature_distance'] for s in ss]), 4)
            if row['label'] in deck['feature_distance']:
                dist += f' [{deck["feature_distance"][row["label"]]}]'
            ens = [cell(mean_std([block(s)['ensemble'] for s in ss])) for block in (lambda s: s, own)]
            with_own = sum(s.get('own_bn') is not None for s in ss)  # the own cells average these only
            n = f'{len(ss)}' + (f' ({with_own} with own statistics)' if 0 < with_own < len(ss) else '')
            lines.append(f'| {row["label"]} | ' + ' | '.join(cells) + f' | {" | ".join(ens)} | {dist} | {n} |')
            row.update(pair=pair, dataset=dataset, epochs=epochs, width=width,
                       **{f'{prefix}{key}': [mean_std([block(s)[key][i] for s in ss]) for i in range(len(nets))]
                          for prefix, block in (('', lambda s: s), ('own_bn_', own))
                          for key in ('accuracy', 'best_accuracy')},
                       **{f'{prefix}ensemble': mean_std([block(s)['ensemble'] for s in ss])
                          for prefix, block in (('', lambda s: s), ('own_bn_', own))},
                       **{f'{prefix}cross': [[mean_std([block(s)['cross'][a][b] for s in ss if block(s).get('cross')])
                                              for b in range(len(nets))] for a in range(len(nets))]
                          for prefix, block in (('', lambda s: s), ('own_bn_', own))},
                       feature_distance=mean_std([s['feature_distance'] for s in ss]))
            json_rows.append(row)
        for title, block in (('shared BatchNorm statistics (the deck\'s)', lambda s: s),
                             ('each path\'s own BatchNorm statistics', own)):
            crossed = [r for r in table if all(block(group[n]).get('cross') for n in r['runs'])]
            if not crossed:
                continue
            lines += ['', f'Cross pairings, last epoch, {title} (row: up-half of net a, column: down-half of '
                      'net b):', '',
                      '| method | up1→down1 | up2→down1 | up1→down2 | up2→down2 |', '|---|---|---|---|---|']
            for row in crossed:
                matrices = [block(group[n])['cross'] for n in row['runs']]
                c = [[cell(mean_std([m[a][b] for m in matrices])) for b in range(2)] for a in range(2)]
                lines.append(f'| {row["label"]} | {c[0][0]} | {c[1][0]} | {c[0][1]} | {c[1][1]} |')
            if block is not own and deck['cross']:
                c = deck['cross']
                lines.append(f'| deck, xml (CIFAR-100) | {c[0][0]} | {c[1][0]} | {c[0][1]} | {c[1][1]} |')
        paired = paired_differences(table, group, nets)
        if paired:
            lines += ['', 'Paired differences of the last epoch\'s top-1 (percentage points; the same seed: the same '
                      'initialisation and data order; the last rows: within each xml run, a crossed path against the pure '
                      'path of the same down-half), each seed, then mean ± sample std:', '',
                      '| comparison | BatchNorm statistics | net | per seed | mean ± std |', '|---|---|---|---|---|']
            for d in paired:
                per_seed = ', '.join(f's{k}: {"–" if v is None else f"{v:+.2f}"}' for k, v in zip(d['seeds'], d['differences']))
                lines.append(f'| {d["comparison"]} | {d["statistics"]} | {d["net"]} | {per_seed} | '
                             f'{cell(d["mean_std"], sign="+")} |')
            json_paired.append({'pair': pair, 'dataset': dataset, 'epochs': epochs, 'width': width, 'rows': paired})
        fits = [r for r in table if all('train' in group[n] for n in r['runs'])]
        if fits:  # the regime: how far each net fits its training images at the end
            lines += ['', 'The regime at the end of training: each net\'s mean training loss in the last epoch '
                      '(on augmented images, the method\'s whole loss) and its top-1 on the un-augmented training '
                      'images with its own BatchNorm statistics:', '',
                      '| method | ' + ' | '.join(f'net {i + 1}: {n}, {what}' for i, n in enumerate(nets)
                                                for what in ('loss', 'train top-1')) + ' |',
                      '|---' * (2 * len(nets) + 1) + '|']
            for row in fits:
                ts = [group[n]['train'] for n in row['runs']]
                lines.append(f'| {row["label"]} | ' + ' | '.join(
                    f'{cell(mean_std([t["loss"][i] for t in ts]), 3)} | '
                    f'{cell(mean_std([t["own_bn_accuracy"][i] for t in ts]))}' for i in range(len(nets))) + ' |')
        stem = name + '_' + re.sub(r'[^\w.+-]', '-', pair)  # tv:resnet18,… → tv-resnet18-…
        png = plot_curves(group, table, nets, out_dir, stem, runs_dir)
        if png:
            lines += ['', f'Test top-1 against the epoch, each path\'s own statistics: [{png}]({png})']
        for row in table:
            interp = [group[n]['interpolation'] for n in row['runs'] if 'interpolation' in group[n]]
            if not interp:
                continue
            alphas = [r['alpha'] for r in interp[0] if round(r['alpha'] * 10) % 5 == 0]
            at = lambda b, a: cell(mean_std([r[f'down{b}'] for rs in interp for r in rs if r['alpha'] == a]), 1)
            lines += ['', f'Interpolation, {row["label"]}: top-1 of each down-half fed a·up_1(x) + (1−a)·up_2(x) '
                      '(every 0.1 in the run\'s interpolation.csv):', '',
                      '| a | ' + ' | '.join(f'{a:.1f}' for a in alphas) + ' |', '|---' * (len(alphas) + 1) + '|',
                      '| down 1 | ' + ' | '.join(at(1, a) for a in alphas) + ' |',
                      '| down 2 | ' + ' | '.join(at(2, a) for a in alphas) + ' |']
        lines.append('')
    lines += ['## Runs', '', 'fast: on = bf16 + CUDA graph (TrainStep in a CudaGraphStep), off = the plain '
              'fp32 loop.', '',
              '| run | epochs | warm-up | update | seed | dataset | fast | device | torch | date | wall | command |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for run, s in runs.items():
        lines.append(f'| {run} | {s["hint_epochs"] + s["epochs"]} | {s.get("warmup_epochs", 0)} | {s["update"]} | '
                     f'{s["seed"]} | {s["dataset"]} | {s.get("fast", "off")} | {s["device"]} | {s["torch"]} | '
                     f'{s["date"]} | {X.format_duration(s["wall_s"])} | `{s["command"]}` |')
    out_dir.mkdir(parents=True, exist_ok=True)
    X.write_atomic(out_dir / f'{name}.md', lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    X.write_json(out_dir / f'{"results" if name == "RESULTS" else name}.json',
                 {'deck': DECK, 'rows': json_rows, 'paired_differences': json_paired, 'runs': runs,
                  'unfinished': started})
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs_dir', help='a folder of run folders (each with the summary.json a finished run writes)')
    p.add_argument('--out', default='results', help='where the table is written')
    p.add_argument('--name', default='RESULTS', help='write NAME.md and NAME.json (RESULTS: results.json)')
    p.add_argument('--as', dest='names', action='append', default=[], metavar='FOLDER=NAME',
                   help='write FOLDER as NAME, e.g. --as /my/data=DATA_DIR --as /my/runs=RUNS_DIR (repeatable)')
    args = p.parse_args(argv)
    if any('=' not in n for n in args.names):
        p.error('--as takes FOLDER=NAME, e.g. --as /my/runs=RUNS_DIR')
    try:
        report(args.runs_dir, args.out, args.name, dict(n.rsplit('=', 1) for n in args.names))
    except X.UsageError as e:
        print(f'report.py: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
