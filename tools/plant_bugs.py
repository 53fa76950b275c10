"""Plant one bug at a time into a copy of the checkout and check that the tests named with it fail.

    python tools/plant_bugs.py [PART_OF_A_NAME ...]     # all bugs, or those whose names contain a part
    python tools/plant_bugs.py --list [PART_OF_A_NAME ...]  # their names, files and tests; nothing planted

Each bug is a one-line change of the kind docs/METHOD.md forbids (a reversed or undetached KL, one backward for both nets,
a transposed cross matrix, …); the checkout is copied to a temporary folder for each, the change made there,
and the tests its -k expression selects must fail. Prints one line per bug: caught or NOT CAUGHT."""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
M = [  # (name, file, old, new, -k expression)
 ('reversed KL', 'xml_ref.py', "(log_t.exp() * (log_t - log_s))", "(log_s.exp() * (log_s - log_t))", 'kl'),
 ('undetached KL target', 'xml_ref.py', "log_t = F.log_softmax(target_logits.detach() / T, dim=1)", "log_t = F.log_softmax(target_logits / T, dim=1)", 'kl_target or spec_names'),
 ('T instead of T²', 'xml_ref.py', "return (log_t.exp() * (log_t - log_s)).sum(1).mean() * T * T", "return (log_t.exp() * (log_t - log_s)).sum(1).mean() * T", 'kl'),
 ('one backward for both nets', 'xml_ref.py', "        routed_backward([new[k] for k in keys], [learners[k] for k in keys])", "        [learners[k].zero_grad() for k in keys]; sum(new[k] for k in keys).backward()", 'spec_names or descends'),
 ('crossed path ji missing', 'xml_ref.py', "if len(p) == P and i in p]", "if len(p) == P and p[0] == i]", 'spec_names or k_net or descends'),
 ('BN stats per path', 'xml_ref.py', "            if q not in out:\n                h = out[q[:-1]]", "            if True:\n                h = out[q[:-1]]", 'batchnorm'),
 ('transposed cross matrix', 'xml_ref.py', "table['cross'] = [[acc[(a, b)] for b in range(K)] for a in range(K)]", "table['cross'] = [[acc[(b, a)] for b in range(K)] for a in range(K)]", 'evaluate_reports'),
 ('path ignores its up-half', 'xml_ref.py', "                h = out[q[:-1]]", "                h = out[q[:-1]] if k == 1 or q[0] == q[-1] else out[(q[-1],)]", 'evaluate_reports'),
 ('ensemble of logits', 'xml_ref.py', "probs = sum(F.softmax(out[p].float(), 1) for p in pure_paths(K, P)) / K", "probs = sum(out[p].float() for p in pure_paths(K, P)) / K", 'evaluate_reports'),
 ('swapped interpolation', 'tools/interpolate.py', "h = a * f1 + (1 - a) * f2", "h = (1 - a) * f1 + a * f2", 'interpolation'),
 ('interpolation off at a≠0,1', 'tools/interpolate.py', "h = a * f1 + (1 - a) * f2", "h = a * f1 + (1 - a) * f2 if a in (0, 1) else f1", 'interpolation'),
 ('crop range 0..2pad-1', 'xml_ref.py', "top = torch.randint(0, 2 * pad + 1, (n, 1)", "top = torch.randint(0, 2 * pad, (n, 1)", 'augment'),
 ('milestone off by one epoch', 'xml_ref.py', "drops = sum(epoch >= max(2, round(f * epochs))", "drops = sum(epoch > max(2, round(f * epochs))", 'lr_per_step or schedule'),
 ('warm-up off by one step', 'xml_ref.py', "return lr * step / warmup_steps", "return lr * (step + 1) / warmup_steps", 'lr_per_step or schedule'),
 ('lr set once an epoch', 'xml_ref.py', "        if lr_now != lr:", "        if lr is None:", 'schedule_is_what or resumed_inside'),
 ('resume drops optimizer state', 'xml_ref.py', "            if opt is not None:\n                opt.load_state_dict(state)", "            if opt is None:\n                opt.load_state_dict(state)", 'killed or resume_continues'),
 ('undetached feature_l2 target', 'xml_ref.py', "return F.mse_loss(feature, other_feature.detach())", "return F.mse_loss(feature, other_feature)", 'detached or xml_l2'),
 ('undetached hint target', 'xml_ref.py', "return F.mse_loss(regressed, teacher_feature.detach())", "return F.mse_loss(regressed, teacher_feature)", 'detached or hint'),
 ('mean path weights ignored', 'xml_ref.py', "losses[i] = sum(terms) / len(terms) if path_weights == 'mean' else sum(terms)", "losses[i] = sum(terms)", 'mean_path or core_copied'),
 ('l2 weight ignored', 'xml_ref.py', "losses[i] = losses[i] + l2_weight * l2 / ((K - 1) * (P - 1))", "losses[i] = losses[i] + l2 / ((K - 1) * (P - 1))", 'xml_l2'),
 ('l2 summed over cuts', 'xml_ref.py', "losses[i] = losses[i] + l2_weight * l2 / ((K - 1) * (P - 1))", "losses[i] = losses[i] + l2_weight * l2 / (K - 1)", 'xml_l2'),
 ('synthesis labels flipped', 'xml_ref.py', "synthesis_loss(scores[(i, i)], scores[(j, i)],", "synthesis_loss(scores[(j, i)], scores[(i, i)],", 'xml_disc or adversarial'),
 ('generator aims at its own label', 'xml_ref.py', "                                                            i == 1)", "                                                            i == 0)", 'gan'),
 ('hint stage skips the regressor', 'xml_ref.py', "loss = hint_loss(regressor(student_up(x)), teacher_feature)", "loss = hint_loss(student_up(x), teacher_feature)", 'hint'),
 ('crop rows only 0..2pad-1', 'xml_ref.py', "top = torch.randint(0, 2 * pad + 1, (n, 1)", "top = torch.randint(0, 2 * pad, (n, 1)", 'augment'),
 ('crop cols start at 1', 'xml_ref.py', "left = torch.randint(0, 2 * pad + 1, (n, 1)", "left = torch.randint(1, 2 * pad + 1, (n, 1)", 'augment'),
 ('NaN not agreed across ranks', 'xml_ref.py', "        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)\n", "", 'nan_on_one_rank'),
 ('best epoch = last of ties', 'xml_ref.py', "if rec['accuracy'][i] > best['accuracy'][i]:", "if rec['accuracy'][i] >= best['accuracy'][i]:", 'best_epoch'),
 ('kd default T = 1', 'xml_ref.py', "else 4.0 if cfg.method in ('kd', 'fitnet') else 1.0)", "else 1.0)", 'default_temperature'),
 ('sequential re-forward updates BN', 'xml_ref.py', "        with frozen_bn_stats(all_modules(parts, stitches)) if n else contextlib.nullcontext():", "        with contextlib.nullcontext():", 'batchnorm'),
 ('dml KL toward itself', 'xml_ref.py', "return {i: dml_loss(pure[i], pure[:i] + pure[i + 1:], labels, T) for i in learners}", "return {i: dml_loss(pure[i], pure[:i] + pure[i + 1:] if i else [pure[0]], labels, T) for i in learners}", 'dml or spec_names or textbook'),
 ('feature distance summed', 'xml_ref.py', "'feature_distance': sq_dist[s].item() / n_dist if n_dist", "'feature_distance': 2 * sq_dist[s].item() / n_dist if n_dist", 'evaluate_reports'),
 ('core: L2 toward z22', 'xml_ref.py', "loss2 = sum(ce(z, labels) + kl(z11, z) for z in (z12, z21, z22))", "loss2 = sum(ce(z, labels) + kl(z22, z) for z in (z12, z21, z22))", 'core_copied'),
 ('recalib exponential average', 'tools/bn_recalib.py', "        m.momentum = None  # cumulative average instead of an exponential one\n", "", 'recalibration'),
 ('recalib touches trained stats', 'tools/bn_recalib.py', "        copies = [copy.deepcopy(m) for k in range(1, P + 1)", "        copies = [m for k in range(1, P + 1)", 'recalibration'),
 ('report transposes cross', 'tools/report.py', "c = [[cell(mean_std([m[a][b] for m in matrices])) for b in range(2)] for a in range(2)]", "c = [[cell(mean_std([m[b][a] for m in matrices])) for b in range(2)] for a in range(2)]", 'report_keeps'),
 ('report overwrites seeds', 'tools/report.py', "rows.setdefault(key, []).append(name)", "rows[key] = [name]", 'report_keeps'),
 ('Pareto front keeps ties', 'xml_ref.py', "q['gflops'] <= r['gflops'] and q['accuracy'] >= r['accuracy'] and", "q['gflops'] <= r['gflops'] and q['accuracy'] > r['accuracy'] and", 'pareto'),
 ('normalize std/mean swapped', 'xml_ref.py', "scale = torch.as_tensor(std,", "scale = torch.as_tensor(mean,", 'normalize'),
 ('flip never', 'xml_ref.py', "flip = torch.randint(0, 2, (n, 1), device=dev, generator=generator).bool()", "flip = torch.zeros((n, 1), device=dev, dtype=torch.bool)", 'augment'),
 ('frozen nets count 0 parameters', 'xml_ref.py', "return sum(p.numel() for p in module.parameters())", "return sum(p.numel() for p in module.parameters() if p.requires_grad)", 'teacher_student'),
 ('checkpoint error over several lines', 'xml_ref.py', ".strip().split('\\n')[0][:n]", "", 'no_checkpoint'),
 ('any pickle taken for a checkpoint', 'xml_ref.py', "    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('config'), dict):", "    if False:", 'no_checkpoint'),
 ('GPU index unchecked', 'xml_ref.py', "    if dev.type == 'cuda' and (dev.index or 0) >= torch.cuda.device_count():", "    if False:", 'gpu_index'),
 ('resume ignores the process count', 'xml_ref.py', "'sync_bn', 'processes', 'schedule')", "'sync_bn', 'schedule')", 'resume_refuses'),
 ('short runs start below lr', 'xml_ref.py', "drops = sum(epoch >= max(2, round(f * epochs))", "drops = sum(epoch >= round(f * epochs)", 'lr_per_step'),
 ('resume across the schedule change', 'xml_ref.py', "        if saved.get('schedule') != cfg.schedule or 'own_bn' not in ckpt:", "        if 'own_bn' not in ckpt:", 'older_schedule'),
 ('resume without own statistics', 'xml_ref.py', "        if saved.get('schedule') != cfg.schedule or 'own_bn' not in ckpt:", "        if saved.get('schedule') != cfg.schedule:", 'no_own_statistics'),
 ('bn_recalib tool: no recalibration', 'tools/bn_recalib.py', "recalibrated = evaluate_recalibrated(", "recalibrated = own if 1 else evaluate_recalibrated(", 'bn_recalib_tool'),
 ('own set fed by the other source', 'xml_ref.py', "self.active.update(zip(bns, self.sets[q]))", "self.active.update(zip(bns, self.sets[(1 - q[0],) + q[1:]]))", 'own_statistics'),
 ('own set of a frozen net updated', 'xml_ref.py', "if bn in active and bn.training and bn.track_running_stats:", "if bn in active:", 'teacher_student'),
 ('own set with another momentum', 'xml_ref.py', "*active[bn], None, None, True, bn.momentum, bn.eps)", "*active[bn], None, None, True, 0.2, bn.eps)", 'own_statistics'),
 ('evaluation ignores the own sets', 'xml_ref.py', "        if q not in self.sets or not self.updated[q]:\n            yield\n            return\n        bns = self.bns[q]\n        shared", "        if True:\n            yield\n            return\n        bns = self.bns[q]\n        shared", 'evaluation_with_own'),
 ('own sets updated for every drawn prefix but marked all', 'xml_ref.py', "        if all(bn.training and bn.track_running_stats for bn in bns):\n", "        self.updated.update(dict.fromkeys(self.updated, True))\n        if 0:\n", 'one_set_per_prefix or pure_paths_equal'),
 ('export with the shared statistics', 'tools/export_path.py', "with own_bn.apply(path[:k]):", "with own_bn.apply(path[:1]):", 'exported'),
 ('rotation the other way', 'xml_ref.py', "theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1)", "theta = torch.stack([cos, sin, zero, -sin, cos, zero], 1)", 'rotation_is'),
 ('rotation about a corner', 'xml_ref.py', "xs = torch.linspace(0.5 - w / 2, w / 2 - 0.5, w, device=dev)", "xs = torch.linspace(0.5, w - 0.5, w, device=dev)", 'rotation_is'),
 ('angles over half the range', 'xml_ref.py', "angles = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * rotate", "angles = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * rotate / 2", 'augment_rotates'),
 ('one angle for the whole batch', 'xml_ref.py', "angles = (torch.rand(n, device=dev, generator=generator) * 2 - 1) * rotate", "angles = (torch.rand(1, device=dev, generator=generator).expand(n) * 2 - 1) * rotate", 'augment_rotates'),
 ('pair-only methods checked by K alone', 'xml_ref.py', "if cfg.method in PAIR_ONLY and (K, P) != (2, 2):", "if cfg.method in PAIR_ONLY and K != 2:", 'refused_outside'),
 ('paths-per-step up to all paths', 'xml_ref.py', "        crossed = K ** P - K\n", "        crossed = K ** P\n", 'refused_outside'),
 ('paths-per-step 0 accepted', 'xml_ref.py', "not 1 <= cfg.paths_per_step <= crossed", "not 0 <= cfg.paths_per_step <= crossed", 'refused_outside'),
 ('default cut depends on the order', 'xml_ref.py', "return 'layer3' if 'mbv1' in names else 'layer2'", "return 'layer3' if names[-1] == 'mbv1' else 'layer2'", 'default_cut_of'),
 ('path weights reach xml only', 'xml_ref.py', "if k in inspect.signature(LOSSES[method]).parameters}", "if k in inspect.signature(LOSSES[method]).parameters and (k != 'path_weights' or method == 'xml')}", 'mean_path_weights_divide_the'),
 ('xml+l2 ignores path weights', 'xml_ref.py', "    losses = xml_losses(out, labels, K, P, learners, T, path_weights)\n    for i in learners:\n        l2 = sum", "    losses = xml_losses(out, labels, K, P, learners, T)\n    for i in learners:\n        l2 = sum", 'mean_path_weights_divide_the'),
 ('sampled paths unseeded', 'xml_ref.py', "paths_rng.seed(cfg.seed * 1_000_003 + epoch)", "paths_rng.seed()", 'same_seed_draws'),
 ('writes in place', 'xml_ref.py', "    tmp = path.with_name(path.name + '.tmp')\n", "    tmp = path\n", 'fails_midway'),
 ('overlapping batches', 'xml_ref.py', "idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]", "idx = perm[s:s + cfg.batch_size]", 'at_most_once'),
 ('ranks draw their own order', 'xml_ref.py', "    perm = torch.randperm(len(train_x), device=run.dev, generator=gen)\n", "    perm = torch.randperm(len(train_x), device=run.dev, generator=gen if run.rank == 0 else None)\n", 'two_ranks_draw'),
 ('BatchNorm statistics summed over ranks', 'xml_ref.py', "            dist.all_reduce(buf)\n            buf /= run.world\n", "            dist.all_reduce(buf)\n", 'two_ranks_draw'),
 ('BatchNorm statistics left per rank', 'xml_ref.py', "        for buf in [b for m in modules", "        for buf in [] and [b for m in modules", 'two_ranks_draw'),
 ('own statistics left per rank', 'xml_ref.py', " + run.own_bn.tensors(learning):", ":", 'two_ranks_draw'),
 ('generator term detached', 'xml_ref.py', "generator_loss(discriminator(out[(i,)]).squeeze(1),", "generator_loss(discriminator(out[(i,)].detach()).squeeze(1),", 'generator_term_trains'),
 ('normalised with the test set', 'xml_ref.py', "*channel_stats(data.train_x), models,", "*channel_stats(data.test_x), models,", 'normalisation_comes'),
 ('evaluation in train mode', 'xml_ref.py', "    with eval_mode(all_modules(parts, stitches)), \\\n            torch.autocast(dev.type, torch.bfloat16, enabled=fast):\n        for x, y in eval_batches(", "    with contextlib.nullcontext(), \\\n            torch.autocast(dev.type, torch.bfloat16, enabled=fast):\n        for x, y in eval_batches(", 'normalisation_comes'),
 ('interpolation on the training set', 'tools/interpolate.py', "data.test_x.to(dev),\n                         data.test_y.to(dev)", "data.train_x.to(dev),\n                         data.train_y.to(dev)", 'interpolation_study_runs'),
 ('paired differences across seeds', 'tools/report.py', "block(runs[1][k])['accuracy'][i]) for k in seeds]", "block(runs[1][seeds[0]])['accuracy'][i]) for k in seeds]", 'paired_difference'),
 ('a part without BatchNorm falls back', 'xml_ref.py', "        if all(bn.training and bn.track_running_stats for bn in bns):", "        if bns and all(bn.training and bn.track_running_stats for bn in bns):", 'without_batchnorm'),
 ('own best epoch = last of ties', 'xml_ref.py', "key=lambda r: (r['own_bn']['accuracy'][i], -r['epoch'])", "key=lambda r: (r['own_bn']['accuracy'][i], r['epoch'])", 'best_epoch'),
 ('stitch trained by the net it reads', 'xml_ref.py', "if int(key.split('>')[1].split('@')[0]) == b + 1]", "if int(key.split('>')[0]) == b + 1]", 'stitch_into or set_up_puts_each_stitch'),
 ('stitch left out of the optimizer', 'xml_ref.py', "p for s in stitches_into(stitches, i) for p in s.parameters())], cfg, fast)", "p for s in stitches_into(stitches, i) if False for p in s.parameters())], cfg, fast)", 'set_up_puts_each_stitch'),
 ('stitches in train mode at evaluation', 'xml_ref.py', "    return [part for net in parts for part in net] + (list(stitches.values()) if stitches else [])", "    return [part for net in parts for part in net]", 'stitched_xml_pair_learns or copyable_block'),
 ('split lets a skip connection cross the cut', 'xml_ref.py', "        if late:", "        if False:", 'refuses_skip'),
 ('cut_names keeps modules called twice', 'xml_ref.py', "calls.get(name) == 1 and shapes", "calls.get(name) and shapes", 'cut_names_lists'),
 ('split ignores the order of the cuts', 'xml_ref.py', "    if any(part[cut_node] != k for k, cut_node in enumerate(at)):", "    if False:", 'refuses_skip'),
 ('stitch cost left out', 'xml_ref.py', "        modules = [m for k in range(1, P + 1) for m in prefix_modules(parts, path[:k], stitches)]", "        modules = [m for k in range(1, P + 1) for m in prefix_modules(parts, path[:k])[-1:]]", 'stitches_join'),
 ('block: L_1 trains the stitch into down_2', 'xml_ref.py', "    opt.zero_grad(set_to_none=True)\n        params = [p for group in opt.param_groups for p in group['params']]\n        loss.backward(inputs=params,", "    opt.zero_grad(set_to_none=True)\n        params = [p for o in optimizers for group in o.param_groups for p in group['params']]\n        loss.backward(inputs=params,", 'copyable_block or stitch_into'),
 ('resume forgets the stitches', 'xml_ref.py', "    run.stitches.load_state_dict(ckpt.get('stitches', {}))", "    pass", 'resume_continues'),
 ('export skips the stitch', 'tools/export_path.py', "            modules = copy.deepcopy(X.prefix_modules(parts, path[:k], stitches))", "            modules = copy.deepcopy(X.prefix_modules(parts, path[:k], stitches)[-1:])", 'exported_path'),
 ('in-place op after the cut allowed', 'xml_ref.py', "        if changed_in_place(cut_node, root):", "        if False:", 'refuses_skip or cut_names_lists or in_place'),
 ('split traced in one mode only', 'xml_ref.py', "    if differ is not None or len(graphs[0].nodes) != len(graphs[1].nodes):", "    if False:", 'refuses_skip'),
 ('Sequential subclass sliced', 'xml_ref.py', "    if type(model).forward is nn.Sequential.forward and", "    if isinstance(model, nn.Sequential) and", 'sliced_only'),
 ('a deeper road to the loss', 'xml_ref.py', "        terms = [dml_loss(z, pure[:i] + pure[i + 1:], labels, T)", "        terms = [(lambda *a: dml_loss(*a))(z, pure[:i] + pure[i + 1:], labels, T)", 'road_from_train'),
 ('NaN taken for a positive value', 'xml_ref.py', "is not None and not getattr(cfg, flag) > 0:  # (NaN too)", "is not None and getattr(cfg, flag) <= 0:", 'cli_bad_input'),
 ('--seed default hidden in --help', 'xml_ref.py', "if f.default is None or f.default is False", "if f.default in (None, False)", 'help_shows'),
 ('--force clears the run before the loads', 'xml_ref.py', "    data = load_data(cfg.dataset, cfg.data_dir)\n", "    prepare_out(Path(cfg.out), cfg.force)\n    data = load_data(cfg.dataset, cfg.data_dir)\n", 'no_checkpoint_is_refused'),
 ('RUNS.md leaves out a summary key', 'docs/RUNS.md', "`teacher` and `student` (kd, fitnet)", "`teacher` and student (kd, fitnet)", 'discriminator_experiments_run'),
 ('a Sequential sliced without the in-place check', 'xml_ref.py', "            if not any(writes_input(part) for part in parts[1:]):", "            if True:", 'in_place or cut_names_lists'),
 ('an in-place function taken for a plain one', 'xml_ref.py', "        in_place = (name.endswith('_') and not name.endswith('__')", "        in_place = (node.op == 'call_method' and name.endswith('_') and not name.endswith('__')", 'in_place'),
 ('writes through a view missed', 'xml_ref.py', "                 u.op in ('call_method', 'call_function') and op_name(u) in VIEWS", "                 False", 'in_place'),
 ('writes through nn.Identity missed', 'xml_ref.py', "                 or u.op == 'call_module'\n                 and isinstance(root.get_submodule(u.target), ALIAS_MODULES))]", "                 )]", 'in_place'),
 ('.to() not taken for a view', 'xml_ref.py', "'getitem', 'to', 'type',", "'getitem', 'type',", 'in_place'),
 ('reading the cut in an in-place op refused', 'xml_ref.py', "    return any(written(u, root) in same for n in same for u in n.users)", "    return any(written(u, root) is not None for n in same for u in n.users)", 'only_reads'),
 ('an argument of a view taken for its input', 'xml_ref.py', "if u.args and u.args[0] is same[-1] and (  # not h.shape", "if (  # not h.shape", 'only_reads'),
 ('a cut kept whole not looked into', 'xml_ref.py', " or bool(module._modules) and writes_input(module)", "", 'right_after_another'),
 ('.cpu() not taken for a view', 'xml_ref.py', "'bfloat16', 'cpu', 'cuda',", "'bfloat16', 'cuda',", 'in_place'),
 ('run_paths fails under inference_mode', 'xml_ref.py', "        return None if h.is_inference() else h._version", "        return h._version", 'run_paths_refuses'),
 ('run_paths misses an in-place write', 'xml_ref.py', "    changed = [q for q in made if version(out[q]) != made[q]]", "    changed = []", 'run_paths_refuses'),
 ('a stitch fed by several prefixes keeps one set', 'xml_ref.py', "            bns = [bn for m in prefix_modules(parts, q, stitches) for bn in batchnorms(m)]", "            bns = batchnorms(parts[q[-1]][len(q) - 1])", 'stitch_fed_by_several'),
 ('NaN taken for a non-negative value', 'xml_ref.py', "        if not getattr(cfg, flag) >= 0:  # (NaN too)", "        if getattr(cfg, flag) < 0:", 'cli_bad_input'),
 ('resume on other images', 'xml_ref.py', "    if was != now:", "    if False:", 'other_images'),
 ('own statistics of another length loaded', 'xml_ref.py', "            if len(state[path_name(q)]['stats']) != 2 * len(stats):", "            if False:", 'would_change_the_run'),
 ('--device mps accepted', 'xml_ref.py', "    if dev.type not in ('cuda', 'cpu'):", "    if False:", 'cli_bad_input'),
 ('report: a seed averaged twice', 'tools/report.py', "        if twice:  # averaged", "        if False:  # averaged", 'refuses_a_seed_twice'),
 ('report: a folder replaced inside a longer name', 'tools/report.py', "                         r'(?![^/\\\\\\s\\'\"`|,;:)\\]}])', lambda _: name, obj)", "                         r'', lambda _: name, obj)", 'placeholders'),
 ('report: a value taken for a folder', 'tools/report.py', "        if not re.search(r'[\\s/\\\\]', obj):", "        if False:", 'placeholders'),
 ('report: a folder replaced at the end of a longer one', 'tools/report.py', "            obj = re.sub(r'(?<![^\\s\\'\"`(=\\[:,])' + re.escape(", "            obj = re.sub(r'' + re.escape(", 'placeholders'),
 ('report: a trailing slash kept', 'tools/report.py', "re.escape(folder.rstrip('/\\\\') or folder)", "re.escape(folder)", 'placeholders'),
 ('tools: older statistics as a traceback', 'tools/interpolate.py', "    except (KeyError, ValueError) as e:", "    except KeyError as e:", 'bn_recalib_tool'),
 ('report: NAME read as a regex template', 'tools/report.py', "r'(?![^/\\\\\\s\\'\"`|,;:)\\]}])', lambda _: name, obj)", "r'(?![^/\\\\\\s\\'\"`|,;:)\\]}])', name, obj)", 'placeholders'),
 ('resume: renamed classes reported as equal counts', 'xml_ref.py', "' (other names)' * (count(was.get(k)) == count(now[k]))", "''", 'other_images'),
 ('reproduce: --quick writes into results/', 'reproduce.sh', '[ "$dataset" = synthetic ] && results=$runs', ':', 'reproduce_sh'),
 ('reproduce: a finished run of another command skipped', 'reproduce.sh', "if was != settings(sys.argv[2:]):", "if False:", 'reproduce_sh'),
 ('export_path: a directory as --out', 'tools/export_path.py', "        if Path(args.out).is_dir():", "        if False:", 'exported_path'),
 ('report: the shallow folder first', 'tools/report.py', "key=lambda item: -len(item[0].rstrip('/\\\\'))", "key=lambda item: len(item[0].rstrip('/\\\\'))", 'placeholders'),
 ('channels_last despite the oneDNN bug', 'xml_ref.py', "    return torch.contiguous_format if hit and device.type == 'cpu' else torch.channels_last", "    return torch.channels_last", 'onednn_strided'),
 ('the bug guard counts all channels of a grouped conv', 'xml_ref.py', "and m.in_channels // m.groups < 8 for model", "and m.in_channels < 8 for model", 'onednn_strided'),
 ('report: crossed path read transposed', 'tools/report.py', "diffs = [block(s)['cross'][j][i] - block(s)['cross'][i][i]", "diffs = [block(s)['cross'][i][j] - block(s)['cross'][i][i]", 'crossed_path_with'),
 ('reproduce: --pair ignored', 'reproduce.sh', 'for pair in ${pairs:-res18,mbv1 res18,res34}; do', 'for pair in res18,mbv1 res18,res34; do', 'reproduce_sh'),
 ('per-class subset one too many', 'xml_ref.py', "nonzero()[:n, 0]] = True", "nonzero()[:n + 1, 0]] = True", 'first_per_class or train_per_class'),
 ('per-class subset not compared by resume', 'xml_ref.py', "'width', 'rotate', 'train_per_class', 'fast'", "'width', 'rotate', 'fast'", 'train_per_class'),
 ('training fit scored on the test set', 'xml_ref.py', "fit = evaluate(run.parts, run.data.train_x.to(run.dev), run.data.train_y.to(run.dev),", "fit = evaluate(run.parts, run.data.test_x.to(run.dev), run.data.test_y.to(run.dev),", 'train_per_class or summary_train_block'),
 ('last epoch left unevaluated', 'xml_ref.py', "if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == total:", "if (epoch + 1) % cfg.eval_every == 0:", 'eval_every'),
 ('flatness: Hessian-vector product without the double backward', 'tools/flatness.py', "grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)", "grads = torch.autograd.grad(loss, params, materialize_grads=True)", 'flatness_power'),
 ('flatness: power iteration stops after one step', 'tools/flatness.py', "        if change is not None and change < tol:", "        if True:", 'flatness_power'),
 ('flatness: shift not added back', 'tools/flatness.py', "'eigenvalue': s['eigenvalue'] + shift,", "'eigenvalue': s['eigenvalue'],", 'flatness_power'),
 ('flatness: directions scaled by the whole layer', 'tools/flatness.py', "scale = p.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-30)", "scale = (p.norm() / d.norm()).expand(len(p))", 'flatness_directions'),
 ('flatness: BatchNorm parameters moved', 'tools/flatness.py', "        if p.dim() <= 1:", "        if p.dim() < 1:", 'flatness_directions'),
 ('flatness: one-sided steps', 'tools/flatness.py', "rises[a].append((up + down) / 2 - base)", "rises[a].append(up - base)", 'flatness_rise'),
 ('flatness: Jacobian norm without the square root', 'tools/flatness.py', "        norms.append(sq.sqrt())", "        norms.append(sq)", 'flatness_jacobian'),
 ('flatness: agreement counts images both nets get right', 'tools/flatness.py', "same[s] += (top[a] == top[b]).sum().item()", "same[s] += ((top[a] == y) & (top[b] == y)).sum().item()", 'flatness_agreement'),
 ('flatness: KL one way only', 'tools/flatness.py', "kl[s] += ((logp[a].exp() - logp[b].exp()) * (logp[a] - logp[b])).sum().item()", "kl[s] += (logp[a].exp() * (logp[a] - logp[b])).sum().item()", 'flatness_agreement'),
 ('tools: load_run ignores --train-per-class', 'tools/interpolate.py', "    if getattr(cfg, 'train_per_class', None):", "    if False:", 'flatness_tool'),
 ('flatness --collect: population std', 'tools/flatness.py', "return f'{m:.4g} ± {statistics.stdev(values):.2g}'", "return f'{m:.4g} ± {statistics.pstdev(values):.2g}'", 'flatness_collect'),
 ('flatness --collect: one run taken for all', 'tools/flatness.py', "ns = [r['per_net'][k] for r in rs]", "ns = [rs[0]['per_net'][k] for r in rs]", 'flatness_collect'),
 ('flatness --collect: other measuring settings pooled', 'tools/flatness.py', "differ = [k for k in MEASURED_WITH if", "differ = [k for k in () if", 'flatness_collect'),
 ('flatness --collect: an unfinished measurement taken', 'tools/flatness.py', "        if s['flatness']['epoch'] != s['epochs']:", "        if False:", 'flatness_collect'),
 ('splitter enters every module', 'xml_ref.py', "traced = torch.fx.GraphModule(model, trace(model, enter=ancestors))", "traced = torch.fx.GraphModule(model, trace(model))", 'ancestors or copyable_block_trains'),
 ('cut_names lists a point twice', 'xml_ref.py', "        if n not in cuts.values() and calls.get(name) == 1", "        if calls.get(name) == 1", 'ancestors or cut_names_lists'),
 ('cut_names gives up on a block fx cannot enter', 'xml_ref.py', "            leaves.add(e.module)", "            raise", 'ancestors or copyable_block_trains'),
 ('stitch probe in training mode', 'xml_ref.py', "    with eval_mode([up1, up2]):\n        s1, s2 = up1(x).shape[1:], up2(x).shape[1:]", "    if True:\n        s1, s2 = up1(x).shape[1:], up2(x).shape[1:]", 'pair_stitches'),
 ('crossed features unchecked', 'xml_ref.py', "        if g.shape[1:] != f.shape[1:]:", "        if False:", 'pair_stitches'),
 ('tv pairs default to the sum', 'xml_ref.py', "path_weights=cfg.path_weights or ('mean' if", "path_weights=cfg.path_weights or ('sum' if", 'torchvision_pair_learns_in_the_warm_up'),
 ('weight decay never applied', 'xml_ref.py', "momentum=cfg.momentum, weight_decay=cfg.weight_decay,", "momentum=cfg.momentum, weight_decay=0.0,", 'option_effect_weight_decay'),
 ('momentum fixed at the recipe\'s', 'xml_ref.py', "lr=cfg.lr, momentum=cfg.momentum,", "lr=cfg.lr, momentum=0.9,", 'option_effect_momentum'),
 ('rotation fixed at 15°', 'xml_ref.py', "images = augment(train_x[idx], generator=gen, rotate=cfg.rotate)", "images = augment(train_x[idx], generator=gen, rotate=15.0)", 'option_effect_rotate'),
 ('xml+gan ignores --adv-weight', 'xml_ref.py', "if k in inspect.signature(LOSSES[method]).parameters}", "if k in inspect.signature(LOSSES[method]).parameters and (k != 'adv_weight' or method == 'xml+disc')}", 'option_effect_adv_weight'),
 ('--l2-weight ignored', 'xml_ref.py', "'l2_weight': cfg.l2_weight,", "'l2_weight': 1.0,", 'option_effect_adv_weight_and_l2'),
 ('--temperature ignored', 'xml_ref.py', "    kw = {'T': cfg.temperature,", "    kw = {'T': 1.0,", 'option_effect_temperature'),
 ('report drops exact zeros', 'tools/report.py', "    values = [v for v in values if v is not None]", "    values = [v for v in values if v]", 'exactly_zero'),
 ('recalibration without rotation', 'tools/bn_recalib.py', "mean, std, cfg.rotate, X.layout(parts[0][0]))", "mean, std, 0, X.layout(parts[0][0]))", 'recalibration_draws'),
 ('stitch statistics left per rank', 'xml_ref.py', "                                                       for s in stitches_into(run.stitches, i)]", "                                                       for s in []]", 'two_ranks_draw'),
 ('own sets fed by a frozen net left per rank', 'xml_ref.py', "if q[-1] in learners", "if set(q) <= set(learners)", 'two_ranks_draw'),
 ('own sets for the last part only', 'xml_ref.py', "with bn_source(q) if bn_source else contextlib.nullcontext():", "with bn_source(q) if bn_source and len(q) == len(path) else contextlib.nullcontext():", 'three_part_path_evaluated'),
 ('a cut given twice taken', 'xml_ref.py', "    if inner:\n        a, b = inner[0]", "    if False:\n        a, b = inner[0]", 'combinations_a_method'),
 ('the block misses an in-place write', 'xml_ref.py', "    if (f1._version, f2._version) != made:", "    if False:", 'pair_stitches'),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('parts', nargs='*', metavar='PART_OF_A_NAME', help='plant only the bugs whose names contain one')
    p.add_argument('--list', action='store_true', help='list the bugs and plant none')
    args = p.parse_args(argv)
    chosen = [m for m in M if not args.parts or any(o in m[0] for o in args.parts)]
    if args.list or not chosen:
        print('\n'.join(f'{m[0]}  ({m[1]}; tests: -k {m[4]!r})' for m in chosen) or 'no bug matches', flush=True)
        return 0 if chosen else 2
    results = []
    for name, f, old, new, k in chosen:
        work = Path(tempfile.mkdtemp()) / 'checkout'
        shutil.copytree(SRC, work, ignore=shutil.ignore_patterns('.venv', '.git', '.ci', '__pycache__', 'results'))
        text = (work / f).read_text()
        n = text.count(old)
        if n != 1:
            results.append((name, f'PATTERN FOUND {n}x'))
            print(name, 'PATTERN', n, flush=True)
            shutil.rmtree(work.parent)
            continue
        (work / f).write_text(text.replace(old, new))
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', 'test_xml_ref.py',
                            '-k', k], cwd=work, capture_output=True, text=True, timeout=1200)
        verdict = 'caught' if r.returncode == 1 else f'NOT CAUGHT (rc {r.returncode})'
        results.append((name, verdict))
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''
        print(f'{verdict:12} {name}  [{last}]', flush=True)
        shutil.rmtree(work.parent)
    print('\n'.join(f'{v}: {n}' for n, v in results))
    return int(any(not v.startswith('caught') for _, v in results))


if __name__ == '__main__':
    sys.exit(main())
