"""A quantized mmdet detector's backbone + neck as ONNX, and the detector evaluated with it.

Scope: the exported graph computes the backbone and the neck (for Mask R-CNN / Cascade: Swin + FPN,
every quantizer of both). The RPN, the RoI heads, RoIAlign and NMS stay in PyTorch (quantized as
configured): mmdet 3.3's own ONNX path (MMDeploy) does not support our torch, and its RoI ops and NMS
would need custom operators. :func:`onnx_features` swaps the detector's ``extract_feat`` for an ONNX
Runtime session, so ``test_step`` / mmdet's evaluator run the whole detector with ONNX Runtime
computing the features: :func:`evaluate_ap` scores both side by side on the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import os.path as osp
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .forms import ExportError
from .runtime import run

# the Swin + FPN products by the part of the model they belong to, matched on ONNX node names
KINDS = (
    ('patch_embed', r'patch_embed'),
    ('qkv', r'[/.]qkv[/.]'),
    ('q@k^T', r'matmul1'),
    ('attn@v', r'matmul2'),
    ('proj', r'[/.]proj[/.]'),
    ('fc1', r'layers\.0\.0'),
    ('fc2', r'ffn[/.]layers[/.](layers\.)?1[/.]'),
    ('reduction', r'reduction'),
    ('fpn lateral', r'lateral_convs'),
    ('fpn output', r'fpn_convs'),
)


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name)), 'other')


def by_kind(names: list[str]) -> dict:
    """How many of ``names`` (nodes of :func:`~mmdet_lrpq.export.census`) fall in each of ``KINDS``."""
    out: dict[str, int] = {}
    for n in names:
        out[kind_of(n)] = out.get(kind_of(n), 0) + 1
    return out


class BackboneNeck(nn.Module):
    """``detector.extract_feat`` as a module (shares the detector's submodules): image tensor -> features."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not hasattr(detector, 'backbone'):
            raise ExportError(f'{type(detector).__name__} has no backbone: export the module itself with export_onnx')
        self.backbone = detector.backbone
        self.neck = getattr(detector, 'neck', None) if getattr(detector, 'with_neck', True) else None
        self.training = detector.training  # a new module starts in train mode: mirror the detector

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats = self.backbone(x)
        if self.neck is not None:
            feats = self.neck(feats)
        return tuple(feats)


def batch_from_image(cfg, image: str, img_id: int = 0) -> dict:
    """A one-image data batch through the config's test pipeline (annotations not loaded)."""
    from mmengine.dataset import Compose, pseudo_collate

    pipeline = [t for t in cfg.test_dataloader.dataset.pipeline if t['type'] != 'LoadAnnotations']
    return pseudo_collate([Compose(pipeline)(dict(img_path=image, img_id=img_id))])


def preprocessed_input(detector: nn.Module, batch: dict) -> Tensor:
    """The tensor ``extract_feat`` sees for ``batch`` (normalized, padded), on the CPU in float32."""
    with torch.no_grad():
        data = detector.data_preprocessor(copy.copy(batch), False)
    return data['inputs'].float().cpu().contiguous()


@contextlib.contextmanager
def onnx_features(detector: nn.Module, sess, output_count: int | None = None) -> Iterator[None]:
    """Within the block ``detector.extract_feat`` runs ``sess`` (ONNX Runtime) instead of PyTorch."""
    shape = sess.get_inputs()[0].shape

    def extract_feat(batch_inputs: Tensor) -> tuple[Tensor, ...]:
        x = batch_inputs.detach().float().cpu().numpy()
        if list(x.shape) != list(shape):
            raise ExportError(
                f'the exported graph takes input {shape}, this batch is {list(x.shape)}: export '
                f'with an example input of this shape (Swin window padding depends on it)'
            )
        outs = run(sess, x)
        return tuple(torch.from_numpy(o).to(batch_inputs.device) for o in outs)

    detector.extract_feat = extract_feat
    try:
        yield
    finally:
        detector.__dict__.pop('extract_feat', None)


def test_dataloader(cfg, data_root: str | None = None, limit: int | None = None):
    """The config's test dataloader in this process (no workers), first ``limit`` images, with
    ``data_root`` moving the images and the evaluator's annotation file together."""
    from mmengine.runner import Runner

    cfg = copy.deepcopy(cfg)
    loader = cfg.test_dataloader
    if data_root is not None:
        old = loader.dataset.get('data_root', '')
        loader.dataset.data_root = data_root
        ann = cfg.test_evaluator.get('ann_file')
        if ann and old and ann.startswith(old):
            cfg.test_evaluator.ann_file = osp.join(data_root, ann[len(old) :].lstrip('/'))
    loader.num_workers, loader.persistent_workers = 0, False
    if limit is not None:
        loader.dataset.indices = int(limit)
    return Runner.build_dataloader(loader), cfg.test_evaluator


FLOAT_OPS = (nn.LayerNorm, nn.Softmax, nn.GELU, nn.Linear, nn.Conv2d)


@contextlib.contextmanager
def rounding_noise(module: nn.Module, seed: int, ulps: int = 1, kinds=FLOAT_OPS) -> Iterator[None]:
    """Within the block every float op of ``module`` of the given kinds (LayerNorm, softmax, GELU, Linear,
    Conv2d: their outputs, before the next quantizer) is moved by up to ``ulps`` units in the last place,
    independently per element (-1, 0 or +1 ulp each time, seeded), zeros kept: the size of the
    difference another runtime's float kernels make. The AP spread over seeds is the quantized model's
    own sensitivity to float rounding, the floor below which ONNX Runtime and PyTorch cannot be told
    apart."""
    gen = torch.Generator().manual_seed(seed)

    def hook(mod, inputs, out):
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return None
        for _ in range(ulps):
            step = torch.randint(0, 3, out.shape, generator=gen).to(out.device) - 1
            away = torch.nextafter(out, step.to(out.dtype) * float('inf'))
            out = torch.where((step == 0) | (out == 0), out, away)
        return out

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def evaluate_ap(
    detector: nn.Module,
    cfg,
    sess=None,
    data_root: str | None = None,
    limit: int | None = None,
    metrics: Sequence[str] = ('coco/bbox_mAP', 'coco/segm_mAP'),
    variants: dict | None = None,
) -> dict:
    """mmdet's evaluator on the test set (first ``limit`` images): the PyTorch detector, and with ``sess``
    also the same detector with ONNX Runtime computing backbone + neck, batch by batch side by side.
    ``variants``: further runs of the PyTorch detector by name, each a zero-argument callable that returns
    the context manager to run it in (e.g. ``lambda: rounding_noise(detector.backbone, 0)``).
    Returns ``{'torch': {...}, 'onnx': {...}, name: {...}}`` with the requested metrics in percent."""
    from mmengine.evaluator import Evaluator

    loader, evaluator_cfg = test_dataloader(cfg, data_root, limit)
    variants = dict(variants or {})
    evaluators = {'torch': Evaluator(copy.deepcopy(evaluator_cfg))}
    if sess is not None:
        evaluators['onnx'] = Evaluator(copy.deepcopy(evaluator_cfg))
    for name in variants:
        if name in evaluators:
            raise ValueError(f'variant name {name!r} is taken')
        evaluators[name] = Evaluator(copy.deepcopy(evaluator_cfg))
    ids = [loader.dataset.get_data_info(i)['img_id'] for i in range(len(loader.dataset))]
    for ev in evaluators.values():
        ev.dataset_meta = loader.dataset.metainfo
        for metric in ev.metrics:
            if hasattr(metric, 'img_ids'):  # CocoMetric scores every image of its file unless told which
                metric.img_ids = ids
    detector.eval()
    with torch.no_grad():
        for batch in loader:
            evaluators['torch'].process(data_samples=detector.test_step(batch), data_batch=batch)
            if sess is not None:
                with onnx_features(detector, sess):
                    evaluators['onnx'].process(data_samples=detector.test_step(batch), data_batch=batch)
            for name, context in variants.items():
                with context():
                    evaluators[name].process(data_samples=detector.test_step(batch), data_batch=batch)
    out = {}
    for name, ev in evaluators.items():
        m = ev.evaluate(len(loader.dataset))
        out[name] = {k: 100 * float(m[k]) for k in metrics if k in m}
    out['images'] = len(loader.dataset)
    return out


__all__ = [
    'BackboneNeck',
    'batch_from_image',
    'preprocessed_input',
    'onnx_features',
    'evaluate_ap',
    'rounding_noise',
    'test_dataloader',
]
