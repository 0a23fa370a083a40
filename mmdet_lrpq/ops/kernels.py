"""mmcv's compiled ops that MMDetection's detectors call, written with torchvision and PyTorch.

Each function has the name, arguments and in-place/return contract of the ``mmcv._ext`` function
it stands in for (mmcv 2.1.0's Python layer calls them exactly so), and works on any device its
inputs live on: torchvision's kernels run on CPU and CUDA, the rest is plain tensor code.

Where the result can depend on evaluation order, the order is mmcv's: NMS visits boxes in the
order of mmcv's own ``scores.sort(0, descending=True)`` (so ties break as compiled mmcv breaks
them), soft-NMS and NMS-match replay mmcv's sequential loops. The parity figures against compiled
mmcv (bit-identical or the stated bound, per op) are pinned by ``tests/test_mmcv_ops.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor


# ------------------------------------------------------------------------------------ RoIAlign
def _roi_align_args(
    *,
    aligned_height: int,
    aligned_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    pool_mode: int,
    aligned: bool,
) -> tuple[float, int, int, int, bool]:
    """The keyword arguments mmcv passes to both RoIAlign functions, checked, as torchvision's kernels
    take them: ``(spatial_scale, aligned_height, aligned_width, sampling_ratio, aligned)``."""
    if pool_mode != 1:
        raise NotImplementedError(
            "RoIAlign with pool_mode='max' is not provided by mmdet-lrpq's torchvision backend for "
            'mmcv ops (torchvision implements average pooling only; every MMDetection RoI extractor '
            "uses 'avg'). Use pool_mode='avg', or install mmcv with compiled ops (docs/install.md)"
        )
    return float(spatial_scale), int(aligned_height), int(aligned_width), int(sampling_ratio), bool(aligned)


def roi_align_forward(
    input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor, argmax_x: Tensor, **options: Any
) -> None:
    """``options``: mmcv's keyword arguments (those of :func:`_roi_align_args`)."""
    scale, height, width, ratio, aligned = _roi_align_args(**options)
    output.copy_(torch.ops.torchvision.roi_align(input, rois.to(input.dtype), scale, height, width, ratio, aligned))


def roi_align_backward(
    grad_output: Tensor, rois: Tensor, argmax_y: Tensor, argmax_x: Tensor, grad_input: Tensor, **options: Any
) -> None:
    """``options``: as :func:`roi_align_forward`'s."""
    scale, height, width, ratio, aligned = _roi_align_args(**options)
    n, c, h, w = grad_input.shape
    grad = torch.ops.torchvision._roi_align_backward(
        grad_output, rois.to(grad_output.dtype), scale, height, width, n, c, h, w, ratio, aligned
    )
    grad_input.copy_(grad)


# ----------------------------------------------------------------------------------------- NMS
def _mmcv_order(scores: Tensor) -> Tensor:
    """The visiting order of mmcv's NMS kernels (their own, not necessarily stable, sort)."""
    return scores.sort(0, descending=True)[1]


def _areas(boxes: Tensor, offset: int) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset)


def _iou_one_to_many(box: Tensor, area: Tensor, boxes: Tensor, areas: Tensor, offset: int) -> Tensor:
    """IoU of one box against many, with mmcv's operation order (so float32 results are bitwise mmcv's)."""
    xx1 = torch.maximum(box[0], boxes[:, 0])
    yy1 = torch.maximum(box[1], boxes[:, 1])
    xx2 = torch.minimum(box[2], boxes[:, 2])
    yy2 = torch.minimum(box[3], boxes[:, 3])
    w = (xx2 - xx1 + offset).clamp(min=0)
    h = (yy2 - yy1 + offset).clamp(min=0)
    inter = w * h
    return inter / (area + areas - inter)


def nms(boxes: Tensor, scores: Tensor, *, iou_threshold: float, offset: int = 0) -> Tensor:
    """Indices of the kept boxes in decreasing score order (a box is dropped when IoU > threshold)."""
    if boxes.numel() == 0:
        return boxes.new_empty(0, dtype=torch.long)
    order = _mmcv_order(scores)
    if offset == 0:
        # torchvision's kernel visits boxes by decreasing score: hand it mmcv's order as distinct
        # descending ranks, so ties are broken exactly as mmcv breaks them.
        ranks = torch.arange(order.numel(), 0, -1, device=boxes.device, dtype=boxes.dtype)
        keep = torchvision.ops.nms(boxes[order], ranks, float(iou_threshold))
        return order[keep]
    # The legacy "+1" box convention: torchvision has no offset, so replay mmcv's loop.
    sorted_boxes = boxes[order]
    areas = _areas(sorted_boxes, offset)
    alive = torch.ones(order.numel(), dtype=torch.bool, device=boxes.device)
    for i in range(order.numel()):
        if not bool(alive[i]):
            continue
        rest = slice(i + 1, None)
        ovr = _iou_one_to_many(sorted_boxes[i], areas[i], sorted_boxes[rest], areas[rest], offset)
        alive[rest] &= ~(ovr > iou_threshold)
    return order[alive]


