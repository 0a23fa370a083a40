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
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .forms import ExportError
from .runtime import run


class BackboneNeck(nn.Module):
    """``detector.extract_feat`` as a module (shares the detector's submodules): image tensor -> features."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not hasattr(detector, 'backbone'):
            raise ExportError(f'{type(detector).__name__} has no backbone: export the module itself with export_onnx')
        self.backbone = detector.backbone
        self.neck = getattr(detector, 'neck', None) if getattr(detector, 'with_neck', True) else None
        self.training = detector.training          # a new module starts in train mode: mirror the detector

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
def onnx_features(detector: nn.Module, sess, output_count: Optional[int] = None) -> Iterator[None]:
    """Within the block ``detector.extract_feat`` runs ``sess`` (ONNX Runtime) instead of PyTorch."""
    shape = sess.get_inputs()[0].shape

    def extract_feat(batch_inputs: Tensor) -> tuple[Tensor, ...]:
        x = batch_inputs.detach().float().cpu().numpy()
        if list(x.shape) != list(shape):
            raise ExportError(f'the exported graph takes input {shape}, this batch is {list(x.shape)}: export '
                              f'with an example input of this shape (Swin window padding depends on it)')
        outs = run(sess, x)
        return tuple(torch.from_numpy(o).to(batch_inputs.device) for o in outs)

    detector.extract_feat = extract_feat
    try:
        yield
    finally:
        detector.__dict__.pop('extract_feat', None)


def test_dataloader(cfg, data_root: Optional[str] = None, limit: Optional[int] = None):
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
            cfg.test_evaluator.ann_file = osp.join(data_root, ann[len(old):].lstrip('/'))
    loader.num_workers, loader.persistent_workers = 0, False
    if limit is not None:
        loader.dataset.indices = int(limit)
    return Runner.build_dataloader(loader), cfg.test_evaluator


def evaluate_ap(detector: nn.Module, cfg, sess=None, data_root: Optional[str] = None, limit: Optional[int] = None,
                metrics: Sequence[str] = ('coco/bbox_mAP', 'coco/segm_mAP')) -> dict:
    """mmdet's evaluator on the test set (first ``limit`` images): the PyTorch detector, and with ``sess``
    also the same detector with ONNX Runtime computing backbone + neck, batch by batch side by side.
    Returns ``{'torch': {...}, 'onnx': {...}}`` with the requested metrics in percent."""
    from mmengine.evaluator import Evaluator
    loader, evaluator_cfg = test_dataloader(cfg, data_root, limit)
    evaluators = {'torch': Evaluator(copy.deepcopy(evaluator_cfg))}
    if sess is not None:
        evaluators['onnx'] = Evaluator(copy.deepcopy(evaluator_cfg))
    ids = [loader.dataset.get_data_info(i)['img_id'] for i in range(len(loader.dataset))]
    for ev in evaluators.values():
        ev.dataset_meta = loader.dataset.metainfo
        for metric in ev.metrics:
            if hasattr(metric, 'img_ids'):      # CocoMetric scores every image of its file unless told which
                metric.img_ids = ids
    detector.eval()
    with torch.no_grad():
        for batch in loader:
            evaluators['torch'].process(data_samples=detector.test_step(batch), data_batch=batch)
            if sess is not None:
                with onnx_features(detector, sess):
                    evaluators['onnx'].process(data_samples=detector.test_step(batch), data_batch=batch)
    out = {}
    for name, ev in evaluators.items():
        m = ev.evaluate(len(loader.dataset))
        out[name] = {k: 100 * float(m[k]) for k in metrics if k in m}
    out['images'] = len(loader.dataset)
    return out


__all__ = ['BackboneNeck', 'batch_from_image', 'preprocessed_input', 'onnx_features', 'evaluate_ap',
           'test_dataloader']
