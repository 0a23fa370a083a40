"""Layer-wise relevance propagation on timm's Swin classifier: which layers matter (docs/method.md).

Pure PyTorch + timm (no MMDetection). Typical use, what ``tools/lrp_plan.py`` does::

    items = list_images(folder, num_images=64)
    raw = lrp_site_scores(model, iter_images(items, eval_transform(model)))
    importance = relative_importance(raw)  # an allocator's input, with models.timm_swin.swin_sites(model)
"""

from ..swin import check_swin
from .data import (
    ImageItem,
    UnreadableImageError,
    eval_transform,
    iter_batches,
    iter_images,
    list_images,
    load_image,
    read_wnids,
)
from .rules import linear_relevance, matmul_relevance, mean_pool_relevance, residual_relevance, safe_divide
from .scores import lrp_site_scores, relative_importance, site_layer_type
from .swin import SwinRelevance, swin_relevance

__all__ = [
    'ImageItem',
    'UnreadableImageError',
    'eval_transform',
    'iter_batches',
    'iter_images',
    'list_images',
    'load_image',
    'read_wnids',
    'linear_relevance',
    'matmul_relevance',
    'mean_pool_relevance',
    'residual_relevance',
    'safe_divide',
    'lrp_site_scores',
    'relative_importance',
    'site_layer_type',
    'SwinRelevance',
    'check_swin',
    'swin_relevance',
]
