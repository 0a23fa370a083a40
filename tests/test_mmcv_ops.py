"""mmcv's ops from torchvision (mmdet_lrpq.ops) against compiled mmcv, and the import hook.

The reference outputs were recorded once with compiled mmcv 2.1.0 (``tools/mmcv_ops_reference.py``)
and are committed, so these checks run on machines that only have mmcv-lite; where a compiled
``mmcv._ext`` loads, the same cases are also run live against it.

Parity per op (CPU, float32):
- RoIAlign forward/backward, NMS (offset 0 and 1, tied scores), soft-NMS, NMS-match, bbox overlaps:
  bit-identical (same kernels' arithmetic order; NMS visits boxes in mmcv's own sort order).
- Sigmoid focal loss: within 2 ulp-scale tolerance (rtol 1e-6): PyTorch's vectorized exp/log/pow
  may round the last bit differently from the C library's scalar functions.
- Multi-scale deformable attention has no compiled CPU kernel in mmcv: checked against mmcv's own
  PyTorch reference (forward) and by autograd (backward).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdet_lrpq.ops import MMCV_EXT_FUNCTIONS, MissingMMCVOpError, build_module, kernels

FIXTURE = Path(__file__).parent / 'fixtures' / 'mmcv_ops_reference.pt'
METHODS = {0: 'naive', 1: 'linear', 2: 'gaussian'}


@pytest.fixture(scope='module')
def reference() -> dict:
    if not FIXTURE.exists():
        pytest.fail(
            f'{FIXTURE} is missing: regenerate it with `python tools/mmcv_ops_reference.py` in an '
            f'environment with compiled mmcv (make install MMCV=compiled)'
        )
    return torch.load(FIXTURE, weights_only=True)


def backend_outputs(cases: dict) -> dict:
    """The stand-in's outputs for the recorded cases, through the ext-level functions mmcv calls."""
    out: dict = {'roi_align': [], 'softnms': [], 'focal': []}
    for c in cases['roi_align']:
        size = c['output_size']
        y = c['input'].new_zeros(c['rois'].size(0), c['input'].size(1), *size)
        empty = c['input'].new_zeros(0)
        kernels.roi_align_forward(
            c['input'],
            c['rois'],
            y,
            empty,
            empty,
            aligned_height=size[0],
            aligned_width=size[1],
            spatial_scale=c['spatial_scale'],
            sampling_ratio=c['sampling_ratio'],
            pool_mode=1,
            aligned=c['aligned'],
        )
        grad = torch.zeros_like(c['input'])
        if y.numel():
            kernels.roi_align_backward(
                c['grad_output'],
                c['rois'],
                empty,
                empty,
                grad,
                aligned_height=size[0],
                aligned_width=size[1],
                spatial_scale=c['spatial_scale'],
                sampling_ratio=c['sampling_ratio'],
                pool_mode=1,
                aligned=c['aligned'],
            )
        out['roi_align'].append(dict(output=y, grad_input=grad))
    out['nms'] = [
        kernels.nms(c['boxes'], c['scores'], iou_threshold=c['iou_threshold'], offset=c['offset']) for c in cases['nms']
    ]
    for c in cases['softnms']:
        dets = c['boxes'].new_empty(c['boxes'].size(0), 5)
        inds = kernels.softnms(
            c['boxes'],
            c['scores'],
            dets,
            iou_threshold=c['iou_threshold'],
            sigma=c['sigma'],
            min_score=c['min_score'],
            method=c['method'],
            offset=c['offset'],
        )
        out['softnms'].append(dict(dets=dets[: inds.numel()], inds=inds))
    out['nms_match'] = [kernels.nms_match(c['dets'], iou_threshold=c['iou_threshold']) for c in cases['nms_match']]
    out['bbox_overlaps'] = []
    for c in cases['bbox_overlaps']:
        rows, cols = c['bboxes1'].size(0), c['bboxes2'].size(0)
        ious = c['bboxes1'].new_zeros(rows if c['aligned'] else (rows, cols))
        kernels.bbox_overlaps(
            c['bboxes1'],
            c['bboxes2'],
            ious,
            mode=0 if c['mode'] == 'iou' else 1,
            aligned=c['aligned'],
            offset=c['offset'],
        )
        out['bbox_overlaps'].append(ious)
    for c in cases['focal']:
        weight = c['weight'] if c['weight'] is not None else c['input'].new_empty(0)
        loss, grad = torch.zeros_like(c['input']), torch.zeros_like(c['input'])
        kernels.sigmoid_focal_loss_forward(c['input'], c['target'], weight, loss, gamma=c['gamma'], alpha=c['alpha'])
        kernels.sigmoid_focal_loss_backward(c['input'], c['target'], weight, grad, gamma=c['gamma'], alpha=c['alpha'])
        out['focal'].append(dict(loss=loss, grad_input=grad))
    return out


