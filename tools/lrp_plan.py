"""Make an LRP mixed-precision bit plan for a Swin backbone (LRP-QViT, docs/method.md).

    python tools/lrp_plan.py --model swin_tiny_patch4_window7_224 --checkpoint swin_tiny.pth \\
        --images /data/imagenet/val --num-images 64 --target mp4 --out configs/plans/swin_t_mp4.json \\
        --plot swin_t_mp4.png

Relevance is propagated on the timm *classification* Swin; per-site scores become relative
importances, an allocator turns them into bits under an explicit weight-memory budget, and the
plan is written with mmdet's backbone names (``backbone.stages...``) plus ``re:.*`` at k bits for
the rest of the detector. Scores are cached next to the plan (``<out>.scores.json``): running
again with another ``--target``/``--allocator`` re-allocates without recomputing LRP.

``--model``: a timm model name, a .json/.py file of ``timm SwinTransformer`` keyword arguments
(``model_kwargs = dict(...)`` in a .py), or a checkpoint whose ``meta['model_kwargs']`` records them
(as the miniature world's classifier does). ``--checkpoint``: a local state dict (timm layout, bare
or under ``state_dict``/``model``); ``--pretrained`` lets timm download its weights (network);
``--random-init SEED`` states explicitly that random weights are used (the plan says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import shlex
import sys

from mmdet_lrpq.cli import (
    add_classifier_args,
    add_target_args,
    build_classifier,
    recorded_path,
    resolve_device,
    target_bits,
)

PATH_OPTIONS = ('--images', '--checkpoint', '--model', '--out', '--plot', '--scores-cache')


def recorded_command(argv: list[str]) -> str:
    """The command line as a plan records it: path options through :func:`recorded_path`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition('=')
        if eq and name in PATH_OPTIONS:
            arg = f'{name}={recorded_path(value)}' if name != '--model' or osp.exists(value) else arg
        elif arg in PATH_OPTIONS and i + 1 < len(argv):
            value = argv[i + 1]
            out += [arg, recorded_path(value) if arg != '--model' or osp.exists(value) else value]
            i += 2
            continue
        out.append(arg)
        i += 1
    return 'python tools/lrp_plan.py ' + ' '.join(shlex.quote(a) for a in out)


def parse_args(argv=None):
    from mmdet_lrpq.plan import ALLOCATORS

    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n', 2)[2],
    )
    add_classifier_args(
        p, 'use seeded random weights (recorded in the plan); the default, with a warning, when no weights are given'
    )
    p.add_argument('--images', required=True, help='ImageNet-style class folders or a flat folder of images')
    p.add_argument('--num-images', type=int, default=None, help='first N images in a stable, class-spread order')
    p.add_argument(
        '--explain',
        choices=['predicted', 'label'],
        default='predicted',
        help='relevance of the predicted class, or of the folder label (needs wnids.txt)',
    )
    p.add_argument('--batch-size', type=int, default=8)
    add_target_args(p, 'weight-memory budget in average bits (default: k, i.e. no more than uniform k-bit)')
    p.add_argument('--allocator', default='lrp_qvit', choices=sorted(ALLOCATORS))
    p.add_argument('--out', required=True, help='plan JSON to write')
    p.add_argument('--plot', help='PNG heatmap of importance and bits per block')
    p.add_argument('--scores-cache', help='LRP score cache (default: <out>.scores.json)')
    p.add_argument('--device', default='cpu', help="where LRP runs: 'cpu', 'cuda', 'cuda:1', ... (default: cpu)")
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    args.k = target_bits(p, args.target)
    if args.checkpoint is None and not args.pretrained and args.random_init is None:
        # offline and no weights named: say loudly that the plan comes from random weights (recorded)
        print(
            'WARNING: no --checkpoint/--pretrained given: using seeded random weights (--random-init 0). '
            'The plan is structurally valid but its layer ranking is not meaningful; pass the '
            'classifier weights for a real plan.',
            file=sys.stderr,
        )
        args.random_init = 0
    return args


