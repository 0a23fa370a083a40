"""One cell as a job: its tools/test.py command, the digest of every input its result depends on
(resolved config, hook options, checkpoint, plan, evaluation annotations), and its earlier record."""

from __future__ import annotations

import argparse
import json
import os.path as osp
import sys
import warnings
from dataclasses import dataclass

from .checkpoints import Checkpoint
from .common import REPO, Digests, UserError, rel, sha256_text, write_atomic
from .grid import Cell, World
from .plans import plan_info


def config_digest(path: str) -> str:
    """Digest of the config as tools/test.py resolves it (its _base_ chain and mmdet:: bases included)."""
    try:
        with warnings.catch_warnings():  # mmengine's pkg_resources deprecation notice, once per config
            warnings.simplefilter('ignore', UserWarning)
            from mmengine.config import Config

            cfg = Config.fromfile(path, import_custom_modules=False)
    except ImportError:
        raise
    except Exception as err:  # a config that does not parse is reported with its name, not a trace
        raise UserError(f'config {rel(path)} cannot be read: {type(err).__name__}: {err}') from None
    return sha256_text(json.dumps(cfg.to_dict(), sort_keys=True, default=str).replace(REPO, '<repo>'))


def evaluation_subset(world: World, n: int, out_dir: str, write: bool = True) -> str:
    """Annotations of the first ``n`` val images: dataset *and* CocoMetric see only those.

    ``test_dataloader.dataset.indices`` alone would leave CocoMetric scoring the unseen images as
    misses (it evaluates every image id of its annotation file), so both read this file instead.
    """
    src = osp.join(world.data_root, world.val_ann)
    path = osp.join(out_dir, 'annotations', f'{osp.splitext(osp.basename(src))[0]}.first{n}.json')
    if not osp.isfile(src) or not write:  # a dry run (perhaps before the miniature world's data exists)
        return path
    data = json.load(open(src))
    images = data['images'][:n]
    ids = {im['id'] for im in images}
    subset = {**data, 'images': images, 'annotations': [a for a in data['annotations'] if a['image_id'] in ids]}
    text = json.dumps(subset)
    if not osp.isfile(path) or open(path).read() != text:
        write_atomic(path, text)
    return path


@dataclass
class Job:
    cell: Cell
    command: list[str]
    key: dict
    record: str  # <out-dir>/cells/<cell>.json
    work_dir: str
    plan: dict | None


def prepare(
    cell: Cell,
    args: argparse.Namespace,
    world: World,
    ckpt: Checkpoint,
    plans: dict,
    val_ann: str,
    digests: Digests,
    configs: dict,
) -> Job:
    """The cell's test.py command and the digest of everything its result depends on."""
    config = world.config(cell)
    if config not in configs:
        configs[config] = config_digest(config)
    work_dir = osp.join(args.out_dir, 'work', cell.name)
    hook = world.hook_options(cell)
    options = list(hook)
    plan = None
    if cell.plan_k:
        path = plans[(cell.backbone, cell.plan_k)]
        plan = plan_info(path, digests) if osp.isfile(path) else None
        options.append(f'custom_hooks.0.plan={path}')
    if args.val_images:
        options += [f'test_dataloader.dataset.ann_file={val_ann}', f'test_evaluator.ann_file={val_ann}']
    command = [
        sys.executable,
        osp.join(REPO, 'tools', 'test.py'),
        config,
        ckpt.path,
        '--work-dir',
        work_dir,
        '--data-root',
        world.data_root,
        *(['--cfg-options', *options] if options else []),
    ]
    key = {
        'config': configs[config],
        'options': hook,
        'checkpoint': ckpt.sha256,
        'plan': plan and plan['sha256'],
        'annotations': digests(val_ann) if osp.isfile(val_ann) else None,
        'val_images': args.val_images,
    }
    return Job(cell, command, key, osp.join(args.out_dir, 'cells', f'{cell.name}.json'), work_dir, plan)


def finished(job: Job) -> tuple[dict | None, str]:
    """The cell's earlier record if its inputs are unchanged, else (None, why it runs)."""
    try:
        record = json.load(open(job.record))
    except FileNotFoundError:
        return None, 'not run yet'
    except (OSError, ValueError):
        return None, 'its record is unreadable'
    changed = [k for k in job.key if record.get('key', {}).get(k) != job.key[k]]
    return (record, '') if not changed else (None, f'changed: {", ".join(changed)}')
