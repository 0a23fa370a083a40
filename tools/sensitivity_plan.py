"""Make a mixed-precision bit plan from the detector's own measured sensitivity (HAWQ / LampQ style).

    python tools/sensitivity_plan.py configs/mask_rcnn_swin_t_mp4.py mask_rcnn_swin_t.pth --target mp4 \\
        --calib num_images=16 seed=0 --out work_dirs/mask_rcnn_swin_t_mp4_sensitivity.json

For every Conv2d/Linear site in scope (the whole detector by default: backbone, neck, RPN, RoI
heads) and every allowed bit-width (k-1, k, k+1), the detector's training loss on the calibration
images estimates what quantizing that site alone costs (Fisher-diagonal proxy,
``mmdet_lrpq.models.fisher``); an integer program then picks one bit-width per site that
minimizes the summed cost under the weight-memory budget (``sensitivity`` allocator, checked
exactly). The plan names every site of the scope; matmuls follow the shared allocator rule.

Calibration images are chosen as ``QuantizationHook`` chooses them: ``--calib`` takes the hook's
``calib`` options (``source``, ``num_images``, ``seed``, ``image_ids``, ``ann_file``, ``img_prefix``,
``data_root``), defaulting to the config's own hook settings; ``--scope``/``--method`` default to
the hook's too. Scores are cached (``<out>.scores.json``, keyed by config, checkpoint, images and
options): another ``--target`` within the cached bit-widths or another ``--budget-bits``
re-allocates without measuring again. ``--bops-bits K`` adds a second budget: BOPs (MACs × weight
bits × activation bits, per image, counted on the calibration images in test mode as the
quantization report counts them) no more than uniform K bits' — the sensitivity plan then cannot
buy accuracy with activation bits that uniform K-bit quantization does not spend.

LampQ's options (Kim et al., arXiv 2511.10004; both off by default, which is the one-pass planner
above): ``--type-aware`` divides each site's costs by its component type's mean cost at k bits
(qkv, proj, fc1, fc2, patch merging, patch embedding, neck, RPN head, RoI box head, mask head), so
the types are compared on one scale; ``--iterations N`` re-measures the sensitivity N times with the
detector quantized by the current plan and re-solves, keeping the plan with the lowest cost on the
last measured table (each iteration is one more forward/backward per calibration image; re-measured
tables are not cached). Both under the same weight (and ``--bops-bits``) budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import shlex
import sys


def parse_args(argv=None):
    from mmengine.config import DictAction

    from mmdet_lrpq.cli import add_target_args, target_bits
    from mmdet_lrpq.plan.lampq import MAX_ITERATIONS

    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n', 2)[2],
    )
    p.add_argument('config', help='detector config (a QuantizationHook in it supplies calib/scope/method defaults)')
    p.add_argument('checkpoint', help='float detector checkpoint')
    add_target_args(p, 'weight-memory budget in average bits over the sites in scope (default: k)')
    p.add_argument(
        '--bops-bits',
        type=int,
        default=None,
        metavar='K',
        help='also limit the BOPs to those of uniform K bits (weights and activations) over the same '
        'sites, their MACs counted on the calibration images; default: weight memory only',
    )
    p.add_argument('--out', required=True, help='plan JSON to write')
    p.add_argument(
        '--calib',
        nargs='+',
        action=DictAction,
        default=None,
        help="calibration images as the hook's calib options, e.g. num_images=16 seed=0; each given "
        "field overrides the config hook's, the others are kept",
    )
    p.add_argument('--scope', choices=['detector', 'backbone'], default=None)
    p.add_argument(
        '--method',
        choices=['repq', 'crl', 'none'],
        default=None,
        help="decides which inputs are calibrated per channel (default: the hook's)",
    )
    p.add_argument(
        '--type-aware',
        action='store_true',
        help="LampQ's type-aware metric: each site's costs divided by its component type's mean cost "
        'at k bits (default: the raw Fisher costs)',
    )
    p.add_argument(
        '--iterations',
        type=int,
        default=0,
        metavar='N',
        help="LampQ's iterative update: re-measure the sensitivity with the detector quantized by the "
        f'current plan and re-solve, N times (0..{MAX_ITERATIONS}; each costs one more pass over the '
        'calibration images; default 0: one ILP pass)',
    )
    p.add_argument('--seed', type=int, default=0, help='seed of the RoI sampling inside the loss')
    p.add_argument('--scores-cache', help='sensitivity cache (default: <out>.scores.json)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    args.k = target_bits(p, args.target)
    if not 0 <= args.iterations <= MAX_ITERATIONS:
        p.error(
            f'--iterations must be in 0..{MAX_ITERATIONS} (each iteration re-measures the sensitivity on the '
            f'calibration images), got {args.iterations}'
        )
    return args


def _sha16(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def build_detector(args):
    """The float detector of ``args.config`` with ``args.checkpoint`` (refused if the keys do not fit)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules as mmdet_register
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    from mmdet_lrpq import register_all_modules
    from mmdet_lrpq.apis import _hook_options
    from mmdet_lrpq.engine import check_checkpoint_fits, require_checkpoint

    mmdet_register(init_default_scope=True)
    register_all_modules()
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    require_checkpoint(args.checkpoint)
    model = MODELS.build(cfg.model)
    check_checkpoint_fits(model, args.checkpoint)
    load_checkpoint(model, args.checkpoint, map_location='cpu', logger='silent')
    return cfg, model, _hook_options(cfg) or {}


