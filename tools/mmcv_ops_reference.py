"""Record compiled mmcv's answers for the ops that mmdet_lrpq.ops stands in for.

Run once in an environment whose mmcv has its compiled ops (``make install MMCV=compiled``):

    python tools/mmcv_ops_reference.py            # writes tests/fixtures/mmcv_ops_reference.pt

The file holds each case's inputs and compiled mmcv's outputs (CPU), so that
``tests/test_mmcv_ops.py`` checks the torchvision backend against compiled mmcv on every machine,
including the ones that only have mmcv-lite. Inputs are seeded; edge cases are deliberate: boxes on
and past the border, degenerate and empty inputs, tied scores, offset 0 and 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'mmcv_ops_reference.pt'


def _boxes(gen: torch.Generator, n: int, w: float, h: float, tie_levels: int | None = None):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) * 0.4
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=gen)
    if tie_levels:
        scores = (scores * tie_levels).floor() / tie_levels  # many exactly equal scores
    return boxes, scores


def roi_align_cases(gen: torch.Generator) -> list[dict]:
    feats = torch.randn(2, 3, 13, 17, generator=gen)
    boxes, _ = _boxes(gen, 24, 34, 26)
    edge = torch.tensor(
        [
            [0, 0, 0, 34, 26],  # the whole image
            [1, -6, -4, 5, 3],  # starts outside
            [0, 30, 20, 40, 31],  # ends outside
            [1, 10, 10, 10, 10],  # zero size
            [0, 33.9, 25.9, 34, 26],  # tiny, on the far border
            [1, -20, -20, -10, -10],
        ],  # entirely outside
        dtype=torch.float32,
    )
    rois = torch.cat([torch.cat([torch.randint(0, 2, (24, 1), generator=gen).float(), boxes], 1), edge])
    cases = []
    for aligned in (True, False):
        for sampling_ratio in (0, 2):
            for scale, size in ((0.5, (7, 7)), (0.25, (3, 5))):
                cases.append(
                    dict(
                        input=feats,
                        rois=rois,
                        output_size=size,
                        spatial_scale=scale,
                        sampling_ratio=sampling_ratio,
                        aligned=aligned,
                        grad_output=torch.randn(rois.size(0), 3, *size, generator=gen),
                    )
                )
    cases.append(
        dict(
            input=feats,
            rois=torch.zeros(0, 5),
            output_size=(7, 7),
            spatial_scale=0.5,
            sampling_ratio=0,
            aligned=True,
            grad_output=torch.zeros(0, 3, 7, 7),
        )
    )
    return cases


def nms_cases(gen: torch.Generator) -> list[dict]:
    cases = []
    for n, ties in ((300, None), (300, 10), (40, 2), (1, None), (0, None)):
        boxes, scores = _boxes(gen, n, 100, 80, ties)
        for offset in (0, 1):
            for thr in (0.3, 0.7):
                cases.append(dict(boxes=boxes, scores=scores, iou_threshold=thr, offset=offset))
    dup = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4 + [[20.0, 20.0, 30.0, 30.0]])  # identical boxes, equal scores
    cases.append(dict(boxes=dup, scores=torch.full((5,), 0.5), iou_threshold=0.5, offset=0))
    return cases


def softnms_cases(gen: torch.Generator) -> list[dict]:
    cases = []
    for n, ties in ((120, None), (60, 5)):
        boxes, scores = _boxes(gen, n, 60, 60, ties)
        for method, sigma in ((0, 0.5), (1, 0.5), (2, 0.5)):
            cases.append(
                dict(
                    boxes=boxes, scores=scores, iou_threshold=0.3, sigma=sigma, min_score=0.05, method=method, offset=0
                )
            )
    boxes, scores = _boxes(gen, 80, 60, 60)
    cases.append(dict(boxes=boxes, scores=scores, iou_threshold=0.5, sigma=0.5, min_score=1e-3, method=1, offset=1))
    return cases


def nms_match_cases(gen: torch.Generator) -> list[dict]:
    cases = []
    for n, ties in ((200, None), (100, 4)):
        boxes, scores = _boxes(gen, n, 50, 50, ties)
        for thr in (0.3, 0.6):
            cases.append(dict(dets=torch.cat([boxes, scores[:, None]], 1), iou_threshold=thr))
    return cases


def bbox_overlaps_cases(gen: torch.Generator) -> list[dict]:
    b1, _ = _boxes(gen, 30, 50, 40)
    b2, _ = _boxes(gen, 20, 50, 40)
    cases = []
    for mode in ('iou', 'iof'):
        for offset in (0, 1):
            cases.append(dict(bboxes1=b1, bboxes2=b2, mode=mode, aligned=False, offset=offset))
            cases.append(dict(bboxes1=b1[:20], bboxes2=b2, mode=mode, aligned=True, offset=offset))
    return cases


def focal_cases(gen: torch.Generator) -> list[dict]:
    logits = torch.randn(64, 7, generator=gen) * 4
    logits[0] = torch.tensor([30.0, -30.0, 0.0, 15.0, -15.0, 1e-3, -1e-3])  # saturated sigmoids
    target = torch.randint(0, 8, (64,), generator=gen)  # 7 = background
    cases = [
        dict(input=logits, target=target, weight=None, gamma=2.0, alpha=0.25),
        dict(input=logits, target=target, weight=None, gamma=1.5, alpha=0.5),
        # with class weights mmcv reads weight[target]: only foreground targets are defined
        dict(
            input=logits, target=target.clamp(max=6), weight=torch.rand(7, generator=gen) + 0.5, gamma=2.0, alpha=0.25
        ),
    ]
    return cases


def run_compiled(cases: dict) -> dict:
    """Compiled mmcv's outputs for every case (through mmcv.ops, as detectors call them).

    Sigmoid focal loss has no CPU kernel in mmcv 2.1.0 (CUDA only): its cases are kept for the test,
    which checks the backend against MMDetection's own PyTorch focal loss instead."""
    from mmcv.ops import bbox_overlaps, nms, nms_match, roi_align, soft_nms

    out: dict = {}
    out['roi_align'] = []
    for c in cases['roi_align']:
        x = c['input'].clone().requires_grad_(True)
        y = roi_align(x, c['rois'], c['output_size'], c['spatial_scale'], c['sampling_ratio'], 'avg', c['aligned'])
        if y.numel():
            y.backward(c['grad_output'])
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        out['roi_align'].append(dict(output=y.detach(), grad_input=grad))
    out['nms'] = [nms(c['boxes'], c['scores'], c['iou_threshold'], offset=c['offset'])[1] for c in cases['nms']]
    methods = {0: 'naive', 1: 'linear', 2: 'gaussian'}
    out['softnms'] = []
    for c in cases['softnms']:
        dets, inds = soft_nms(
            c['boxes'], c['scores'], c['iou_threshold'], c['sigma'], c['min_score'], methods[c['method']], c['offset']
        )
        out['softnms'].append(dict(dets=dets, inds=inds))
    out['nms_match'] = [[g.tolist() for g in nms_match(c['dets'], c['iou_threshold'])] for c in cases['nms_match']]
    out['bbox_overlaps'] = [
        bbox_overlaps(c['bboxes1'], c['bboxes2'], c['mode'], c['aligned'], c['offset']) for c in cases['bbox_overlaps']
    ]
    return out


def make_cases(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        roi_align=roi_align_cases(gen),
        nms=nms_cases(gen),
        softnms=softnms_cases(gen),
        nms_match=nms_match_cases(gen),
        bbox_overlaps=bbox_overlaps_cases(gen),
        focal=focal_cases(gen),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ['MMDET_LRPQ_MMCV_OPS'] = 'compiled'  # never record the stand-in's own answers
    import mmcv

    try:
        import mmcv._ext as ext
    except ImportError as err:
        print(f'error: this needs mmcv with compiled ops (make install MMCV=compiled): {err}', file=sys.stderr)
        return 2
    cases = make_cases()
    torch.set_num_threads(1)
    outputs = run_compiled(cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix('.tmp')
    torch.save(
        dict(
            cases=cases,
            compiled=outputs,
            mmcv=str(mmcv.__version__),
            torch=str(torch.__version__),
            compiler=ext.get_compiler_version(),
        ),
        tmp,
    )
    os.replace(tmp, args.out)
    print(
        f'{args.out} ({args.out.stat().st_size / 1024:.0f} KiB): compiled mmcv {mmcv.__version__} on torch '
        f'{torch.__version__}, {sum(len(v) for v in cases.values())} cases'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
