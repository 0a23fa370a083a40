"""The LRP plans of the MP cells: the tools/lrp_plan.py command of each, running them, and what a cell
records about its plan (random-weight placeholders included, and said loudly)."""

from __future__ import annotations

import argparse
import json
import os.path as osp
import sys

from .common import REPO, Digests, UserError, parse_pairs, rel, show
from .grid import COCO_BACKBONES, Cell, CocoWorld, World
from .processes import run_tool


def plan_path(args: argparse.Namespace, backbone: str, k: int) -> str:
    return osp.join(args.plans_dir, f'{backbone}_mp{k}.json')


def plan_commands(args: argparse.Namespace, world: World, cells: list[Cell]) -> dict[tuple[str, int], list[str]]:
    """tools/lrp_plan.py for every plan the MP cells need (checked for classifier weights and images first).

    Always run (not skipped when the plan exists): lrp_plan.py's own score cache, keyed by model,
    weights and image list, makes an unchanged plan cheap and a changed input a new plan.
    """
    needed = sorted({(c.backbone, c.plan_k) for c in cells if c.plan_k})
    if args.reuse_plans:
        missing = [plan_path(args, b, k) for b, k in needed if not osp.isfile(plan_path(args, b, k))]
        if missing:
            raise UserError(
                f'--reuse-plans: {", ".join(missing)} not found; make them (drop --reuse-plans and give '
                f'the classifier) or point --plans-dir at the folder that holds <backbone>_mp<k>.json'
            )
        return {}
    classifiers = parse_pairs(args.classifier, '--classifier', COCO_BACKBONES)
    if isinstance(world, CocoWorld) and needed:
        lacking = sorted({b for b, _ in needed if not args.pretrained and b not in classifiers})
        if lacking:
            names = ', '.join(
                f'--classifier {b}=PATH ({world.paper["classifiers"][b]["timm"]} weights)' for b in lacking
            )
            raise UserError(
                f'MP4/MP6 need LRP plans made from the ImageNet classifier, and no weights were given for '
                f'{", ".join(lacking)}: pass {names}, or --pretrained (timm downloads them), with '
                f'--imagenet DIR. Without them: leave MP4/MP6 out of --settings, or run the random-weight '
                f'placeholder plans, marked as such, with --plans-dir configs/plans --reuse-plans'
            )
        if not args.imagenet or not osp.isdir(args.imagenet):
            raise UserError(
                f'--imagenet {args.imagenet or "(not given)"}: the LRP plans need a folder of ImageNet '
                f'images (e.g. the val split, class folders or flat); pass --imagenet DIR'
            )
    commands = {}
    for backbone, k in needed:
        out = plan_path(args, backbone, k)
        commands[(backbone, k)] = [
            sys.executable,
            osp.join(REPO, 'tools', 'lrp_plan.py'),
            *world.plan_inputs(backbone, classifiers, args),
            '--num-images',
            str(args.lrp_images),
            '--target',
            f'mp{k}',
            '--out',
            out,
            '--plot',
            osp.splitext(out)[0] + '.png',
            '--scores-cache',
            osp.join(args.plans_dir, f'{backbone}.scores.json'),
            '--no-progress',
        ]
    return commands


def plan_info(path: str, digests: Digests) -> dict:
    """What a cell records about its plan; ``placeholder``: made from random weights, not a reproduction."""
    plan = json.load(open(path))
    weights = (plan.get('source') or {}).get('weights') or {}
    return {
        'file': rel(path),
        'sha256': digests(path),
        'weights': weights.get('kind', 'unknown'),
        'placeholder': weights.get('kind') == 'random-init',
        'command': plan.get('command'),
        'budget': {k: (plan.get('budget') or {}).get(k) for k in ('used_bits', 'limit_bits', 'holds')},
    }


def make_plans(makers: dict[tuple[str, int], list[str]], log) -> None:
    """Run tools/lrp_plan.py for each plan; a failure stops the run (its MP cells could not mean anything)."""
    for (backbone, k), cmd in makers.items():
        log(f'plan {backbone} MP{k}: {show(cmd)}')
        proc = run_tool(cmd)
        if proc.returncode != 0:
            raise UserError(
                f'tools/lrp_plan.py failed for {backbone} MP{k}: {(proc.stderr or proc.stdout).strip()[-1500:]}'
            )
        log(f'  {proc.stdout.strip().splitlines()[-2] if proc.stdout.strip() else "done"}')


def warn_placeholders(plans: dict[tuple[str, int], str], digests: Digests, log) -> None:
    """Random-weight plans may run, but never silently: they are no reproduction of the paper."""
    placeholders = [p for p in dict.fromkeys(plans.values()) if osp.isfile(p) and plan_info(p, digests)['placeholder']]
    if placeholders:
        bar = '!' * 100
        log(
            f'{bar}\nWARNING: {", ".join(rel(p) for p in placeholders)} come from RANDOM classifier weights '
            f'(placeholders).\nTheir MP cells run, but are marked † and are NOT a reproduction of the paper; make '
            f'real plans with --classifier/--pretrained and --imagenet.\n{bar}'
        )
