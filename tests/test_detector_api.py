"""The user's path with MMDetection: ``init_quantized_detector`` + ``inference_detector``, the float
``init_detector`` warning, registration in any import order, test-time augmentation, DETR-style
decoders' ``nn.MultiheadAttention``, and the classifier check of a plan (``tools/test_cls.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / 'checkpoints' / 'miniworld'
QUANT_CFG = REPO / 'configs' / 'miniworld' / 'mask_rcnn_swin_mini_quant.py'
SIZES = dict(train=0, val=12, calib=8, cls_train=0, cls_val=24)


@pytest.fixture(scope='module')
def world(tmp_path_factory) -> Path:
    """A small copy of the miniature world (its first images: the full world renders the same ones)."""
    from mmdet_lrpq.miniworld import generate

    root = tmp_path_factory.mktemp('world')
    generate(root, seed=0, sizes=SIZES)
    return root


def _options(world: Path, **hook) -> dict:
    opts = {
        'test_dataloader.dataset.data_root': f'{world}/',
        'test_evaluator.ann_file': f'{world}/annotations/instances_val.json',
    }
    opts.update({f'custom_hooks.0.{k}': v for k, v in hook.items()})
    return opts


def _image(world: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(world / 'val' / '000001.jpg'))[..., ::-1].copy()  # BGR, as mmcv loads


def test_init_quantized_detector_then_inference_detector_runs_the_quantized_model(world):
    import mmdet.apis
    from mmdet.apis import inference_detector

    from mmdet_lrpq.apis import init_quantized_detector
    from mmdet_lrpq.quant import QuantState, quant_modules

    ckpt = str(CKPT / 'mask_rcnn_swin_mini.pth')
    model = init_quantized_detector(str(QUANT_CFG), ckpt, device='cpu', cfg_options=_options(world))
    modules = quant_modules(model)
    assert len(modules) > 50 and all(m.state is QuantState.QUANTIZED for m in modules.values())
    report = model.quantization_report
    assert report.calibration['num_images'] == 1 and report.config['method'] == 'crl'
    image = _image(world)
    quantized = inference_detector(model, image).pred_instances
    with pytest.warns(UserWarning, match='FLOAT model.*init_quantized_detector'):
        # through the module: a name bound before registration (as the import above could be) is mmdet's own
        float_model = mmdet.apis.init_detector(str(QUANT_CFG), ckpt, device='cpu', cfg_options=_options(world))
    assert not quant_modules(float_model)
    reference = inference_detector(float_model, image).pred_instances
    assert len(quantized) and len(reference)
    assert not torch.equal(quantized.scores, reference.scores)  # really the quantized model
    top = quantized.scores.argmax()
    from mmdet.structures.bbox import bbox_overlaps

    assert float(bbox_overlaps(quantized.bboxes[top : top + 1], reference.bboxes).max()) > 0.7


def test_init_quantized_detector_refuses_a_float_config_and_a_misfit_checkpoint(world, tmp_path):
    from mmdet_lrpq.apis import init_quantized_detector

    with pytest.raises(ValueError, match='adds no QuantizationHook'):
        init_quantized_detector(
            str(REPO / 'configs' / 'miniworld' / 'mask_rcnn_swin_mini.py'),
            str(CKPT / 'mask_rcnn_swin_mini.pth'),
            device='cpu',
        )
    with pytest.raises(ValueError, match='does not fit the model'):
        init_quantized_detector(
            str(QUANT_CFG), str(CKPT / 'cascade_mask_rcnn_swin_mini.pth'), device='cpu', cfg_options=_options(world)
        )
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes((CKPT / 'mask_rcnn_swin_mini.pth').read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf'checkpoint {bad} is unreadable.*truncated or corrupt'):
        init_quantized_detector(str(QUANT_CFG), str(bad), device='cpu', cfg_options=_options(world))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_registration_does_not_depend_on_import_order():
    """``import mmdet_lrpq`` first, then MMEngine: the config's custom_imports finds it already imported."""
    code = f"""
import sys, mmdet_lrpq
assert 'mmengine' not in sys.modules
from mmengine.config import Config
from mmdet.registry import HOOKS, MODELS
from mmdet.utils import register_all_modules
register_all_modules(init_default_scope=True)
cfg = Config.fromfile({str(QUANT_CFG)!r})
hook = HOOKS.build(cfg.custom_hooks[0])
assert type(hook).__name__ == 'QuantizationHook', type(hook)
backbone = MODELS.build(dict(type='mmdet_lrpq.QuantSwinTransformer', embed_dims=32, depths=[2, 2], num_heads=[1, 2],
                              out_indices=(0, 1)))
assert type(backbone).__name__ == 'QuantSwinTransformer'
mmdet_lrpq.register_all_modules()          # the plain names of configs written for earlier versions
assert HOOKS.build(dict(type='QuantizationHook')).__class__ is type(hook)
print('ok')
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def test_importing_the_package_changes_nothing_in_the_process():
    """``import mmdet_lrpq`` alone: no import hook, no builtins, no torch allow-list, no OpenMMLab import."""
    code = """
