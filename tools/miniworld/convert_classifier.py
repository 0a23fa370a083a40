"""timm classifier checkpoint -> mmdet SwinTransformer backbone checkpoint (the detectors' init).

    python tools/miniworld/convert_classifier.py [checkpoints/miniworld/swin_mini_cls.pth]
        [--out work_dirs/miniworld/swin_mini_backbone_mmdet.pth]

The miniature-world analogue of starting COCO detectors from ImageNet weights: the configs'
``backbone.init_cfg = dict(type='Pretrained', checkpoint=...)`` points at the output. mmdet loads
that file non-strictly, so the conversion is validated here, strictly, against a freshly built
mmdet backbone of the classifier's size.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp

import torch

from mmdet_lrpq.models.swin_names import convert_swin_to_mmdet, load_mmdet_swin_from_timm


def mmdet_swin_kwargs(timm_kwargs: dict) -> dict:
    """mmdet ``SwinTransformer`` arguments describing the same network as timm's ``SwinTransformer`` ones."""
    return dict(
        pretrain_img_size=timm_kwargs['img_size'],
        patch_size=timm_kwargs['patch_size'],
        embed_dims=timm_kwargs['embed_dim'],
        depths=list(timm_kwargs['depths']),
        num_heads=list(timm_kwargs['num_heads']),
        window_size=timm_kwargs['window_size'],
        mlp_ratio=int(timm_kwargs['mlp_ratio']),
        out_indices=(0, 1, 2, 3),
    )


def convert_classifier(src: str, dst: str) -> dict[str, torch.Tensor]:
    """Write ``{'state_dict': {'backbone.<mmdet key>': ...}, 'meta': ...}`` to ``dst``; return the state dict.

    The ``backbone.`` prefix is required: mmdet's Swin ``init_weights`` silently ignores other keys.
    """
    from mmdet.models.backbones import SwinTransformer

    ckpt = torch.load(src, map_location='cpu', weights_only=True)
    timm_state, meta = ckpt['state_dict'], ckpt['meta']
    load_mmdet_swin_from_timm(SwinTransformer(**mmdet_swin_kwargs(meta['model_kwargs'])), timm_state)  # strict check
    converted = {f'backbone.{k}': v for k, v in convert_swin_to_mmdet(timm_state, layout='timm').items()}
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(
        dict(
            state_dict=converted,
            meta=dict(
                source=src,
                classifier_val_accuracy=meta['val_accuracy'],
                mmdet_kwargs=mmdet_swin_kwargs(meta['model_kwargs']),
            ),
        ),
        dst,
    )
    return converted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', nargs='?', default='checkpoints/miniworld/swin_mini_cls.pth')
    parser.add_argument('--out', default='work_dirs/miniworld/swin_mini_backbone_mmdet.pth')
    args = parser.parse_args(argv)
    converted = convert_classifier(args.src, args.out)
    print(
        f'{len(converted)} backbone tensors ({sum(v.numel() for v in converted.values())} values) written to {args.out}'
    )


if __name__ == '__main__':
    main()
