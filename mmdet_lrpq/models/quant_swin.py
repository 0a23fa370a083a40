"""``QuantSwinTransformer``: a quantized Swin backbone as a declarative mmdet model type.

    model = dict(backbone=dict(type='mmdet_lrpq.QuantSwinTransformer', quant=dict(plan='...json', method='crl'),
                               embed_dims=96, depths=[2, 2, 6, 2], ...))   # SwinTransformer's kwargs

It *is* mmdet's ``SwinTransformer`` (same parameters and checkpoint keys), plus quantization
options (``QuantConfig`` fields; scope is always ``backbone``). If a ``QuantizationHook`` is
configured, the hook quantizes it with these options and its calibration source. Without a
hook it quantizes itself on its first forward in eval mode, calibrating on that batch — the first
test image, i.e. RepQ-ViT's protocol. Both paths run the same ``ModelQuantizer``.
"""

from __future__ import annotations

from mmdet.models.backbones.swin import SwinTransformer
from mmengine.logging import MMLogger
from torch import nn

from ..config import QuantConfig
from ..registry import MODELS
from .quantizer import ModelQuantizer


class _BackboneOnly(nn.Module):
    """Presents a lone backbone as ``model.backbone`` so site names match detector plans."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone


@MODELS.register_module()
class QuantSwinTransformer(SwinTransformer):
    def __init__(self, *args, quant: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        quant = dict(quant or {})
        if quant.get('scope', 'backbone') != 'backbone':
            raise ValueError(
                "QuantSwinTransformer quantizes the backbone only (scope='backbone'); "
                "use QuantizationHook for scope='detector'"
            )
        quant['scope'] = 'backbone'
        self.quant_config = QuantConfig.from_options(quant, where='QuantSwinTransformer quant')
        self._self_calibrate = True

    def claim_quantization(self) -> None:
        """Called by QuantizationHook: the hook quantizes this backbone, not its first forward."""
        self._self_calibrate = False

    def forward(self, x):
        if self._self_calibrate and not self.training:
            self._self_calibrate = False
            quantizer = ModelQuantizer(_BackboneOnly(self), self.quant_config, logger=MMLogger.get_current_instance())
            report = quantizer.calibrate(
                [x],
                lambda m, batch: super(QuantSwinTransformer, self).forward(batch),
                images_in=lambda batch: batch.shape[0],
                image_ids=['first forward batch'],
                input_shape=tuple(x.shape[-2:]),
                batch_size=x.shape[0],
                reconstruct_batches=lambda: [x],
            )
            quantizer.logger.info('QuantSwinTransformer calibrated on its first batch:\n' + report.table())
        return super().forward(x)
