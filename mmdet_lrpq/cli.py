"""What the command-line programs in ``tools/`` share: option parsing, the timm classifier that
``tools/lrp_plan.py`` plans on and ``tools/test_cls.py`` checks a plan on, how a plan records the
paths it was made from, and ``--data-root``.

Kept here rather than in one of the scripts so that a script never imports another one. Importing
this module does not load torch (the functions that use it import it): ``tools/reproduce.py`` takes
its option helpers from here and runs the programs that need torch as processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TARGET = re.compile(r'^(?:mp)?([2-8])$')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def recorded_path(path: str) -> str:
    """How a plan records a path it was made from: relative to the repository when inside it, else
    ``<outside-repo>/<last two parts>`` (a plan is shared; a path on the maker's machine is not)."""
    full = osp.abspath(path)
    if full == REPO or full.startswith(REPO + os.sep):
        return osp.relpath(full, REPO)
    return '<outside-repo>/' + '/'.join(full.rstrip(os.sep).split(os.sep)[-2:])


def add_target_args(p: argparse.ArgumentParser, budget_help: str) -> None:
    """--target (the average bit-width k, read by :func:`target_bits`) and --budget-bits (default: k)."""
    p.add_argument('--target', required=True, help='mp4, mp6, ... or an integer k: the average bit-width')
    p.add_argument('--budget-bits', type=float, default=None, help=budget_help)


def target_bits(p: argparse.ArgumentParser, target: str) -> int:
    """k of ``--target`` (``mp4``, ``MP6``, ``4``, ...), or the parser's usage error."""
    m = TARGET.match(target.lower())
    if not m:
        p.error(f'--target must be mpK or K with K in 2..8 (e.g. mp4), got {target!r}')
    return int(m.group(1))


def add_subset_arg(p: argparse.ArgumentParser, flag: str, choices: Sequence, **kwargs: Any) -> None:
    """``flag`` names one or more of ``choices``; all of them when it is not given."""
    p.add_argument(flag, nargs='+', default=list(choices), choices=choices, **kwargs)


def add_threads_arg(
    p: argparse.ArgumentParser, help: str = 'torch threads; 1 is several times faster than 2 when the cores are shared'
) -> None:
    """--threads, torch's thread count for the program (default 1: programs here often share the cores)."""
    p.add_argument('--threads', type=int, default=1, help=help)


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device, refusing a CUDA device that is not available."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f'--device {name!r} is not a device ({err}); use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: no CUDA device is available here; use --device cpu')
    return device


def set_data_root(cfg, root: str) -> None:
    """Point datasets and evaluators at ``root``; the evaluators' ann_file was fixed from the old root."""
    root = root.rstrip('/') + '/'
    if not osp.isdir(root):
        sys.exit(f'error: --data-root {root} is not a directory')
    old = cfg.test_dataloader.dataset.get('data_root', '')
    for split in ('test', 'val'):
        loader, evaluator = cfg.get(f'{split}_dataloader'), cfg.get(f'{split}_evaluator')
        if loader is not None:
            loader.dataset.data_root = root
        for ev in evaluator if isinstance(evaluator, list) else [evaluator]:
            ann = ev.get('ann_file') if ev is not None else None
            if ann and old and ann.startswith(old):
                ev.ann_file = root + ann[len(old) :]


# ------------------------------------------------------------------------------ the timm classifier
def add_classifier_args(p: argparse.ArgumentParser, random_init_help: str) -> None:
    """--model and its weights (--checkpoint | --pretrained | --random-init), as build_classifier reads them."""
    p.add_argument(
        '--model',
        required=True,
        help='timm model name, a .json/.py file of SwinTransformer kwargs, or a checkpoint with meta.model_kwargs',
    )
    w = p.add_mutually_exclusive_group()
    w.add_argument('--checkpoint', help='local weights for the classifier')
    w.add_argument('--pretrained', action='store_true', help="timm's pretrained weights (downloads; needs network)")
    w.add_argument('--random-init', type=int, metavar='SEED', help=random_init_help)


def build_classifier(args):
    """The timm Swin (always_partition=True so its windows match mmdet's) and a description of its weights."""
    import timm
    import torch
    from timm.models.swin_transformer import SwinTransformer

    kwargs = dict(always_partition=True, strict_img_size=False)
    if osp.isfile(args.model):
        if args.model.endswith(('.pth', '.pt')):  # a checkpoint that records its architecture
            meta = torch.load(args.model, map_location='cpu', weights_only=True).get('meta', {})
            if 'model_kwargs' not in meta:
                raise ValueError(f"{args.model} has no meta['model_kwargs']: pass a timm name or a kwargs file")
            model_kwargs = meta['model_kwargs']
        elif args.model.endswith('.json'):
            model_kwargs = json.load(open(args.model))
        else:
            scope: dict = {}
            exec(compile(open(args.model).read(), args.model, 'exec'), scope)
            model_kwargs = scope['model_kwargs']
        model = SwinTransformer(**{**model_kwargs, **kwargs})
    else:
        if args.model not in timm.list_models('swin*'):
            raise ValueError(
                f'--model {args.model!r} is neither a file nor a timm Swin model '
                f'(e.g. swin_tiny_patch4_window7_224, swin_small_patch4_window7_224)'
            )
        if args.random_init is not None:
            torch.manual_seed(args.random_init)
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.random_init is not None:
        torch.manual_seed(args.random_init)
        if osp.isfile(args.model):  # the file path built it above; re-seed so the weights are reproducible
            model = SwinTransformer(**{**model_kwargs, **kwargs})
        weights = {
            'kind': 'random-init',
            'seed': args.random_init,
            'note': 'random weights: no pretrained weights were available; recompute with real ones',
        }
    elif args.pretrained:
        weights = {'kind': 'timm-pretrained', 'name': args.model}
    else:
        from mmdet_lrpq.safe_load import require_checkpoint

        require_checkpoint(args.checkpoint)
        ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
        state = next(
            (ckpt[k] for k in ('state_dict', 'model') if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), ckpt
        )
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith(('relative_position_index', 'attn_mask'))]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f'checkpoint {args.checkpoint} does not fit {args.model}: {len(missing)} missing '
                f'(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), '
                f'{len(shapes)} with other shapes (e.g. {shapes[:2]})'
            )
        model.load_state_dict(state, strict=False)
        with open(args.checkpoint, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        weights = {'kind': 'checkpoint', 'path': recorded_path(args.checkpoint), 'sha256_16': digest}
    return model.eval(), weights


def labelled_items(root: str, labels: str | None, num: int | None = None) -> list:
    """Images with their class index, in the stable order of mmdet_lrpq.lrp.list_images."""
    from mmdet_lrpq.lrp import ImageItem, list_images

    items = list_images(root)
    if labels is not None:
        # paths relative to the image folder, or to its parent (the folder's own name first)
        base = osp.basename(osp.normpath(root)) + os.sep
        table = {}
        for line in open(labels).read().splitlines():
            if line.strip():
                rel, label = line.rsplit(maxsplit=1)
                rel = osp.normpath(rel)
                table[rel[len(base) :] if rel.startswith(base) else rel] = int(label)
        keys = [osp.relpath(i.path, root) for i in items]
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f'--labels {labels} has no label for {len(missing)} image(s) of {root}, e.g. {missing[0]}')
        items = [ImageItem(i.path, table[k]) for i, k in zip(items, keys)]
    unlabelled = [i.path for i in items if i.label is None]
    if unlabelled:
        raise ValueError(
            f'no class label for {len(unlabelled)} image(s) of {root} (e.g. {unlabelled[0]}): give class '
            f'folders with a wnids.txt, or --labels FILE'
        )
    return items[:num] if num is not None else items