def assert_matches_compiled(ours: dict, compiled: dict) -> None:
    for i, (a, b) in enumerate(zip(ours['roi_align'], compiled['roi_align'], strict=True)):
        assert torch.equal(a['output'], b['output']), f'roi_align case {i}: forward differs'
        assert torch.equal(a['grad_input'], b['grad_input']), f'roi_align case {i}: backward differs'
    for i, (a, b) in enumerate(zip(ours['nms'], compiled['nms'], strict=True)):
        assert a.tolist() == b.tolist(), f'nms case {i}'
    for i, (a, b) in enumerate(zip(ours['softnms'], compiled['softnms'], strict=True)):
        assert a['inds'].tolist() == b['inds'].tolist(), f'softnms case {i}: kept boxes differ'
        assert torch.equal(a['dets'], b['dets']), f'softnms case {i}: decayed scores differ'
    assert ours['nms_match'] == compiled['nms_match']
    for i, (a, b) in enumerate(zip(ours['bbox_overlaps'], compiled['bbox_overlaps'], strict=True)):
        assert torch.equal(a, b), f'bbox_overlaps case {i}'


def test_backend_matches_recorded_compiled_mmcv(reference):
    cases = reference['cases']
    assert len(cases['nms']) >= 20 and any(c['offset'] == 1 for c in cases['nms'])
    ours = backend_outputs(cases)
    assert_matches_compiled(ours, reference['compiled'])
    # the recorded outputs are not trivial
    assert sum(k.numel() for k in reference['compiled']['nms']) > 100
    assert any(a['output'].abs().sum() > 0 for a in reference['compiled']['roi_align'])