def settings(args, hook: dict):
    """The QuantConfig (what is quantized: scope, per-channel inputs, pinned bits) and the calib settings."""
    from mmdet_lrpq.config import QuantConfig
    from mmdet_lrpq.engine.calib_data import CalibSettings

    keep = ('method', 'crl_k', 'scope', 'patch_embed_a_bits', 'reparam_output_norms')
    options = {k: v for k, v in hook.items() if k in keep}
    options.update({k: v for k, v in (('scope', args.scope), ('method', args.method)) if v is not None})
    calib = {**(hook.get('calib') or {}), **(args.calib or {})}  # --calib overrides the hook's fields one by one
    return QuantConfig(**options), CalibSettings.from_options(calib)


def sensitivity_table(args, cfg, model, config, calib, levels: list[int]) -> tuple[dict, list, dict]:
    """(table, sites, key): measured, or from the cache when made from the same inputs with these bits."""
    from mmdet_lrpq.engine.detector_sensitivity import detector_sensitivity
    from mmdet_lrpq.models.quantizer import ModelQuantizer

    key = {
        'config': osp.relpath(args.config),
        'config_sha256_16': _sha16(args.config),
        'cfg_options': args.cfg_options and dict(args.cfg_options),
        'checkpoint': {'path': args.checkpoint, 'sha256_16': _sha16(args.checkpoint)},
        'calib': calib.describe(),
        'seed': args.seed,
        'quant': {
            k: v
            for k, v in config.describe().items()
            if k in ('method', 'crl_k', 'scope', 'patch_embed_a_bits', 'reparam_output_norms')
        },
        'measure': 'fisher-diagonal, detector training loss (model.loss)',
    }
    cache = args.scores_cache or args.out + '.scores.json'
    if osp.isfile(cache):
        cached = json.load(open(cache))
        table = {site: {int(b): v for b, v in costs.items()} for site, costs in cached.get('sensitivity', {}).items()}
        if cached.get('key') == key and all(set(levels) <= set(c) for c in table.values()):
            print(f'sensitivity from cache {cache}')
            return table, ModelQuantizer(model, config).sites(), {**key, 'image_ids': cached['image_ids']}
    import torch

    model.to(torch.device(args.device))
    table, sites, ids = detector_sensitivity(
        model, cfg, config, calib, levels, seed=args.seed, progress=not args.no_progress
    )
    os.makedirs(osp.dirname(osp.abspath(cache)), exist_ok=True)
    with open(cache, 'w') as f:
        json.dump({'key': key, 'image_ids': ids, 'sensitivity': table}, f, indent=1)
    return table, sites, {**key, 'image_ids': ids}


def remeasure(args, cfg, model, config, calib, levels: list[int]):
    """``measure(assignment)`` for LampQ's iterations: the Fisher table with the detector quantized by it."""

    def measure(assignment):
        import torch

        from mmdet_lrpq.engine.detector_sensitivity import detector_sensitivity

        model.to(torch.device(args.device))
        print('sensitivity: re-measuring with the detector quantized by the current plan')
        table, _, _ = detector_sensitivity(
            model, cfg, config, calib, levels, seed=args.seed, progress=not args.no_progress, assignment=assignment
        )
        return table

    return measure


