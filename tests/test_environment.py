"""The installed stack: mmcv's compiled CPU ops, and the import boundaries of DESIGN §4."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
PURE_PACKAGES = ('quant', 'lrp', 'plan')


def test_mmcv_roi_align_matches_torchvision():
    from mmcv.ops import RoIAlign
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 40, 56)
    boxes = torch.rand(30, 4) * torch.tensor([100., 70., 100., 70.])
    boxes[:, 2:] += boxes[:, :2] + 1
    rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), boxes], dim=1)
    ours = RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)(feats, rois)
    ref = torchvision.ops.roi_align(feats, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert ours.shape == (30, 8, 7, 7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.abs().sum() > 0


def test_mmcv_nms_matches_torchvision():
    from mmcv.ops import nms
    torch.manual_seed(1)
    xy = torch.rand(200, 2) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2) * 30], dim=1)
    scores = torch.rand(200)
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert 0 < len(keep) < 200
    assert keep.tolist() == ref.tolist()
    torch.testing.assert_close(dets[:, 4], scores[ref])


@pytest.mark.parametrize('package', PURE_PACKAGES)
def test_pure_packages_do_not_import_mmdet_or_mmcv(package):
    """quant/, lrp/, plan/ stay importable and testable without MMDetection (DESIGN §4)."""
    offenders = []
    for path in sorted((REPO / 'mmdet_lrpq' / package).rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            offenders += [f'{path.name}: {n}' for n in names
                          if n.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')
                          or (isinstance(node, ast.ImportFrom) and node.level and
                              n.split('.')[0] in ('models', 'engine'))]
    assert not offenders, offenders
    code = (f'import sys, mmdet_lrpq.{package}; '
            f'bad = [m for m in ("mmdet", "mmcv", "mmengine") if m in sys.modules]; '
            f'assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
