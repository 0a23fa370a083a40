"""Convert an official mmdet-2.x Swin detection checkpoint (Mask R-CNN, Cascade Mask R-CNN) to mmdet 3.x.

    python tools/convert_checkpoint.py mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco.pth out.pth

The official checkpoints (github.com/SwinTransformer/Swin-Transformer-Object-Detection) keep the
original Swin backbone code's parameter names; mmdet 3.x's SwinTransformer names and orders them
differently (see mmdet_lrpq/models/swin_names.py). Neck and heads are unchanged. The class names
in the old ``meta['CLASSES']`` become ``meta['dataset_meta']['classes']``.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def convert(src: str, dst: str, trust: bool = False) -> int:
    from mmdet_lrpq.safe_load import allow_mmengine_checkpoints, require_checkpoint
    from mmdet_lrpq.models.swin_names import convert_mmdet2_detector_state_dict
    allow_mmengine_checkpoints()
    require_checkpoint(src)
    try:
        ckpt = torch.load(src, map_location='cpu', weights_only=not trust)
    except Exception as err:
        raise ValueError(f'{src} could not be loaded with weights_only=True ({err.__class__.__name__}); if you '
                         f'trust the file, rerun with --trust') from err
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f'{src} holds no state dict')
    new_state, n = convert_mmdet2_detector_state_dict(state)
    meta = dict(ckpt.get('meta') or {}) if 'state_dict' in ckpt else {}
    if 'CLASSES' in meta:
        meta.setdefault('dataset_meta', {})['classes'] = tuple(meta.pop('CLASSES'))
    meta['converted_from'] = osp.basename(src)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save({'meta': meta, 'state_dict': new_state}, dst)
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official mmdet-2.x Swin detector checkpoint')
    parser.add_argument('dst', help='output checkpoint for mmdet 3.x')
    parser.add_argument('--trust', action='store_true',
                        help='load with weights_only=False (only for files from a trusted source)')
    args = parser.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.trust)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    print(f'converted {n} backbone tensors; wrote {args.dst}')


if __name__ == '__main__':
    main()
