"""mmcv's compiled ops without compiling: a stand-in ``mmcv._ext`` backed by torchvision/PyTorch.

mmcv 2.1.0 (the last release MMDetection 3.3 accepts) ships its ops as a C++/CUDA extension,
``mmcv._ext``, that has to be built from source for any recent torch. ``mmcv-lite`` is the same
Python layer without it. When ``mmcv._ext`` cannot be imported, the import of ``mmcv._ext``
resolves to the module built here (see :mod:`_mmdet_lrpq_mmcv`, the one import hook that
arranges it): the functions MMDetection's detectors call come from :mod:`.kernels` on CPU and
CUDA; every other function of mmcv's extension exists (mmcv checks the names when ``mmcv.ops``
is imported) and raises :class:`MissingMMCVOpError`, naming the op, the models that need it and
the fix. A compiled ``mmcv._ext`` that loads is always used as it is.

:func:`backend` says which one is active (``python -m mmdet_lrpq.env`` prints it).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable

# Every function of mmcv 2.1.0's extension that its Python layer loads (mmcv/ops/*.py).
MMCV_EXT_FUNCTIONS = tuple(
    """
active_rotated_filter_backward active_rotated_filter_forward assign_score_withk_backward
assign_score_withk_forward ball_query_forward bbox_overlaps bezier_align_backward bezier_align_forward
bias_act border_align_backward border_align_forward box_iou_quadri box_iou_rotated carafe_backward
carafe_forward carafe_naive_backward carafe_naive_forward chamfer_distance_backward chamfer_distance_forward
contour_expand convex_giou convex_iou correlation_backward correlation_forward deform_conv_backward_input
deform_conv_backward_parameters deform_conv_forward deform_roi_pool_backward deform_roi_pool_forward
diff_iou_rotated_sort_vertices_forward dynamic_point_to_voxel_backward dynamic_point_to_voxel_forward
dynamic_voxelize_forward filtered_lrelu filtered_lrelu_act_ furthest_point_sampling_forward
furthest_point_sampling_with_dist_forward fused_bias_leakyrelu fused_indice_conv_forward
gather_points_backward gather_points_forward get_compiler_version get_compiling_cuda_version
get_indice_pairs_2d_backward get_indice_pairs_2d_forward get_indice_pairs_3d_backward
get_indice_pairs_3d_forward get_indice_pairs_4d_forward group_points_backward group_points_forward
hard_voxelize_forward indice_conv_backward indice_conv_forward indice_maxpool_backward indice_maxpool_forward
iou3d_boxes_overlap_bev_forward iou3d_nms3d_forward iou3d_nms3d_normal_forward knn_forward
masked_col2im_forward masked_im2col_forward min_area_polygons modulated_deform_conv_backward
modulated_deform_conv_forward ms_deform_attn_backward ms_deform_attn_forward nms nms_match nms_quadri
nms_rotated pixel_group points_in_boxes_all_forward points_in_boxes_cpu_forward points_in_boxes_part_forward
points_in_polygons_forward prroi_pool_backward prroi_pool_coor_backward prroi_pool_forward psamask_backward
psamask_forward riroi_align_rotated_backward riroi_align_rotated_forward roi_align_backward roi_align_forward
roi_align_rotated_backward roi_align_rotated_forward roi_pool_backward roi_pool_forward
roiaware_pool3d_backward roiaware_pool3d_forward roipoint_pool3d_forward rotated_feature_align_backward
rotated_feature_align_forward sigmoid_focal_loss_backward sigmoid_focal_loss_forward
softmax_focal_loss_backward softmax_focal_loss_forward softnms stack_ball_query_forward
stack_group_points_backward stack_group_points_forward sync_bn_backward_data sync_bn_backward_param
sync_bn_forward_mean sync_bn_forward_output sync_bn_forward_var three_interpolate_backward
three_interpolate_forward three_nn_forward tin_shift_backward tin_shift_forward upfirdn2d
""".split()
)

# Which models need an op the backend does not provide (by name prefix; first match wins).
_USED_BY = (
    (
        ('deform_conv', 'modulated_deform_conv'),
        'deformable convolution (DCN / DCNv2 in backbones, necks or heads, e.g. the *_dconv_* and *_mdconv_* configs)',
    ),
    (('deform_roi_pool',), 'deformable RoI pooling'),
    (('roi_pool',), 'RoIPool extractors (Fast/Faster R-CNN configs with type=RoIPool)'),
    (('carafe',), 'the CARAFE upsampler (FPN_CARAFE, CARAFE mask heads)'),
    (('sync_bn',), "MMSyncBN normalisation (norm_cfg type='MMSyncBN')"),
    (('masked_',), 'guided anchoring (GA-RPN / GA-RetinaNet)'),
    (('softmax_focal_loss',), 'softmax focal loss'),
    (
        (
            'roi_align_rotated',
            'riroi_align',
            'nms_rotated',
            'nms_quadri',
            'box_iou_rotated',
            'box_iou_quadri',
            'rotated_feature_align',
            'active_rotated_filter',
            'convex_',
            'min_area_polygons',
            'diff_iou_rotated',
            'points_in_polygons',
        ),
        'rotated-box detectors (MMRotate)',
    ),
    (
        (
            'ball_query',
            'knn',
            'three_',
            'gather_points',
            'group_points',
            'stack_',
            'furthest_point',
            'voxelize',
            'hard_voxelize',
            'dynamic_',
            'roiaware',
            'roipoint',
            'points_in_boxes',
            'iou3d',
            'get_indice_pairs',
            'indice_',
            'fused_indice',
            'assign_score',
            'chamfer',
        ),
        '3-D point-cloud models (MMDetection3D)',
    ),
    (('border_align',), 'BorderDet heads'),
    (('prroi_pool', 'bezier_align', 'pixel_group', 'contour_expand'), 'text detection / PrRoIPool models (MMOCR)'),
    (('bias_act', 'filtered_lrelu', 'fused_bias_leakyrelu', 'upfirdn2d'), 'StyleGAN-family generators (MMagic)'),
    (('psamask',), 'PSANet (MMSegmentation)'),
    (('correlation',), 'optical-flow models (MMFlow)'),
    (('tin_shift',), 'temporal interlace shift (MMAction2)'),
)

INSTALL_COMPILED = (
    'install mmcv 2.1.0 with its compiled ops (in this repository: `make install MMCV=compiled`; '
    'elsewhere see docs/install.md); a compiled mmcv._ext that loads is always used instead of '
    'this backend'
)


class MissingMMCVOpError(NotImplementedError):
    """A model called an mmcv op that the torchvision backend does not provide."""


def used_by(name: str) -> str:
    for prefixes, what in _USED_BY:
        if name.startswith(prefixes):
            return what
    return 'models outside the detectors mmdet-lrpq targets'


def _missing(name: str) -> Callable:
    def missing(*args, **kwargs):
        raise MissingMMCVOpError(
            f"mmcv op '{name}' is not available: mmcv has no compiled ops here (mmcv-lite, or an mmcv._ext built "
            f"for another torch), and mmdet-lrpq's torchvision backend provides only RoIAlign, NMS, soft-NMS, "
            f"NMS-match, bbox overlaps, sigmoid focal loss and multi-scale deformable attention. '{name}' is used by "
            f'{used_by(name)}. To run this model, {INSTALL_COMPILED}.'
        )

    missing.__name__ = name
    missing.__qualname__ = name
    return missing


class _StandInExt(types.ModuleType):
    """``mmcv._ext`` made of :mod:`.kernels` plus a clear error for everything else."""

    __mmdet_lrpq_backend__ = 'torchvision'

    def __getattr__(self, name: str):
        # Only mmcv's own function names: dunder look-ups (pickle, inspect, pkgutil) must fail as usual.
        if name in MMCV_EXT_FUNCTIONS:
            return _missing(name)
        raise AttributeError(f"module 'mmcv._ext' (mmdet-lrpq torchvision backend) has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(MMCV_EXT_FUNCTIONS))


def build_module(spec=None) -> types.ModuleType:
    """A fresh stand-in ``mmcv._ext`` (``spec``: the import spec to record on it)."""
    # Not ``from . import kernels``: this package may be loaded without its parent (see
    # ``_mmdet_lrpq_mmcv._stand_in_package``), and that statement would import ``mmdet_lrpq``.
    kernels = importlib.import_module(f'{__name__}.kernels')
    module = _StandInExt('mmcv._ext', __doc__)
    for name in kernels.IMPLEMENTED:
        setattr(module, name, getattr(kernels, name))
    module.__spec__ = spec
    if spec is not None:
        module.__loader__ = spec.loader
    return module


def backend() -> dict:
    """Which ``mmcv._ext`` is (or would be) used: ``{'backend': 'compiled' | 'torchvision' | None, 'reason': str}``."""
    import _mmdet_lrpq_mmcv

    return _mmdet_lrpq_mmcv.backend()


__all__ = ['MMCV_EXT_FUNCTIONS', 'MissingMMCVOpError', 'backend', 'build_module', 'used_by']
