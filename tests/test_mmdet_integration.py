"""MMDetection integration: Swin adapter exactness, site counts, the hook end to end, configs, tools."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmdet.registry import HOOKS, MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.hub import get_config

import mmdet_lrpq
from mmdet_lrpq.config import QuantConfig
from mmdet_lrpq.models import ModelQuantizer
from mmdet_lrpq.models.mmdet_swin import QuantWindowMSA
from mmdet_lrpq.quant import QuantState, quant_modules, set_quant_state

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn_swin_coco.py'
register_all_modules(init_default_scope=True)
mmdet_lrpq.register_all_modules()


def _build(cfg_path, **model_overrides):
    cfg = Config.fromfile(str(cfg_path))
    cfg.model.update(model_overrides)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.eval()
    return cfg, model


def _swin_t_detector():
    return _build(REPO / 'configs' / 'mask_rcnn_swin_t_w4a4.py')[1]


def _predict(model, x):
    """The whole detector (backbone, neck, RPN, RoI heads) on a batch without annotations."""
    from mmdet.structures import DetDataSample

    h, w = x.shape[-2:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0), batch_input_shape=(h, w), pad_shape=(h, w))
    return model.predict(x, [DetDataSample(metainfo=meta) for _ in range(x.shape[0])])


# ----------------------------------------------------------------------------- adapter
def test_quant_window_msa_is_bit_identical_in_float_state():
    """Both inline matmuls routed through modules: stock mmdet output, bit for bit (with padding)."""
    _, model = _build(TINY_CFG)
    x = torch.randn(1, 3, 200, 264)  # stage sizes 50x66, 25x33, ... -> window padding everywhere
    with torch.no_grad():
        expected = model.backbone(x)
    quantizer = ModelQuantizer(model, QuantConfig(w_bits=4, a_bits=4, scope='backbone'))
    quantizer.wrap()
    assert all(isinstance(b.attn.w_msa, QuantWindowMSA) for s in model.backbone.stages for b in s.blocks)
    with torch.no_grad():
        got = model.backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_swin_t_site_counts_detector_and_backbone_scope():
    model = _swin_t_detector()
    q = ModelQuantizer(model, QuantConfig(w_bits=4, a_bits=4, scope='detector'))
    sites = q.sites()
    assert sum(s.kind != 'matmul' for s in sites) == 72 and sum(s.kind == 'matmul' for s in sites) == 24
    backbone = ModelQuantizer(_swin_t_detector(), QuantConfig(scope='backbone')).sites()
    assert sum(s.kind != 'matmul' for s in backbone) == 52 and len(backbone) == 76
    q.wrap()
    kinds = [type(m).__name__ for m in quant_modules(model).values()]
    assert kinds.count('QuantMatMul') == 24 and len(kinds) == 96
    assert model.backbone.patch_embed.projection.a_bits == 8  # RepQ-ViT: image input at 8 bits
    assert model.backbone.stages[0].blocks[0].attn.w_msa.matmul2.quantizer_a.__class__.__name__ == 'LogSqrt2Quantizer'
    per_channel = {
        n
        for n, m in quant_modules(model).items()
        if getattr(getattr(m, 'input_quantizer', None), 'channel_axis', None) is not None
    }
    assert len(per_channel) == 12 * 2 + 3 + 4  # qkv, fc1 per block, 3 reductions, 4 FPN laterals (CRL)


def test_reparameterized_backbone_equals_float_at_padded_sizes():
    """Float identity of reparameterization through the whole backbone, padding included."""
    _, model = _build(TINY_CFG)
    x = torch.randn(1, 3, 200, 264)
    with torch.no_grad():
        expected = model.extract_feat(x)
    quantizer = ModelQuantizer(model, QuantConfig(w_bits=8, a_bits=8, method='crl', crl_k=math.inf))
    quantizer.calibrate([x], _predict)
    assert len(quantizer.report.reparameterized) == 8 * 2 + 3 + 4  # blocks, reductions, FPN laterals
    set_quant_state(model, QuantState.FLOAT)  # look at the float function of the rewritten weights
    with torch.no_grad():
        got = model.extract_feat(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    shifts = [b.attn.w_msa.input_shift for s in model.backbone.stages for b in s.blocks]
    assert all(s is not None and s.abs().max() > 0 for s in shifts)


def test_reparam_exact_in_quantized_block_with_integer_zero_point(monkeypatch):
    """With the layer-wise zero point rounded, RepQ's per-tensor inputs reproduce the per-channel ones.

    Checked on the first block, whose input carries no upstream noise: qkv, whose input quantizer
    went from per channel to per tensor, gives the same output before and after reparameterization
    to float precision. ``W·r`` changes float rounding at the 1e-7 level, so a q/k/v value sitting
    exactly on a quantization boundary can flip by one step and carry into the ops after it (both
    matmuls, proj, and fc1 through the residual; fc1's input was reparameterized too): there all but
    a handful of values must agree to float precision (measured: 2 of 3136 tokens touched on one
    machine, none on another, depending on its GEMM kernels). A wrong reparameterization changes
    most of them.
    """
    from mmdet_lrpq.quant import calibrating
    from mmdet_lrpq.quant.modules import _WeightedQuantModule

    monkeypatch.setattr(_WeightedQuantModule, 'quantized_weight', lambda self: self.weight)  # isolate acts
    _, model = _build(TINY_CFG)
    x = torch.randn(1, 3, 224, 224)
    q = ModelQuantizer(model, QuantConfig(w_bits=8, a_bits=6, method='repq', round_zero_point=True, scope='backbone'))
    q.wrap()
    blk = model.backbone.stages[0].blocks[0]
    watched = {
        'qkv': blk.attn.w_msa.qkv,
        'matmul1': blk.attn.w_msa.matmul1,
        'matmul2': blk.attn.w_msa.matmul2,
        'proj': blk.attn.w_msa.proj,
        'fc1': blk.ffn.layers[0][0],
    }
    outs = {n: [] for n in watched}
    for n, m in watched.items():
        m.register_forward_hook(lambda mod, i, o, n=n: outs[n].append(o.detach().clone()))
    with calibrating(model), torch.no_grad():
        model.backbone(x)
    q.reparameterize()
    assert blk.attn.w_msa.qkv.input_quantizer.delta.dim() == 0  # per tensor now
    assert float(blk.attn.w_msa.qkv.input_quantizer.zero_point).is_integer()
    with torch.no_grad():
        model.backbone(x)
    for n, (before, after) in outs.items():
        differ = (after - before).abs() > 1e-6 * before.abs().max()
        if n == 'qkv':
            assert not differ.any(), n
        else:
            assert differ.float().mean() <= 0.005, (n, int(differ.sum()), differ.numel())


# ----------------------------------------------------------------------------- the hook on real images
def _coco_metrics(log: str) -> dict:
    """The last ``coco/...: value`` pairs the test loop printed."""
    import re

    line = [ln for ln in log.splitlines() if 'coco/bbox_mAP:' in ln][-1]
    return dict(re.findall(r'(coco/\w+): (-?[\d.]+)', line))


def _run_test_tool(cfg, ckpt, work_dir, *extra, coco_root):
    cmd = [
        sys.executable,
        str(REPO / 'tools' / 'test.py'),
        str(cfg),
        str(ckpt),
        '--work-dir',
        str(work_dir),
        '--data-root',
        str(coco_root),
        *(('--cfg-options', *extra) if extra else ()),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    from mmengine.runner.checkpoint import save_checkpoint

    _, model = _build(TINY_CFG)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    save_checkpoint({'state_dict': model.state_dict(), 'meta': {'note': 'random init'}}, str(path))
    return path


@pytest.mark.slow
def test_swin_t_w4a4_end_to_end_on_coco_mini(coco_mini, tmp_path):
    """Random-init Swin-T Mask R-CNN through tools/test.py + the w4a4 config on real COCO images."""
    from mmengine.runner.checkpoint import save_checkpoint

    model = _swin_t_detector()
    ckpt = tmp_path / 'swin_t_random.pth'
    save_checkpoint({'state_dict': model.state_dict()}, str(ckpt))
    proc = _run_test_tool(
        REPO / 'configs' / 'mask_rcnn_swin_t_w4a4.py',
        ckpt,
        tmp_path / 'work',
        'test_dataloader.dataset.indices=2',
        'model.test_cfg.rcnn.score_thr=0.0',
        'model.test_cfg.rcnn.max_per_img=20',
        coco_root=coco_mini,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((tmp_path / 'work' / 'quantization_report.json').read_text())
    assert report['totals']['conv_linear'] == 72 and report['totals']['matmul'] == 24
    assert report['settings']['scope'] == 'detector' and report['settings']['method'] == 'repq'
    ids = report['calibration_ids']
    assert len(ids) == 1 and f'ids {ids}' in log
    train_ids = {
        im['id'] for im in json.loads((coco_mini / 'annotations' / 'instances_train2017.json').read_text())['images']
    }
    assert ids[0] in train_ids  # calibrated on train2017, not on test images
    assert '72 Conv2d/Linear + 24 attention matmuls quantized' in log
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log


def test_hook_state_file_round_trip_and_report(coco_mini, tiny_ckpt, tmp_path):
    state = tmp_path / 'state.pth'
    args = ('--cfg-options', f'custom_hooks.0.state_file={state}')
    first = _run_test_tool(
        TINY_CFG, tiny_ckpt, tmp_path / 'a', f'custom_hooks.0.state_file={state}', coco_root=coco_mini
    )
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert state.is_file() and 'calibrated state saved' in first.stdout + first.stderr
    second = _run_test_tool(
        TINY_CFG, tiny_ckpt, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=coco_mini
    )
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-3000:]
    assert 'no calibration' in log2 and 'calibrating on' not in log2
    m1 = _coco_metrics(first.stdout + first.stderr)
    assert len(m1) == 12 and m1 == _coco_metrics(log2)  # bbox and segm, 6 numbers each
    r1 = json.loads((tmp_path / 'a' / 'quantization_report.json').read_text())
    r2 = json.loads((tmp_path / 'b' / 'quantization_report.json').read_text())
    assert r1['calibration_ids'] == r2['calibration_ids'] and r1['totals'] == r2['totals']
    assert args  # the option name used above is the documented one


@pytest.mark.slow
def test_distributed_matches_single_process(coco_mini, tiny_ckpt, tmp_path):
    single = _run_test_tool(
        TINY_CFG, tiny_ckpt, tmp_path / 'single', 'test_dataloader.dataset.indices=4', coco_root=coco_mini
    )
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    env = dict(os.environ, PYTHON=sys.executable, PORT='29533')
    dist = subprocess.run(
        [
            'bash',
            str(REPO / 'tools' / 'dist_test.sh'),
            str(TINY_CFG),
            str(tiny_ckpt),
            '2',
            '--work-dir',
            str(tmp_path / 'dist'),
            '--data-root',
            str(coco_mini),
            '--cfg-options',
            'test_dataloader.dataset.indices=4',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=1200,
    )
    log = dist.stdout + dist.stderr
    assert dist.returncode == 0, log[-3000:]

    assert _coco_metrics(log) == _coco_metrics(single.stdout + single.stderr)
    assert log.count('72 Conv2d/Linear') == 0 and log.count('Conv2d/Linear +') >= 1


# ----------------------------------------------------------------------------- evaluation wiring
def test_ground_truth_as_predictions_scores_ap_one(coco_mini):
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from mmdet.structures.mask import BitmapMasks
    from mmdet.structures.mask.structures import PolygonMasks  # noqa: F401  (annotations as loaded)

    ds = CocoDataset(
        data_root=str(coco_mini) + '/',
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        test_mode=True,
        lazy_init=False,
        pipeline=[dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=True)],
    )
    metric = CocoMetric(ann_file=str(coco_mini / 'annotations' / 'instances_val2017.json'), metric=['bbox', 'segm'])
    metric.dataset_meta = ds.metainfo
    samples = []
    for i in range(len(ds)):  # CocoMetric scores every image of the annotation file
        info = ds.get_data_info(i)
        hw = (info['height'], info['width'])
        item = ds.pipeline(dict(info, img_shape=hw, ori_shape=hw))
        keep = ~item['gt_ignore_flags']
        masks = item['gt_masks'].masks[keep] if isinstance(item['gt_masks'], BitmapMasks) else item['gt_masks'][keep]
        samples.append(
            dict(
                img_id=info['img_id'],
                ori_shape=(info['height'], info['width']),
                pred_instances=dict(
                    bboxes=item['gt_bboxes'].tensor[keep],
                    labels=torch.as_tensor(item['gt_bboxes_labels'][keep]),
                    scores=torch.ones(int(keep.sum())),
                    masks=torch.as_tensor(masks).bool(),
                ),
            )
        )
    metric.process({}, samples)
    results = metric.evaluate(len(samples))
    assert results['coco/bbox_mAP'] == pytest.approx(1.0) and results['coco/segm_mAP'] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- configs
CONFIGS = sorted((REPO / 'configs').glob('*_swin_*.py'))


def test_there_are_sixteen_configs():
    names = {p.stem for p in CONFIGS}
    assert names == {
        f'{f}_swin_{s}_{v}'
        for f in ('mask_rcnn', 'cascade_mask_rcnn')
        for s in 'ts'
        for v in ('w4a4', 'mp4', 'w6a6', 'mp6')
    }


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_loads_builds_and_finds_its_plan(path):
    cfg = Config.fromfile(str(path))
    assert cfg.test_dataloader.dataset.data_root == 'data/coco/'
    assert cfg.custom_imports['imports'] == ['mmdet_lrpq']
    hook_cfg = copy.deepcopy(cfg.custom_hooks[0])
    if 'mp' in path.stem:
        # the shipped plans (configs/plans/, made by tools/lrp_plan.py); a missing plan's error is
        # tested in test_bad_settings_are_rejected_with_clear_messages
        assert os.path.isfile(hook_cfg['plan']), hook_cfg['plan']
    hook = HOOKS.build(hook_cfg)
    model = MODELS.build(cfg.model)
    q = ModelQuantizer(model, hook.config)
    sites = q.sites()
    n_blocks = sum(cfg.model.backbone.depths)
    assert sum(s.kind == 'matmul' for s in sites) == 2 * n_blocks
    q.resolve_bits(sites)  # the plan (or uniform bits) covers every site


def test_cascade_config_matches_the_official_model():
    cfg = Config.fromfile(str(REPO / 'configs' / 'cascade_mask_rcnn_swin_t_w4a4.py'))
    heads = cfg.model.roi_head.bbox_head
    assert [h.type for h in heads] == ['ConvFCBBoxHead'] * 3
    assert all(h.num_shared_convs == 4 and h.num_shared_fcs == 1 and h.reg_decoded_bbox for h in heads)
    assert [h.bbox_coder.target_stds for h in heads] == [
        [0.1, 0.1, 0.2, 0.2],
        [0.05, 0.05, 0.1, 0.1],
        [0.033, 0.033, 0.067, 0.067],
    ]
    assert all(h.loss_bbox == dict(type='GIoULoss', loss_weight=10.0) for h in heads)
    model = MODELS.build(cfg.model)
    n = ModelQuantizer(model, QuantConfig()).sites()
    # backbone 52 + FPN 8 + RPN 3 + 3 x (4 convs + 1 fc + cls + reg) + 3 x (4 convs + logits)
    assert sum(s.kind != 'matmul' for s in n) == 52 + 8 + 3 + 3 * 7 + 3 * 5


# ----------------------------------------------------------------------------- other detectors
def test_retinanet_swin_never_tested_still_quantizes():
    """Same hook, another detector: RetinaNet with Swin-T from mmdet's zoo config."""
    cfg = get_config('mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.update(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
    cfg.model.neck.in_channels = [64, 128, 256]
    model = MODELS.build(cfg.model)
    model.eval()
    q = ModelQuantizer(model, QuantConfig(w_bits=6, a_bits=6, method='crl'))
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        ref = model.extract_feat(x)
    q.calibrate([x], _predict)
    # FPN with add_extra_convs='on_input': the last backbone output also feeds an extra conv -> not reparam'd
    assert 'neck.lateral_convs.2.conv' not in q.report.reparameterized
    assert 'neck.lateral_convs.0.conv' in q.report.reparameterized
    with torch.no_grad():
        got = model.extract_feat(x)
    assert all(torch.isfinite(g).all() and g.shape == r.shape for g, r in zip(got, ref))
    assert sum(s.kind == 'matmul' for s in q.report.sites) == 16


def test_unknown_backbone_generic_with_warning_or_error(caplog):
    cfg = get_config('mmdet::retinanet/retinanet_r18_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    with pytest.raises(TypeError, match="scope='backbone' needs a backbone with an adapter"):
        ModelQuantizer(model, QuantConfig(scope='backbone'))
    import logging

    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        q = ModelQuantizer(model, QuantConfig())
    assert 'ResNet has no quantization adapter' in caplog.text
    assert len(q.sites()) > 20 and all(s.layer_type == 'other' for s in q.sites())


def test_quant_swin_transformer_backbone_type_self_calibrates():
    cfg = Config.fromfile(str(TINY_CFG))
    cfg.model.backbone.type = 'QuantSwinTransformer'
    cfg.model.backbone.quant = dict(w_bits=6, a_bits=6, method='repq')
    model = MODELS.build(cfg.model)
    model.eval()
    sd_keys = set(model.state_dict())
    assert 'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight' in sd_keys  # checkpoints load unchanged
    with torch.no_grad():
        model.extract_feat(torch.randn(1, 3, 128, 160))
    mods = quant_modules(model)
    assert len(mods) == 8 * 4 + 1 + 3 + 16 and all(n.startswith('backbone.') for n in mods)
    assert all(m.state is QuantState.QUANTIZED for m in mods.values())
    with pytest.raises(ValueError, match='backbone only'):
        MODELS.build(dict(cfg.model.backbone, quant=dict(scope='detector')))


# ----------------------------------------------------------------------------- bad input
def test_bad_settings_are_rejected_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match='bit-width must be an integer in 2..8'):
        HOOKS.build(dict(type='QuantizationHook', w_bits=1))
    with pytest.raises(ValueError, match='method must be one of'):
        HOOKS.build(dict(type='QuantizationHook', method='gptq'))
    with pytest.raises(ValueError, match='num_images must be a positive integer'):
        HOOKS.build(dict(type='QuantizationHook', calib=dict(num_images=0)))
    with pytest.raises(FileNotFoundError, match=r'bit plan not found: .*python tools/lrp_plan.py'):
        HOOKS.build(dict(type='QuantizationHook', plan=str(tmp_path / 'nope.json')))
    with pytest.raises(
        TypeError, match=r"QuantizationHook: unknown option\(s\) \['w_bit'\]; the options are .*'w_bits'"
    ):
        HOOKS.build(dict(type='QuantizationHook', w_bit=4))


def test_plan_with_unknown_sites_lists_them(tmp_path):
    from mmdet_lrpq.plan import BitPlan

    plan = BitPlan.uniform(4, 4)
    plan.bits = {'backbone.stages.9.blocks.0.attn.w_msa.qkv': (5, 5), 'backbone.nonexistent.fc': (3, 3), **plan.bits}
    path = tmp_path / 'plan.json'
    plan.save(path)
    _, model = _build(TINY_CFG)
    with pytest.raises(ValueError, match=r'stages\.9\.blocks\.0.*nonexistent'):
        ModelQuantizer(model, QuantConfig(plan=str(path))).wrap()


def test_swin_t_plan_is_refused_on_a_swin_s_detector():
    """73 of Swin-S's 148 backbone sites would otherwise fall to the plan's re:.* catch-all silently."""
    _, model = _build(REPO / 'configs' / 'mask_rcnn_swin_s_mp4.py')
    with pytest.raises(ValueError, match=r'another architecture.*depths: plan \[2, 2, 6, 2\] vs model \[2, 2, 18, 2\]'):
        ModelQuantizer(model, QuantConfig(plan=str(REPO / 'configs' / 'plans' / 'swin_t_mp4.json'))).wrap()
    assert not quant_modules(model)
    ModelQuantizer(model, QuantConfig(plan=str(REPO / 'configs' / 'plans' / 'swin_s_mp4.json'))).wrap()


def test_calibration_inputs_missing_or_empty(coco_mini, tmp_path):
    from mmdet_lrpq.engine.calib_data import CalibrationImages, CalibSettings

    cfg = Config.fromfile(str(TINY_CFG))
    ds = cfg.test_dataloader.dataset
    ds.data_root = str(coco_mini) + '/'
    with pytest.raises(FileNotFoundError, match='calibration annotation file not found'):
        CalibrationImages(ds, CalibSettings(ann_file='annotations/missing.json'))
    with pytest.raises(FileNotFoundError, match='calibration image directory not found'):
        CalibrationImages(ds, CalibSettings(img_prefix='nowhere/'))
    empty = tmp_path / 'empty.json'
    coco = json.loads((coco_mini / 'annotations' / 'instances_train2017.json').read_text())
    empty.write_text(json.dumps(dict(coco, images=[], annotations=[])))
    with pytest.raises(ValueError, match='zero images'):
        CalibrationImages(ds, CalibSettings(ann_file=str(empty)))
    with pytest.raises(ValueError, match='only'):
        CalibrationImages(ds, CalibSettings(num_images=10_000))
    images = CalibrationImages(ds, CalibSettings(num_images=3, seed=3, batch_size=2))
    assert images.ids == CalibrationImages(ds, CalibSettings(num_images=3, seed=3)).ids  # seeded, logged by id
    assert [len(b['inputs']) for b in images.batches()] == [2, 1]  # streamed, batch_size at a time
    first = CalibrationImages(ds, CalibSettings(source='test')).ids
    listed = json.loads((coco_mini / 'annotations' / 'instances_val2017.json').read_text())['images']
    assert first == [listed[0]['id']]  # the first test image
    pinned = CalibrationImages(ds, CalibSettings(source='test', image_ids=[397133])).ids
    assert pinned == [397133]  # RepQ-ViT's image (the first of the official val2017 file)
    with pytest.raises(ValueError, match='not in the test annotations'):
        CalibrationImages(ds, CalibSettings(source='test', image_ids=[1]))


def test_corrupt_calibration_image_is_named(coco_mini, tmp_path):
    from mmdet_lrpq.engine.calib_data import CalibrationDataError, CalibrationImages, CalibSettings

    img_dir = tmp_path / 'imgs'
    img_dir.mkdir()
    coco = json.loads((coco_mini / 'annotations' / 'instances_train2017.json').read_text())
    im = coco['images'][0]
    (img_dir / im['file_name']).write_bytes((coco_mini / 'train2017' / im['file_name']).read_bytes()[:200])
    ann = tmp_path / 'one.json'
    ann.write_text(
        json.dumps(dict(coco, images=[im], annotations=[a for a in coco['annotations'] if a['image_id'] == im['id']]))
    )
    cfg = Config.fromfile(str(TINY_CFG))
    with pytest.raises(CalibrationDataError, match=f'{im["file_name"]} could not be loaded'):
        images = CalibrationImages(
            cfg.test_dataloader.dataset, CalibSettings(ann_file=str(ann), img_prefix=str(img_dir))
        )
        next(images.batches())


def test_test_tool_rejects_missing_and_mismatched_checkpoints(tmp_path, coco_mini):
    proc = _run_test_tool(TINY_CFG, tmp_path / 'missing.pth', tmp_path / 'w', coco_root=coco_mini)
    assert proc.returncode != 0 and 'checkpoint not found' in proc.stderr and 'Traceback' not in proc.stderr
    from mmengine.runner.checkpoint import save_checkpoint

    model = _swin_t_detector()
    wrong = tmp_path / 'swin_t.pth'
    save_checkpoint({'state_dict': model.state_dict()}, str(wrong))
    proc = _run_test_tool(TINY_CFG, wrong, tmp_path / 'w', coco_root=coco_mini)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'does not fit the model' in proc.stderr and 'have other shapes' in proc.stderr


# ----------------------------------------------------------------------------- checkpoint converter
def _to_mmdet2_layout(state_dict):
    """Inverse of the converter, to fabricate an official-layout checkpoint from a random model."""
    import re

    out = {}
    for k, v in state_dict.items():
        if not k.startswith('backbone.') or re.match(r'^backbone\.norm\d', k):
            out[k] = v
            continue
        n = k[len('backbone.') :]
        n = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.', r'layers.\1.blocks.\2.attn.', n)
        n = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.', r'layers.\1.blocks.\2.mlp.fc1.', n)
        n = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.', r'layers.\1.blocks.\2.mlp.fc2.', n)
        n = re.sub(r'^stages\.(\d+)\.', r'layers.\1.', n)
        n = n.replace('patch_embed.projection.', 'patch_embed.proj.')
        if 'downsample.reduction' in n:  # invert the unfold reorder
            o, i = v.shape
            v = v.reshape(o, i // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3], :].reshape(o, i)
        elif 'downsample.norm' in n:
            v = v.reshape(-1, 4).transpose(0, 1)[[0, 2, 1, 3]].reshape(-1)
        out['backbone.' + n] = v
    return out


def test_convert_official_mmdet2_checkpoint(tmp_path):
    cfg, model = _build(REPO / 'configs' / 'cascade_mask_rcnn_swin_t_w4a4.py')
    old = _to_mmdet2_layout(model.state_dict())
    assert any(k.startswith('backbone.layers.0.blocks.0.mlp.fc1') for k in old)
    src, dst = tmp_path / 'old.pth', tmp_path / 'new.pth'
    torch.save({'meta': {'CLASSES': ('person', 'bicycle'), 'epoch': 36}, 'state_dict': old}, src)
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    new = torch.load(dst, weights_only=True)
    assert new['meta']['dataset_meta']['classes'] == ('person', 'bicycle')
    ref = {k: v for k, v in model.state_dict().items() if not k.endswith('relative_position_index')}
    assert set(new['state_dict']) == set(ref)  # the index buffers mmdet recomputes are dropped
    assert all(torch.equal(new['state_dict'][k], ref[k]) for k in ref)
    from mmdet_lrpq.engine.checkpoint_check import check_checkpoint_fits

    check_checkpoint_fits(model, str(dst))
    with pytest.raises(ValueError, match='convert_checkpoint'):
        check_checkpoint_fits(model, str(src))
    again = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'convert_checkpoint.py'), str(dst), str(tmp_path / 'x.pth')],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert again.returncode != 0 and 'already converted' in again.stderr


def test_settings_describe_is_json_and_k_semantics():
    s = QuantConfig(method='repq', crl_k=2.0)
    assert s.clip_k == math.inf and QuantConfig(method='crl', crl_k=2.0).clip_k == 2.0
    json.dumps(QuantConfig(crl_k=float('inf')).describe())
    with pytest.raises(TypeError, match=r"calib: unknown option\(s\) \['num_image'\]"):
        HOOKS.build(dict(type='QuantizationHook', calib=dict(num_image=2)))


# ----------------------------------------------------------------------------- hook vs backbone options
def test_hook_options_equal_to_the_defaults_still_count_as_given():
    """Backbone w_bits=6, hook w_bits=4 (the default): ran at 6 bits without a word; now an error naming both."""
    cfg = Config.fromfile(str(TINY_CFG))
    cfg.model.backbone.type = 'QuantSwinTransformer'
    cfg.model.backbone.quant = dict(w_bits=6, a_bits=6)
    model = MODELS.build(cfg.model)
    hook = HOOKS.build(dict(type='QuantizationHook', w_bits=4))
    assert hook.explicit == ['w_bits']
    with pytest.raises(
        ValueError,
        match=r'given both in the QuantSwinTransformer backbone.*w_bits: hook 4, '
        r'backbone 6.*remove \[.w_bits.\] from the hook',
    ):
        hook.config_for(model)
    assert HOOKS.build(dict(type='QuantizationHook', calib=dict(num_images=2))).config_for(model).w_bits == 6
    plain = HOOKS.build(dict(type='QuantizationHook', w_bits=6, method='crl'))
    assert plain.explicit == ['method', 'w_bits'] and plain.config_for(_build(TINY_CFG)[1]).w_bits == 6


def test_a_malformed_plan_is_refused_when_the_hook_is_built(tmp_path):
    plan = tmp_path / 'plan.json'
    plan.write_text('{"format": "mmdet-lrpq/bitplan@1", "bits": {"re:.*": [4, 4]')
    with pytest.raises(ValueError, match=r'plan.json: not valid JSON'):
        HOOKS.build(dict(type='QuantizationHook', plan=str(plan)))