def test_backend_matches_live_compiled_mmcv(reference):
    """Where compiled mmcv is installed, run the same cases through it now (not only the record)."""
    import mmcv.ops  # noqa: F401

    import _mmdet_lrpq_mmcv
    from mmdet_lrpq.ops import backend

    if backend()['backend'] != 'compiled':
        pytest.skip(f'no compiled mmcv._ext here ({backend()["reason"]}); the recorded outputs were checked instead')
    spec = importlib.util.spec_from_file_location(
        'mmcv_ops_reference_tool', Path(__file__).resolve().parents[1] / 'tools' / 'mmcv_ops_reference.py'
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cases = tool.make_cases(seed=1)  # other inputs than the record's
    assert_matches_compiled(backend_outputs(cases), tool.run_compiled(cases))
    assert _mmdet_lrpq_mmcv.mode() == 'auto'


def test_sigmoid_focal_loss_matches_mmdet_pytorch_loss_and_autograd(reference):
    """mmcv 2.1.0 has no CPU focal-loss kernel to record: the backend's loss and gradient are checked
    against MMDetection's own PyTorch focal loss (``py_sigmoid_focal_loss``) and its autograd, away
    from saturation; saturated logits follow mmcv's CUDA kernel (log clamped at FLT_MIN: finite)."""
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    ours = backend_outputs({k: (v if k == 'focal' else []) for k, v in reference['cases'].items()})['focal']
    for c, mine in zip(reference['cases']['focal'], ours, strict=True):
        x = c['input'].double().clone().requires_grad_(True)
        num_classes = x.size(1)
        onehot = torch.nn.functional.one_hot(c['target'], num_classes + 1)[:, :num_classes].double()
        loss = py_sigmoid_focal_loss(x, onehot, gamma=c['gamma'], alpha=c['alpha'], reduction='none')
        if c['weight'] is not None:
            loss = loss * c['weight'].double()[c['target']][:, None]
        loss.backward(torch.ones_like(loss))
        calm = c['input'].abs() < 6  # float32's 1 - sigmoid(x) keeps its digits (mmcv's formula)
        torch.testing.assert_close(mine['loss'].double()[calm], loss.detach()[calm], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(mine['grad_input'].double()[calm], x.grad[calm], rtol=2e-5, atol=1e-6)
        assert torch.isfinite(mine['loss']).all() and torch.isfinite(mine['grad_input']).all()
        assert (~calm).any() and mine['loss'].sum() > 0


def test_ties_follow_mmcv_sort_order_not_torchvision():
    """Equal scores: the kept order is mmcv's sort order, whatever torchvision's own kernel would pick."""
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [100.0, 0.0, 110.0, 10.0], [1.0, 1.0, 10.0, 10.0]]
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    order = scores.sort(0, descending=True)[1].tolist()
    keep = kernels.nms(boxes, scores, iou_threshold=0.5, offset=0)
    later_of_the_pair = max(0, 3, key=order.index)  # boxes 0 and 3 overlap (IoU 0.81)
    assert keep.tolist() == [i for i in order if i != later_of_the_pair]


def test_nms_offset_one_uses_the_legacy_box_size():
    # Two 10x10 boxes sharing a 1-pixel column: IoU 0 with offset 0, 11/(2*121-11) = 0.0476 with offset 1.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    scores = torch.tensor([0.9, 0.8])
    assert kernels.nms(boxes, scores, iou_threshold=0.04, offset=0).tolist() == [0, 1]
    assert kernels.nms(boxes, scores, iou_threshold=0.04, offset=1).tolist() == [0]


def test_ms_deform_attn_matches_mmcv_pytorch_reference_and_autograd():
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    bs, heads, dim, queries, points = 2, 2, 4, 5, 3
    value = torch.randn(bs, 60, heads, dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(bs, queries, heads, 2, points, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(bs, queries, heads, 2, points, generator=gen, dtype=torch.float64).softmax(-1)
    out = kernels.ms_deform_attn_forward(value, shapes, starts, loc, attn, im2col_step=64)
    ref = multi_scale_deformable_attn_pytorch(value, shapes, loc, attn)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = [torch.zeros_like(t) for t in (value, loc, attn)]
    kernels.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out, *grads, im2col_step=64)
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    ref_grads = torch.autograd.grad(
        multi_scale_deformable_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2]), inputs, grad_out
    )
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert grads[1].abs().sum() > 0


def test_mmcv_ops_api_runs_on_the_backend_with_autograd():
    """Through mmcv.ops as MMDetection calls it (whichever backend is active): forward and backward."""
    from mmcv.ops import RoIAlign, batched_nms

    feats = torch.randn(1, 4, 20, 20, requires_grad=True)
    rois = torch.tensor([[0, 2.0, 2.0, 30.0, 30.0], [0, 10.0, 4.0, 38.0, 20.0]])
    out = RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=0, aligned=True)(feats, rois)
    out.sum().backward()
    assert out.shape == (2, 4, 7, 7) and feats.grad.abs().sum() > 0
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    dets, keep = batched_nms(
        boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]), dict(type='nms', iou_threshold=0.5)
    )
    assert keep.tolist() == [0, 2]


def test_every_mmcv_ext_name_exists_and_missing_ops_say_what_and_how():
    module = build_module()
    for name in MMCV_EXT_FUNCTIONS:
        assert callable(getattr(module, name)), name
    with pytest.raises(MissingMMCVOpError) as info:
        module.deform_conv_forward(None)
    message = str(info.value)
    assert "'deform_conv_forward'" in message and 'deformable convolution' in message
    assert 'MMCV=compiled' in message
    with pytest.raises(MissingMMCVOpError, match='MMRotate'):
        module.nms_rotated()
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        kernels.roi_align_forward(
            torch.zeros(1, 1, 4, 4),
            torch.zeros(1, 5),
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1, 1, 2, 2),
            aligned_height=2,
            aligned_width=2,
            spatial_scale=1.0,
            sampling_ratio=0,
            pool_mode=0,
            aligned=True,
        )
    # dunder look-ups fail as on any module (pickle, inspect, pkgutil rely on it)
    assert not hasattr(module, '__path__') and not hasattr(module, '__wrapped__')
    with pytest.raises(AttributeError):
        _ = module.not_an_mmcv_function


