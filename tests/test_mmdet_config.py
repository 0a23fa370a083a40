"""An mmdet:: config plus custom_imports resolves, and the detector builds on CPU."""

import torch
from mmengine.config import Config

CONFIG = """
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_lrpq'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None))
"""


def test_mmdet_base_config_resolves_and_builds(tmp_path):
    path = tmp_path / 'cfg.py'
    path.write_text(CONFIG)
    cfg = Config.fromfile(str(path))
    assert cfg.model.type == 'MaskRCNN'
    assert cfg.model.backbone.type == 'SwinTransformer' and cfg.model.backbone.depths == [2, 2, 6, 2]
    from mmdet.registry import HOOKS, MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    # custom_imports made the plugin's hook buildable from mmdet's registry (whatever was imported first)
    assert type(HOOKS.build(dict(type='QuantizationHook', w_bits=6, a_bits=6))).__name__ == 'QuantizationHook'
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 45e6 < n_params < 50e6, n_params  # Swin-T Mask R-CNN: ~47.8M
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 224, 320))
    assert [tuple(f.shape[-2:]) for f in feats] == [(56, 80), (28, 40), (14, 20), (7, 10), (4, 5)]
    assert all(f.shape[1] == 256 and torch.isfinite(f).all() for f in feats)
