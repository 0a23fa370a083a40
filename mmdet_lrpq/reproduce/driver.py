"""One reproduction run, from parsed options to results: every input checked first, then downloads,
plans and the cells that are not finished, and the tables."""

from __future__ import annotations

import argparse
import os.path as osp
import sys
import time

from mmdet_lrpq.miniworld import experiments as mini

from .cells import evaluation_subset, finished, prepare
from .checkpoints import resolve_checkpoints
from .common import Digests, rel, show
from .grid import CocoWorld, MiniWorld, World, grid
from .plans import make_plans, plan_commands, plan_path, warn_placeholders
from .processes import run_cells
from .tables import write_results


def reproduce(args: argparse.Namespace) -> int:
    start = time.time()

    def log(msg: str) -> None:
        print(f'[{time.time() - start:6.0f}s] {msg}', flush=True)

    world: World = MiniWorld() if args.miniworld else CocoWorld(args.coco_root)
    cells = grid(args, world)
    digests = Digests(osp.join(args.out_dir, 'digests.json'), remember=not args.dry_run)  # a dry run writes nothing
    # every input is checked before anything slow happens (a download, the data generation, a plan)
    world.check_data(cells)
    makers = plan_commands(args, world, cells)
    checkpoints, prep_commands = resolve_checkpoints(
        args, world, list(dict.fromkeys(c.model for c in cells)), digests, log
    )
    if args.dry_run:
        if args.miniworld and not osp.isdir(mini.DATA):
            print(f'# {rel(mini.DATA)} is missing: a run generates it first (tools/miniworld/generate.py)')
        for cmd in prep_commands:
            print(f'download {cmd[1]} -> {cmd[2]}' if cmd[0] == 'download' else show(cmd))
        for cmd in makers.values():
            print(show(cmd))
    else:
        if args.miniworld:
            mini.ensure_data(log)
        make_plans(makers, log)
    plans = {(c.backbone, c.plan_k): plan_path(args, c.backbone, c.plan_k) for c in cells if c.plan_k}
    warn_placeholders(plans, digests, log)
    val_ann = osp.join(world.data_root, world.val_ann)
    if args.val_images:
        val_ann = evaluation_subset(world, args.val_images, args.out_dir, write=not args.dry_run)
    configs: dict[str, str] = {}
    jobs = [
        prepare(c, args, world, checkpoints[c.model], plans, val_ann, digests, configs)
        for c in cells
        if c.model in checkpoints
    ]
    todo, rows = [], {}
    for job in jobs:
        record, why = (None, 'forced') if args.force else finished(job)
        if record is not None:
            rows[job.cell] = dict(record, reused=True)
            log(f'reuse {job.cell.name}: box {record["box_ap"]:.1f} mask {record["mask_ap"]:.1f} (inputs unchanged)')
        else:
            todo.append((job, why))
    if args.dry_run:
        for job, why in todo:
            print(f'# {job.cell.name}: {why}\n{show(job.command)}')
        pending = [c.name for c in cells if c.model not in checkpoints]
        if pending:
            print(f'# after the downloads: {", ".join(pending)}')
        print(
            f'dry run: {len(todo) + len(pending)} cells would run, {len(rows)} are finished; {args.jobs} at a time'
            + (f', one GPU each from {",".join(args.gpus)}' if args.gpus else '')
        )
        return 0
    run_cells(todo, args.jobs, rows, log, args.gpus)
    ordered = [rows[j.cell] for j in jobs]
    table = write_results(args, world, ordered, time.time() - start)
    failed = [r['cell'] for r in ordered if r.get('failed')]
    ran = sum(not r['reused'] for r in ordered) - len(failed)
    print(
        f'\n{table}\n\ncells: {ran} ran, {sum(r["reused"] for r in ordered)} reused, {len(failed)} failed; '
        f'results.md, results.json and results.png in {rel(args.out_dir)}/ ({time.time() - start:.0f}s)'
    )
    if failed:
        print(f'failed cells (rerun to retry them): {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0