def test_a_detector_part_needing_a_missing_op_stops_with_the_op_name():
    """Bad input: a model with a deformable convolution, on the torchvision backend."""
    from mmcv.ops import DeformConv2d

    from mmdet_lrpq.ops import backend

    if backend()['backend'] != 'torchvision':
        pytest.skip('compiled mmcv ops are active: deformable convolution is available')
    conv = DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(MissingMMCVOpError, match="'deform_conv_forward'.*deformable convolution"):
        conv(torch.randn(1, 4, 8, 8), torch.zeros(1, 18, 8, 8))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != 'MMDET_LRPQ_MMCV_OPS'}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_forced_backend_serves_mmcv_ops_imported_before_mmdet_lrpq():
    """mmdet (or mmcv.ops) imported first — as MMDetection's own tools do — still gets the ops:
    the .pth hook installs the finder at interpreter start."""
    code = (
        'import mmcv.ops, pkgutil, sys\n'
        'from mmengine.utils.dl_utils import mmcv_full_available\n'
        'import _mmdet_lrpq_mmcv\n'
        'print(_mmdet_lrpq_mmcv.backend()["backend"], mmcv_full_available(), '
        'pkgutil.find_loader("mmcv._ext") is not None, "mmdet_lrpq" in sys.modules)\n'
    )
    result = _run(code, MMDET_LRPQ_MMCV_OPS='torchvision')
    if result.returncode != 0 and 'mmcv._ext' in result.stderr:
        pytest.fail(
            'the mmcv._ext import hook is not installed in this environment '
            '(`python -m _mmdet_lrpq_mmcv --install`, done by make install):\n' + result.stderr[-2000:]
        )
    assert result.returncode == 0, result.stderr[-3000:]
    # ... and without importing the mmdet_lrpq package (which registers with MMDetection)
    assert result.stdout.split() == ['torchvision', 'True', 'True', 'False']


def test_env_report_names_the_active_backend():
    result = _run('import mmdet_lrpq.env as e, sys; sys.exit(e.main())', MMDET_LRPQ_MMCV_OPS='torchvision')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'torchvision backend' in result.stdout and 'MMDET_LRPQ_MMCV_OPS=torchvision' in result.stdout


def test_bad_backend_choice_is_named():
    result = _run('import mmcv.ops', MMDET_LRPQ_MMCV_OPS='fast')
    assert result.returncode != 0
    assert "MMDET_LRPQ_MMCV_OPS='fast' is not one of auto, compiled, torchvision" in result.stderr


def test_backend_kernels_follow_the_input_device(device_audit, reference):
    with device_audit():
        backend_outputs({k: v[:3] for k, v in reference['cases'].items()})


def test_backend_kernels_on_fake_cuda():
    """Shapes, dtypes and devices on CUDA without a GPU (torchvision registers fake kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = torch.empty(2, 4, 16, 16, device='cuda')
        rois = torch.empty(5, 5, device='cuda')
        out = torch.empty(5, 4, 7, 7, device='cuda')
        empty = feats.new_zeros(0)
        kernels.roi_align_forward(
            feats,
            rois,
            out,
            empty,
            empty,
            aligned_height=7,
            aligned_width=7,
            spatial_scale=0.5,
            sampling_ratio=0,
            pool_mode=1,
            aligned=True,
        )
        grad = torch.zeros_like(feats)
        kernels.roi_align_backward(
            out,
            rois,
            empty,
            empty,
            grad,
            aligned_height=7,
            aligned_width=7,
            spatial_scale=0.5,
            sampling_ratio=0,
            pool_mode=1,
            aligned=True,
        )
        assert out.device.type == 'cuda' and grad.device.type == 'cuda'
        logits = torch.empty(8, 5, device='cuda', dtype=torch.float16)
        target = torch.empty(8, device='cuda', dtype=torch.long)
        loss = torch.zeros_like(logits)
        kernels.sigmoid_focal_loss_forward(logits, target, logits.new_empty(0), loss, gamma=2.0, alpha=0.25)
        assert loss.device.type == 'cuda' and loss.dtype == torch.float16