def make_plan(args, cfg, model, config, calib, table, sites, source: dict):
    from mmdet_lrpq.models.quantizer import ModelQuantizer
    from mmdet_lrpq.plan import Budget, allocate, allocate_lampq, uniform_bops

    pins = config.pinned_act_bits(sites)  # as the quantizer will run them, whatever the plan says
    max_bops = None
    if args.bops_bits is not None:
        from mmdet_lrpq.engine.detector_sensitivity import measure_macs

        sites = measure_macs(model, cfg, config, calib)
        max_bops = uniform_bops(sites, args.bops_bits, pins)
    budget = Budget(weight_bits=args.budget_bits if args.budget_bits is not None else args.k, max_bops=max_bops)
    if not (args.type_aware or args.iterations):
        plan = allocate('sensitivity', sites, sensitivity=table, target_bits=args.k, budget=budget, act_bits=pins)
    else:
        plan = allocate_lampq(
            sites,
            table,
            target_bits=args.k,
            budget=budget,
            act_bits=pins,
            type_aware=args.type_aware,
            iterations=args.iterations,
            measure=remeasure(args, cfg, model, config, calib, sorted(next(iter(table.values())))),
        )
    if max_bops is not None:
        plan.budget['bops_reference'] = f'uniform {args.bops_bits} bits over the same sites (MACs per image, test mode)'
    plan = plan.with_default(args.k, args.k)
    backbones = [a.architecture() for a in ModelQuantizer(model, config).adapters if a.is_backbone]
    plan.architecture = next((arch for arch in backbones if arch is not None), None)
    plan.source = {
        **plan.source,
        **source,
        'levels': sorted(next(iter(table.values()))),
        'sensitivity': {site: {str(b): v for b, v in costs.items()} for site, costs in table.items()},
        'note': f'every site of scope={config.scope} by its model path; the budget covers them all',
    }
    plan.command = 'python tools/sensitivity_plan.py ' + ' '.join(shlex.quote(a) for a in args.argv)
    return plan


def summary(plan, k: int) -> str:
    b = plan.budget
    weighted = {n: w for n, (w, _) in plan.bits.items() if n in plan.scores}
    counts = {bits: sum(1 for w in weighted.values() if w == bits) for bits in sorted(set(weighted.values()))}
    acc = b['accounting']
    bops = (
        f'; BOPs {b["used_bops"] / 1e9:.3f} <= {b["limit_bops"] / 1e9:.3f} G per image ({b["bops_reference"]})'
        if 'limit_bops' in b
        else ''
    )
    lampq = plan.source.get('lampq')
    options = ''
    if lampq:
        done = len(lampq['history']) - 1
        options = (
            f'; LampQ: {"type-aware metric, " if lampq["type_aware"] else ""}{done} re-measurement(s), plan of '
            f'iteration {lampq["chosen_iteration"]} (cost on the last table '
            f'{lampq["objective_on_last_table"]["chosen"]:.4g} vs one pass '
            f'{lampq["objective_on_last_table"]["one_pass"]:.4g})'
        )
    return (
        f'sensitivity: {", ".join(f"{n} site(s) at {bits}" for bits, n in counts.items())} bits; weight memory '
        f'{b["used_bits"]} <= {b["limit_bits"]} bits (uniform {k}-bit over the same sites); avg W '
        f'{acc["avg_weight_bits"]:.3f}, avg A {acc["avg_act_bits"]:.3f} bits{bops}{options}'
    )


def main(argv: list | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        cfg, model, hook = build_detector(args)
        config, calib = settings(args, hook)
        levels = sorted({max(2, args.k - 1), args.k, min(8, args.k + 1)})
        table, sites, source = sensitivity_table(args, cfg, model, config, calib, levels)
        plan = make_plan(
            args, cfg, model, config, calib, {s: {b: c[b] for b in levels} for s, c in table.items()}, sites, source
        )
    except (FileNotFoundError, ValueError, TypeError) as err:
        sys.exit(f'error: {err}')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    plan.save(args.out)
    print(summary(plan, args.k))
    print(f'wrote {args.out}')
    return plan


if __name__ == '__main__':
    main()