def softnms(
    boxes: Tensor,
    scores: Tensor,
    dets: Tensor,
    *,
    iou_threshold: float,
    sigma: float,
    min_score: float,
    method: int,
    offset: int,
) -> Tensor:
    """mmcv's soft-NMS (method 0 naive, 1 linear, 2 gaussian), CPU tensors as mmcv passes them.

    Writes the kept boxes with their decayed scores into ``dets[:k]`` and returns their input
    indices. The sequential loop is mmcv's, including how a box that falls below ``min_score``
    is replaced by the last one (which decides later ties); the per-box arithmetic is vectorized.
    """
    n = boxes.size(0)
    if n == 0:
        return boxes.new_empty(0, dtype=torch.long)
    b = boxes.detach().clone().contiguous()
    sc = scores.detach().clone().contiguous()
    areas = _areas(b, offset)
    inds = torch.arange(n, dtype=torch.long, device=boxes.device)
    for i in range(n):
        if i >= n:
            break
        m = i + int(torch.argmax(sc[i:n]))  # the first maximum, as mmcv's strict '<' scan
        box, score, area, ind = b[m].clone(), sc[m].clone(), areas[m].clone(), inds[m].clone()
        b[m], sc[m], areas[m], inds[m] = b[i], sc[i], areas[i], inds[i]
        b[i], sc[i], areas[i], inds[i] = box, score, area, ind
        dets[i, :4] = box
        dets[i, 4] = score
        if i + 1 >= n:
            continue
        rest = slice(i + 1, n)
        ovr = _iou_one_to_many(box, area, b[rest], areas[rest], offset)
        if method == 0:
            weight = torch.where(ovr >= iou_threshold, torch.zeros_like(ovr), torch.ones_like(ovr))
        elif method == 1:
            weight = torch.where(ovr >= iou_threshold, 1 - ovr, torch.ones_like(ovr))
        else:
            # mmcv calls the C library's expf; exp in double rounded once to float gives the
            # same correctly rounded value (PyTorch's vectorized float exp may differ in the last bit).
            weight = torch.exp((-(ovr * ovr) / sigma).double()).to(ovr.dtype)
        sc[rest] = sc[rest] * weight
        n = _drop_below(b, sc, areas, inds, i + 1, n, sc[rest] < min_score)
    return inds[:n].clone()


def _drop_below(b: Tensor, sc: Tensor, areas: Tensor, inds: Tensor, start: int, n: int, low: Tensor) -> int:
    """mmcv's removal: scanning forward, a box below min_score is overwritten by the current last
    box (itself re-checked) and the list shrinks by one. Returns the new length."""
    low_list = low.tolist()
    is_low = dict(enumerate(low_list, start))  # position -> below min_score (for this step)
    pos, end = start, n
    while pos < end:
        if is_low[pos]:
            last = end - 1
            b[pos], sc[pos], areas[pos], inds[pos] = b[last], sc[last], areas[last], inds[last]
            is_low[pos] = is_low[last]
            end -= 1
        else:
            pos += 1
    return end


def nms_match(dets: Tensor, *, iou_threshold: float) -> list[list[int]]:
    """Groups of box indices: each kept box followed by the boxes it suppressed (IoU >= threshold)."""
    boxes, scores = dets[:, :4], dets[:, 4]
    order = _mmcv_order(scores).tolist()
    areas = _areas(boxes, 0)
    suppressed = torch.zeros(dets.size(0), dtype=torch.bool, device=dets.device)
    groups: list[list[int]] = []
    order_t = torch.tensor(order, dtype=torch.long, device=dets.device)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        later = order_t[pos + 1 :]
        later = later[~suppressed[later]]
        ovr = _iou_one_to_many(boxes[i], areas[i], boxes[later], areas[later], 0)
        hit = later[ovr >= iou_threshold]
        suppressed[hit] = True
        groups.append([i] + hit.tolist())
    return groups


