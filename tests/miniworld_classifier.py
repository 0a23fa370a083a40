"""The committed miniature-world Swin classifier and its rendered classification images, for tests."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / 'checkpoints' / 'miniworld' / 'swin_mini_cls.pth'


def classifier_and_images(first: int, last: int, split: str = 'cls_val') -> tuple[torch.nn.Module, torch.Tensor, list]:
    """The classifier as ``tools/test_cls.py`` builds it (eval mode), images ``first..last`` of ``split``
    rendered in-process (no data folder needed) and preprocessed as it expects, and their labels."""
    if not CKPT.is_file():
        pytest.skip(f'{CKPT} not present (train with tools/miniworld/train_all.py)')
    from PIL import Image

    from mmdet_lrpq.cli import build_classifier
    from mmdet_lrpq.lrp import eval_transform
    from mmdet_lrpq.miniworld import render_classification_image

    model, _ = build_classifier(
        argparse.Namespace(model=str(CKPT), checkpoint=str(CKPT), pretrained=False, random_init=None)
    )
    model.eval()
    transform = eval_transform(model)
    images, labels = [], []
    for i in range(first, last + 1):
        jpeg, label, _ = render_classification_image(0, split, i)
        images.append(transform(Image.open(io.BytesIO(jpeg)).convert('RGB')))
        labels.append(label)
    return model, torch.stack(images), labels
