"""Convert an official mmdet-2.x Swin detection checkpoint (Mask R-CNN, Cascade Mask R-CNN) to mmdet 3.x.

    python tools/convert_checkpoint.py mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.pth out.pth

The official checkpoints (github.com/SwinTransformer/Swin-Transformer-Object-Detection) keep the
original Swin backbone code's parameter names; mmdet 3.x's SwinTransformer names and orders them
differently (see mmdet_lrpq/models/swin_names.py). Neck and heads are unchanged. The class names
in the old ``meta['CLASSES']`` become ``meta['dataset_meta']['classes']``.
"""

from __future__ import annotations

import argparse
import os.path as osp
import pickle
import sys
import zipfile
from typing import Any

import torch


def check_paths(src: str, dst: str) -> None:
    """Refuse an output that is the input (by name, link or inode) or a folder: the input must survive."""
    if osp.isdir(dst):
        raise ValueError(f'output {dst} is a directory; give a file name, e.g. {osp.join(dst, osp.basename(src))}')
    same = osp.realpath(src) == osp.realpath(dst) or (osp.exists(dst) and osp.samefile(src, dst))
    if same:
        raise ValueError(
            f'output {dst} is the input file {src}: converting in place would destroy the original; '
            f'write to another file, e.g. {osp.splitext(dst)[0]}_mmdet3.pth'
        )


def torch_file_kind(path: str) -> str | None:
    """'zip' or 'legacy' for the two formats torch.save writes, else None (not a PyTorch checkpoint)."""
    with open(path, 'rb') as f:
        head = f.read(4)
    if head == b'PK\x03\x04' or zipfile.is_zipfile(path):  # the header alone: a truncated archive still is one
        return 'zip'
    return 'legacy' if head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05') else None


def load_checkpoint_file(src: str, trust: bool) -> Any:
    """``torch.load`` of ``src``, or an error saying what the file is not (suggesting ``--trust`` only
    when weights-only loading refused a pickled object, the one case it helps)."""
    kind = torch_file_kind(src)
    if kind is None:
        with open(src, 'rb') as f:
            head = f.read(16)
        raise ValueError(
            f'{src} is not a PyTorch checkpoint: it is neither a torch zip archive nor a pickle '
            f'(it starts with {head!r}); give the .pth file of an mmdet-2.x Swin detector'
        )
    try:
        return torch.load(src, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust or 'Unsupported global' not in str(err):  # a refused class names its GLOBAL; else bad data
            raise ValueError(
                f'{src} could not be unpickled ({str(err).strip().splitlines()[-1][:200]}); it is '
                f'corrupt or not a checkpoint (--trust would not help)'
            ) from None
        refused = next(line for line in str(err).splitlines() if 'Unsupported global' in line)
        raise ValueError(
            f'{src} holds Python objects that weights-only loading refuses '
            f'({refused.strip()[:200]}); if you trust the file, rerun with --trust'
        ) from None
    except Exception as err:
        raise ValueError(
            f'{src} looks like a PyTorch checkpoint ({kind} format) but cannot be read '
            f'({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"}); '
            f'it is truncated or corrupt: download or copy it again'
        ) from None


def convert(src: str, dst: str, trust: bool = False) -> int:
    from mmdet_lrpq.models.swin_names import convert_mmdet2_detector_state_dict
    from mmdet_lrpq.safe_load import allow_mmengine_checkpoints, require_checkpoint, save_atomic

    allow_mmengine_checkpoints()
    require_checkpoint(src)
    check_paths(src, dst)
    ckpt = load_checkpoint_file(src, trust)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{src} holds no state dict (it holds {type(ckpt).__name__})')
    new_state, n = convert_mmdet2_detector_state_dict(state)
    meta = dict(ckpt.get('meta') or {}) if 'state_dict' in ckpt else {}
    if 'CLASSES' in meta:
        meta.setdefault('dataset_meta', {})['classes'] = tuple(meta.pop('CLASSES'))
    meta['converted_from'] = osp.basename(src)
    save_atomic({'meta': meta, 'state_dict': new_state}, dst)  # a killed write leaves no partial file
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official mmdet-2.x Swin detector checkpoint')
    parser.add_argument('dst', help='output checkpoint for mmdet 3.x')
    parser.add_argument(
        '--trust', action='store_true', help='load with weights_only=False (only for files from a trusted source)'
    )
    args = parser.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.trust)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    print(f'converted {n} backbone tensors; wrote {args.dst}')


if __name__ == '__main__':
    main()