import builtins, sys
import torch.serialization
finders, names = list(sys.meta_path), dict(vars(builtins))
allowed = list(torch.serialization.get_safe_globals())
import mmdet_lrpq
from mmdet_lrpq import QuantConfig, BitPlan, quantize_
assert sys.meta_path == finders, sys.meta_path
assert dict(vars(builtins)) == names
assert list(torch.serialization.get_safe_globals()) == allowed
assert not [m for m in ('mmengine', 'mmdet', 'mmcv') if m in sys.modules]
print('ok')
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def test_scoped_names_resolve_without_custom_imports():
    """MMEngine imports ``mmdet_lrpq.registry`` on its own when a config names the scope."""
    code = """
from mmengine.registry import init_default_scope
from mmdet.registry import HOOKS, MODELS
init_default_scope('mmdet')
hook = HOOKS.build(dict(type='mmdet_lrpq.QuantizationHook', w_bits=6, a_bits=6))
assert type(hook).__name__ == 'QuantizationHook' and hook.config.w_bits == 6
import sys
assert 'mmdet_lrpq.registry' in sys.modules
print('ok')
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def test_first_init_detector_of_a_process_warns_too():
    """The usual script: mmdet.apis first; the config's custom_imports loads the plugin mid-call."""
    code = f"""
import warnings
from mmdet.apis import init_detector
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    init_detector({str(QUANT_CFG)!r}, None, device='cpu')
assert any('init_quantized_detector' in str(w.message) for w in caught), [str(w.message) for w in caught]
print('ok')
"""
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]


def test_init_detector_on_a_float_config_does_not_warn():
    from mmdet.apis import init_detector

    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        try:
            init_detector(str(REPO / 'configs' / 'miniworld' / 'mask_rcnn_swin_mini.py'), None, device='cpu')
        except UserWarning as w:
            assert 'init_quantized_detector' not in str(w), w