def lrp_scores(args, model, weights: dict) -> tuple[dict, dict]:
    """Raw LRP scores (from the cache when it was made with the same model, weights and images)."""
    from mmdet_lrpq.lrp import eval_transform, iter_images, list_images, lrp_site_scores

    items = list_images(args.images, args.num_images)
    image_list = [osp.relpath(str(i.path), args.images) for i in items]
    images = {
        'folder': recorded_path(args.images),
        'num_images': len(items),
        'explain': args.explain,
        'list_sha256_16': hashlib.sha256('\n'.join(image_list).encode()).hexdigest()[:16],
    }
    key = {'model': args.model, 'weights': weights, **{k: v for k, v in images.items() if k != 'folder'}}
    cache = args.scores_cache or args.out + '.scores.json'
    if osp.isfile(cache):
        cached = json.load(open(cache))
        if cached.get('key') == key:
            print(f'LRP scores from cache {cache} ({len(items)} images)')
            return cached['scores'], images
    targets = None
    if args.explain == 'label':
        if any(i.label is None for i in items):
            raise ValueError('--explain label needs a class-folder tree with wnids.txt; use --explain predicted')
        targets = [i.label for i in items]
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc='LRP', unit='img')
        progress = lambda done: bar.update(done - bar.n)  # noqa: E731
    scores = lrp_site_scores(
        model, iter_images(items, eval_transform(model)), targets=targets, batch_size=args.batch_size, progress=progress
    )
    if progress is not None:
        bar.close()
    os.makedirs(osp.dirname(osp.abspath(cache)), exist_ok=True)
    with open(cache, 'w') as f:
        json.dump({'key': key, 'images': image_list, 'scores': scores}, f, indent=1)
    return scores, images


def make_plan(args, model, weights, raw, images) -> BitPlan:  # noqa: F821
    from mmdet_lrpq.lrp import relative_importance
    from mmdet_lrpq.models.swin_names import swin_name_to_mmdet
    from mmdet_lrpq.models.timm_swin import TimmSwinAdapter, swin_sites
    from mmdet_lrpq.plan import Budget, allocate, plot_plan

    sites = swin_sites(model)
    importance = relative_importance(raw)
    budget = Budget(weight_bits=args.budget_bits if args.budget_bits is not None else args.k)
    plan = allocate(args.allocator, sites, importance, target_bits=args.k, budget=budget)
    if args.plot:
        plot_plan(plan, sites, args.plot)
    detector_plan = plan.rename(lambda n: 'backbone.' + swin_name_to_mmdet(n, 'timm')).with_default(args.k, args.k)
    # the backbone the plan fits: refused on a Swin of another size (whose extra blocks would fall to re:.*)
    detector_plan.architecture = TimmSwinAdapter(model, '').architecture()
    detector_plan.source = {
        'model': args.model,
        'weights': weights,
        'images': images,
        'note': 'sites are mmdet backbone names (timm -> mmdet mapping of '
        'mmdet_lrpq.models.swin_names); the rest of the detector: re:.* at k bits',
    }
    detector_plan.command = recorded_command(args.argv)
    return detector_plan, plan, sites


def summary(plan, sites, k: int) -> str:
    bits = plan.resolve(sites)
    first = sorted({bits[s.name][0] for s in sites if s.block in (0, 1)})
    dropped = [s.name for s in sites if s.has_weights and bits[s.name][0] < k]
    budget = plan.budget
    acc = budget['accounting']
    return (
        f'{plan.allocator}: blocks 0-1 at {first} bits, {len(dropped)} later sites at {k - 1} bits; '
        f'weight memory {budget["used_bits"]} <= {budget["limit_bits"]} bits '
        f'(uniform {k}-bit); avg W {acc["avg_weight_bits"]:.3f}, avg A {acc["avg_act_bits"]:.3f} bits'
    )


def main(argv: list | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        device = resolve_device(args.device)
        model, weights = build_classifier(args)
        model.to(device)
        raw, images = lrp_scores(args, model, weights)
        plan, timm_plan, sites = make_plan(args, model, weights, raw, images)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    plan.save(args.out)
    print(summary(timm_plan, sites, args.k))
    print(f'wrote {args.out}' + (f' and {args.plot}' if args.plot else ''))


if __name__ == '__main__':
    main()