def bbox_overlaps(bboxes1: Tensor, bboxes2: Tensor, ious: Tensor, *, mode: int, aligned: bool, offset: int) -> None:
    """IoU (mode 0) or IoF (mode 1) into ``ious``, pairwise or aligned."""
    if aligned:
        lt = torch.maximum(bboxes1[:, :2], bboxes2[:, :2])
        rb = torch.minimum(bboxes1[:, 2:], bboxes2[:, 2:])
    else:
        lt = torch.maximum(bboxes1[:, None, :2], bboxes2[None, :, :2])
        rb = torch.minimum(bboxes1[:, None, 2:], bboxes2[None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    area1, area2 = _areas(bboxes1, offset), _areas(bboxes2, offset)
    if not aligned:
        area1 = area1[:, None]
    union = area1 + area2 - overlap if mode == 0 else area1
    ious.copy_(overlap / union)


# ---------------------------------------------------------------------------- sigmoid focal loss
def _focal_terms(input: Tensor, target: Tensor, weight: Tensor, gamma: float, alpha: float, grad: bool) -> Tensor:
    """mmcv's sigmoid focal loss (or its gradient) per element. mmcv 2.1.0 runs it only on CUDA;
    like that kernel, the logarithms see max(p, FLT_MIN) and max(1 - p, FLT_MIN), so saturated
    logits give large finite values instead of infinities."""
    num_classes = input.size(1)
    p = 1.0 / (1.0 + torch.exp(-input))
    tiny = torch.finfo(torch.float32).tiny
    log_p, log_1mp = torch.log(p.clamp(min=tiny)), torch.log((1 - p).clamp(min=tiny))
    positive = target[:, None] == torch.arange(num_classes, device=input.device)
    if grad:
        pos = -alpha * (1 - p).pow(gamma) * (1 - p - gamma * p * log_p)
        neg = -(1 - alpha) * p.pow(gamma) * (gamma * (1 - p) * log_1mp - p)
    else:
        pos = -alpha * (1 - p).pow(gamma) * log_p
        neg = -(1 - alpha) * p.pow(gamma) * log_1mp
    out = torch.where(positive, pos, neg)
    if weight.numel():
        # Background samples (target == num_classes) have no class weight; mmcv's kernel reads
        # past the end of `weight` there, so they keep weight 1 here.
        per_sample = torch.where(
            target < num_classes,
            weight[target.clamp(max=num_classes - 1)],
            torch.ones((), dtype=weight.dtype, device=weight.device),
        )
        out = out * per_sample[:, None]
    return out


def sigmoid_focal_loss_forward(
    input: Tensor, target: Tensor, weight: Tensor, output: Tensor, *, gamma: float, alpha: float
) -> None:
    output.copy_(_focal_terms(input, target, weight, gamma, alpha, grad=False))


def sigmoid_focal_loss_backward(
    input: Tensor, target: Tensor, weight: Tensor, grad_input: Tensor, *, gamma: float, alpha: float
) -> None:
    grad_input.copy_(_focal_terms(input, target, weight, gamma, alpha, grad=True))


# ------------------------------------------------------------ multi-scale deformable attention
def _ms_deform_attn(value: Tensor, spatial_shapes: Tensor, sampling_loc: Tensor, attn_weight: Tensor) -> Tensor:
    """Bilinear sampling of each level at the given locations (zero outside), weighted and summed.

    ``grid_sample(align_corners=False)`` samples at ``loc * size - 0.5`` with zero padding, the
    same points and border rule as mmcv's CUDA im2col kernel.
    """
    bs, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_loc.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_loc - 1
    sampled = []
    for level, (chunk, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        # (bs, h*w, heads, dim) -> (bs*heads, dim, h, w)
        feat = chunk.permute(0, 2, 3, 1).reshape(bs * heads, dim, int(h), int(w))
        # (bs, queries, heads, points, 2) -> (bs*heads, queries, points, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            torch.nn.functional.grid_sample(feat, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
        )
    # (bs, queries, heads, levels, points) -> (bs*heads, 1, queries, levels*points)
    weights = attn_weight.transpose(1, 2).reshape(bs * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(bs, heads * dim, queries).transpose(1, 2).contiguous()


def ms_deform_attn_forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_loc: Tensor,
    attn_weight: Tensor,
    *,
    im2col_step: int,
) -> Tensor:
    return _ms_deform_attn(value, spatial_shapes, sampling_loc.to(value.dtype), attn_weight.to(value.dtype))


def ms_deform_attn_backward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_loc: Tensor,
    attn_weight: Tensor,
    grad_output: Tensor,
    grad_value: Tensor,
    grad_sampling_loc: Tensor,
    grad_attn_weight: Tensor,
    *,
    im2col_step: int,
) -> None:
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, sampling_loc, attn_weight)]
        out = _ms_deform_attn(inputs[0], spatial_shapes, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_output)
    for target, grad in zip((grad_value, grad_sampling_loc, grad_attn_weight), grads):
        target.copy_(grad)


# ------------------------------------------------------------------------------------ identity
def get_compiler_version() -> str:
    return f'none: mmdet-lrpq torchvision backend (torchvision {torchvision.__version__})'


def get_compiling_cuda_version() -> str:
    return 'not available'


IMPLEMENTED = (
    'roi_align_forward',
    'roi_align_backward',
    'nms',
    'softnms',
    'nms_match',
    'bbox_overlaps',
    'sigmoid_focal_loss_forward',
    'sigmoid_focal_loss_backward',
    'ms_deform_attn_forward',
    'ms_deform_attn_backward',
    'get_compiler_version',
    'get_compiling_cuda_version',
)