def _test_tool(
    world: Path, work: Path, *extra: str, checkpoint: Path = CKPT / 'mask_rcnn_swin_mini.pth', options: tuple = ()
) -> tuple[int, str]:
    cmd = [
        sys.executable,
        str(REPO / 'tools' / 'test.py'),
        str(QUANT_CFG),
        str(checkpoint),
        '--work-dir',
        str(work),
        '--data-root',
        str(world),
        *extra,
        *(('--cfg-options', *options) if options else ()),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_tta_quantizes_the_detector_inside_the_tta_wrapper(world, tmp_path):
    """The trained tiny Mask R-CNN without its mask branch (mmdet's TTA merges boxes only)."""
    ckpt = torch.load(CKPT / 'mask_rcnn_swin_mini.pth', map_location='cpu', weights_only=True)
    ckpt['state_dict'] = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('roi_head.mask_head.')}
    boxes_only = tmp_path / 'boxes_only.pth'
    torch.save(ckpt, boxes_only)
    rc, log = _test_tool(
        world,
        tmp_path / 'tta',
        '--tta',
        checkpoint=boxes_only,
        options=(
            'model.roi_head.mask_head=None',
            'model.roi_head.mask_roi_extractor=None',
            'test_evaluator.metric=bbox',
        ),
    )
    assert rc == 0, log[-3000:]
    report = json.loads((tmp_path / 'tta' / 'quantization_report.json').read_text())
    assert report['totals']['matmul'] == 16 and report['calibration']['num_images'] == 1
    metrics = json.loads((tmp_path / 'tta' / 'metrics.json').read_text())['metrics']
    assert metrics['coco/bbox_mAP'] > 0.2  # a trained detector, quantized, with flips
    rc, log = _test_tool(world, tmp_path / 'masks', '--tta')
    assert rc != 0 and 'merges boxes only' in log and 'Traceback' not in log, log[-2000:]


# ------------------------------------------------------------------------------ DETR-style decoders
def _detector(config: str, **model):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.hub import get_config

    import mmdet_lrpq

    register_all_modules(init_default_scope=True)
    mmdet_lrpq.register_all_modules()
    cfg = get_config(config) if config.startswith('mmdet::') else Config.fromfile(config)
    cfg.model.backbone.init_cfg = None  # never download ImageNet weights in a test
    cfg.model.update(model)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()  # DETR-style detectors leave e.g. level_embed uninitialised until here
    return model.eval()


def _batch(h=128, w=160):
    from mmdet.structures import DetDataSample

    img = torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0), img_id=0)
    return dict(inputs=[img], data_samples=[DetDataSample(metainfo=meta)])


@pytest.mark.slow
@pytest.mark.parametrize(
    'config, n_mha, model_options',
    [
        ('mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_coco-panoptic.py', 18, {}),
        ('mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', 6, {'num_queries': 100}),  # fewer than the image's tokens
    ],
)
def test_decoder_multihead_attention_is_quantized_and_counted(config, n_mha, model_options):
    from torch import nn

    from mmdet_lrpq import quantize_
    from mmdet_lrpq.models.attention import QuantMultiheadAttention

    model = _detector(config, **model_options)
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mha) == n_mha
    report = quantize_(model, calib=[_batch()], w_bits=8, a_bits=8)
    assert all(isinstance(model.get_submodule(n), QuantMultiheadAttention) for n in mha)
    names = {s.name for s in report.sites}
    for n in mha:
        assert {f'{n}.in_proj', f'{n}.matmul1', f'{n}.matmul2', f'{n}.out_proj'} <= names
    assert not report.float_modules and report.totals['matmul'] >= 2 * n_mha
    assert all(s.macs > 0 for s in report.sites if s.name.startswith(tuple(mha)))  # they really ran
    with torch.no_grad():
        out = model.test_step(_batch())
    assert len(out) == 1


# ------------------------------------------------------------------------------ the classifier check
@pytest.mark.slow
def test_classifier_top1_float_and_quantized_with_its_own_plan(world, tmp_path):
    classifier = str(CKPT / 'swin_mini_cls.pth')
    plan = tmp_path / 'plan.json'
    make = subprocess.run(
        [
            sys.executable,
            'tools/lrp_plan.py',
            '--model',
            classifier,
            '--checkpoint',
            classifier,
            '--images',
            str(world / 'cls_val'),
            '--num-images',
            '4',
            '--target',
            'mp6',
            '--out',
            str(plan),
            '--no-progress',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert make.returncode == 0, make.stderr[-2000:]
    assert json.loads(plan.read_text())['architecture']['depths'] == [2, 2, 2, 2]
    out = tmp_path / 'cls.json'
    proc = subprocess.run(
        [
            sys.executable,
            'tools/test_cls.py',
            '--model',
            classifier,
            '--checkpoint',
            classifier,
            '--images',
            str(world / 'cls_val'),
            '--labels',
            str(world / 'annotations' / 'cls_val.txt'),
            '--num-calib',
            '4',
            '--plan',
            str(plan),
            '--out',
            str(out),
            '--no-progress',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result['num_eval_images'] == 20 and result['num_calib_images'] == 4
    assert result['top1_float'] >= 40  # the committed classifier learns
    assert abs(result['top1_quantized'] - result['top1_float']) <= 15
    assert 5.9 < result['avg_weight_bits'] < 6.3
    assert 'top-1 on 20 images: float' in proc.stdout


# ------------------------------------------------------------------------------ calibration images
def _calib_set(world: Path, tmp_path: Path, images: dict) -> Path:
    """An annotation file listing the given ``{id: (file name, HxWx3 uint8 array)}`` images."""
    from PIL import Image

    folder = tmp_path / 'calib_imgs'
    folder.mkdir(exist_ok=True)
    coco = json.loads((world / 'annotations' / 'instances_calib.json').read_text())
    entries = []
    for image_id, (name, array) in images.items():
        Image.fromarray(array).save(folder / name)
        entries.append(dict(id=image_id, file_name=name, height=array.shape[0], width=array.shape[1]))
    ann = tmp_path / 'calib.json'
    ann.write_text(json.dumps(dict(coco, images=entries, annotations=[])))
    return ann


def _calib_options(world: Path, ann: Path, ids: list) -> dict:
    return _options(world, calib=dict(ann_file=str(ann), img_prefix=str(ann.parent / 'calib_imgs'), image_ids=ids))


def test_an_image_without_detections_does_not_fail_a_set_that_has_some(world, tmp_path):
    """The mask head gets no RoIs on a blank image; another image of the set calibrates it."""
    from PIL import Image

    from mmdet_lrpq.apis import init_quantized_detector

    shapes = np.asarray(Image.open(world / 'calib' / '000001.jpg').convert('RGB'))
    blank = np.full_like(shapes, 127)
    ann = _calib_set(world, tmp_path, {1: ('blank.jpg', blank), 2: ('shapes.jpg', shapes)})
    ckpt = str(CKPT / 'mask_rcnn_swin_mini.pth')
    model = init_quantized_detector(str(QUANT_CFG), ckpt, device='cpu', cfg_options=_calib_options(world, ann, [1, 2]))
    assert model.quantization_report.calibration['image_ids'] == [1, 2]
    assert model.roi_head.mask_head.conv_logits.input_quantizer.calibrated
    with pytest.raises(ValueError, match=r'every calibration image is constant \(\S+blank.jpg\)'):
        init_quantized_detector(str(QUANT_CFG), ckpt, device='cpu', cfg_options=_calib_options(world, ann, [1]))


def test_a_greyscale_calibration_image_is_warned_about(world, tmp_path, caplog):
    import logging

    from mmengine.config import Config
    from PIL import Image

    from mmdet_lrpq.engine import CalibrationImages, CalibSettings

    colour = np.asarray(Image.open(world / 'calib' / '000002.jpg').convert('RGB'))
    grey = np.repeat(np.asarray(Image.fromarray(colour).convert('L'))[..., None], 3, axis=2)
    ann = _calib_set(world, tmp_path, {5: ('colour.jpg', colour), 6: ('grey.jpg', grey)})
    cfg = Config.fromfile(str(QUANT_CFG))
    cfg.test_dataloader.dataset.data_root = f'{world}/'
    images = CalibrationImages(
        cfg.test_dataloader.dataset,
        CalibSettings(ann_file=str(ann), img_prefix=str(ann.parent / 'calib_imgs'), image_ids=[5, 6]),
    )
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        batches = list(images.batches())
    assert len(batches) == 2
    assert 'calibration image 6' in caplog.text and 'greyscale' in caplog.text
    assert 'calibration image 5' not in caplog.text
