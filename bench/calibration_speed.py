"""Calibration and quantized-inference cost relative to the float model, measured side by side.

    .venv/bin/python bench/calibration_speed.py --image ../shared/data/coco_mini/val2017/000000397133.jpg

Builds mmdet's Mask R-CNN Swin-T (random weights: no pretrained weights exist here; the timings do
not depend on them) and quantizes it at W4A4 with RepQ-ViT's protocol (every Conv2d/Linear, both
attention matmuls, per-channel post-LayerNorm inputs, 8-bit patch-embedding input) through the same
``ModelQuantizer`` the hook uses. On one COCO image at the test resolution (1333x800) it times
wrap + calibrate + reparameterize + weight re-quantization once, float vs quantized forwards
in back-to-back pairs in ABBA order (``--repeats`` pairs), then the calibration forward alone on
fresh wrapped copies (``--calib-repeats``). quant/fp is the median over the pairs of each pair's
ratio (a slow phase of the machine then hits both sides of a pair alike); calib/fp is the median
calibration forward over the median float forward. By default the C allocator keeps freed memory
mapped for the whole run (``keep_heap``), so that neither model pays page faults that depend on
what ran before it; ``--default-allocator`` measures without that. ``--bypass-quantizers`` adds
the quantized model with its activation quantizers returning their input to the interleave.

A randomly initialised classifier scores every class ~1/81, which either detects nothing (so the
mask head never runs) or, with the score threshold off, sends 80,000 near-tied boxes to NMS — both
unlike a trained model. So the classifier bias favours one class: as with a trained detector,
~1000 candidates pass the threshold, NMS keeps up to 100 detections and the mask head runs on them.
Last line: ``calib/fp=<ratio> quant/fp=<ratio>``.
Writes the figures to ``results/calibration_speed.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os.path as osp
import platform
import resource
import statistics
import sys
import time

import torch

try:
    from bench import common
except ImportError:  # python bench/calibration_speed.py: bench/ is sys.path[0]
    import common

REPO = common.REPO
DEFAULT_IMAGE = osp.join(REPO, '..', 'shared', 'data', 'coco_mini', 'val2017', '000000397133.jpg')


def _sync() -> None:
    """Wait for queued GPU work, so a timing covers the computation and not only its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, faults: list | None = None) -> float:
    """Seconds one call of ``fn`` takes; its minor page faults appended to ``faults``."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    dt = time.perf_counter() - t0
    if faults is not None:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return dt


def keep_heap() -> str | None:
    """Make glibc keep freed memory mapped for the rest of the process; None if not glibc.

    A forward allocates and frees ~3 GB of activations. By default glibc serves large blocks with
    fresh ``mmap`` calls and returns freed memory to the OS above an adaptive threshold, so how many
    page faults a forward takes (0.3-0.8 M on a 2-core VM, ~1 s of a 7-8 s forward) depends on what
    ran before it, not on the model. With ``M_MMAP_MAX = 0`` and an unbounded ``M_TRIM_THRESHOLD``
    every block comes from the heap and stays mapped once touched, like a caching allocator: after
    the warm-up forwards neither model takes page faults. Both models run under the same setting.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return None
    return 'glibc heap kept mapped (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)'


@contextlib.contextmanager
def patched_quantizers(make):
    """Replace the activation quantizers' ``forward`` by ``make(key, original)`` while inside."""
    from mmdet_lrpq.quant.modules import LogSqrt2Quantizer, UniformQuantizer

    originals = {
        UniformQuantizer: ('uniform', UniformQuantizer.forward),
        LogSqrt2Quantizer: ('log_sqrt2', LogSqrt2Quantizer.forward),
    }
    for cls, (key, forward) in originals.items():
        cls.forward = make(key, forward)
    try:
        yield
    finally:
        for cls, (_, forward) in originals.items():
            cls.forward = forward


def quantizer_seconds(forward) -> dict:
    """Seconds spent inside the activation quantizers during one (untimed) call of ``forward``."""
    spent = {'uniform': 0.0, 'log_sqrt2': 0.0}

    def timing(key, original):
        def timed_forward(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            spent[key] += time.perf_counter() - t0
            return out

        return timed_forward

    with patched_quantizers(timing):
        forward()
    return spent


def bypassing(key, original):
    """A quantizer forward that returns its input: the quantized model without the quantizers' work."""
    return lambda self, x, *args, **kwargs: x


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--image', default=DEFAULT_IMAGE, help="a COCO image (default: RepQ-ViT's val2017 image)")
    parser.add_argument('--config', default=osp.join(REPO, 'configs', 'mask_rcnn_swin_t_w4a4.py'))
    parser.add_argument('--method', default='repq', choices=['repq', 'crl'])
    parser.add_argument(
        '--repeats', type=int, default=9, help='float/quantized forward pairs timed back to back, in ABBA order'
    )
    parser.add_argument('--calib-repeats', type=int, default=3, help='calibration forwards timed')
    parser.add_argument(
        '--default-allocator',
        action='store_true',
        help='leave the C allocator as it is (page faults then vary from forward to forward)',
    )
    parser.add_argument(
        '--bypass-quantizers',
        action='store_true',
        help='also time the quantized model with its activation quantizers returning their '
        'input (a third model in the interleave): what the wrapping costs without them',
    )
    parser.add_argument(
        '--scale',
        type=int,
        nargs=2,
        metavar=('W', 'H'),
        help="the test pipeline's Resize scale (default: the config's, 1333 800); a smaller one "
        'only for quick smoke runs (tools/device_check.py on a CPU)',
    )
    common.add_device(parser, 'calibration_speed', "'cpu' (fused kernels) or 'cuda' (the PyTorch path)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available here')
    if args.out is None:
        args.out = common.device_results('calibration_speed', device.type)
    if args.repeats < 1 or args.calib_repeats < 1:
        parser.error('--repeats and --calib-repeats must be at least 1')
    if not osp.isfile(args.image):
        print(f'skipped: image not found: {args.image} (pass --image PATH to a COCO image)')
        return {}

    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import Compose, pseudo_collate

    import mmdet_lrpq
    from mmdet_lrpq.config import QuantConfig
    from mmdet_lrpq.engine.calib_data import batch_input_hw
    from mmdet_lrpq.models import ModelQuantizer
    from mmdet_lrpq.quant import calibrating

    allocator = 'default' if args.default_allocator or device.type != 'cpu' else keep_heap()
    if allocator is None:
        allocator = 'default (not glibc: could not keep the heap mapped)'
    register_all_modules()
    mmdet_lrpq.register_all_modules()

    cfg = Config.fromfile(args.config)
    pipeline = [t for t in cfg.test_dataloader.dataset.pipeline if t['type'] != 'LoadAnnotations']
    if args.scale:
        pipeline = [dict(t, scale=tuple(args.scale)) if t['type'] == 'Resize' else t for t in pipeline]
    batch = pseudo_collate([Compose(pipeline)(dict(img_path=args.image, img_id=0))])

    def build():
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).to(device)
        model.eval()
        with torch.no_grad():
            model.roi_head.bbox_head.fc_cls.bias[0] += 6.0  # see the module docstring
        return model

    # The fused kernels compile on first use after install (~1 min): load them before any timing so
    # that a (re)build is reported on its own instead of inflating the calibration.
    from mmdet_lrpq.quant._ext import kernels

    t0 = time.perf_counter()
    fused = kernels() is not None
    t_load_kernels = time.perf_counter() - t0

    torch.set_grad_enabled(False)
    model_fp = build()
    model_fp.test_step(batch)  # warm-up (allocator, lazy init)
    shape = batch_input_hw(model_fp, batch)

    # The path the hook runs, step by step, on a second copy of the same detector.
    model_q = build()
    settings = QuantConfig(w_bits=4, a_bits=4, method=args.method)
    t0 = time.perf_counter()
    quantizer = ModelQuantizer(model_q, settings)
    quantizer.wrap()
    t_wrap = time.perf_counter() - t0
    t_full = timed(
        lambda: quantizer.calibrate(
            [batch], lambda m, b: m.test_step(b), image_ids=[osp.basename(args.image)], input_shape=shape
        )
    )
    model_q.test_step(batch)  # warm-up, as the float model had

    def calibration_forward() -> float:
        """The calibration forward alone (observers on, quantize-as-you-go), on a fresh wrapped copy."""
        model_c = build()
        ModelQuantizer(model_c, settings).wrap()
        with calibrating(model_c):
            return timed(lambda: model_c.test_step(batch))

    # Float and quantized forwards in back-to-back pairs, ABBA order (float first, then quantized
    # first, ...) so that load changes and whatever one forward leaves behind for the next hit both
    # alike, then the calibration forwards (each allocates and frees far more memory, which would
    # otherwise penalise whichever forward follows it). Page faults are recorded per timed forward
    # (with the default allocator 0.3-0.8 M per forward on this VM, varying with what ran before;
    # with keep_heap ~0 after the warm-up).
    t_float, t_quant, t_bypass, f_float, f_quant, f_bypass = [], [], [], [], [], []
    models = [(t_float, f_float, model_fp, contextlib.nullcontext), (t_quant, f_quant, model_q, contextlib.nullcontext)]
    if args.bypass_quantizers:
        models.append((t_bypass, f_bypass, model_q, lambda: patched_quantizers(bypassing)))
    for i in range(args.repeats):
        for times, faults, model, context in models if i % 2 == 0 else models[::-1]:
            with context():
                times.append(timed(functools.partial(model.test_step, batch), faults))
    runs = dict(
        float_forward_runs_s=t_float,
        quantized_forward_runs_s=t_quant,
        float_forward_page_faults=f_float,
        quantized_forward_page_faults=f_quant,
        calibration_forward_runs_s=[calibration_forward() for _ in range(args.calib_repeats)],
    )
    quantizer_s = quantizer_seconds(lambda: model_q.test_step(batch))
    pair_ratios = [q / f for f, q in zip(t_float, t_quant)]
    if args.bypass_quantizers:
        runs.update(
            quantized_bypassed_forward_runs_s=t_bypass,
            quantized_bypassed_page_faults=f_bypass,
            quant_bypassed_over_fp=statistics.median(b / f for f, b in zip(t_float, t_bypass)),
        )
    t_float, t_quant = statistics.median(t_float), statistics.median(t_quant)
    t_calib_forward = statistics.median(runs['calibration_forward_runs_s'])
    t_full += t_wrap
    totals = quantizer.report.totals
    detections = [len(m.test_step(batch)[0].pred_instances) for m in (model_fp, model_q)]

    res = {
        'image': osp.basename(args.image),
        'input_hw': shape,
        'config': osp.relpath(args.config, REPO),
        'method': args.method,
        'device': str(device),
        'allocator': allocator,
        'threads': torch.get_num_threads(),
        'cpu': platform.processor() or platform.machine(),
        'fused_kernels': fused,
        'fused_kernels_load_s': t_load_kernels,
        'float_forward_s': t_float,
        'repeats': args.repeats,
        'calib_repeats': args.calib_repeats,
        'wrap_s': t_wrap,
        'calibration_forward_s': t_calib_forward,
        'wrap_calibrate_reparam_s': t_full,
        'quantized_forward_s': t_quant,
        'calib_over_fp': t_calib_forward / t_float,
        'wrap_calib_reparam_over_fp': t_full / t_float,
        'quant_over_fp': statistics.median(pair_ratios),
        'quant_over_fp_pairs': pair_ratios,
        'quant_median_over_fp_median': t_quant / t_float,
        'activation_quantizers_s': quantizer_s,
        'activation_quantizers_over_fp': sum(quantizer_s.values()) / t_float,
        **runs,
        'detections_float_quant': detections,
        'quantized_sites': {k: totals[k] for k in ('conv_linear', 'matmul')},
        'command': 'python bench/calibration_speed.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
    }
    print(
        f'Mask R-CNN Swin-T, {res["image"]} at {shape[1]}x{shape[0]}, {res["threads"]} threads, '
        f'W4A4 {args.method}: {totals["conv_linear"]} Conv2d/Linear + {totals["matmul"]} matmuls'
    )
    print(
        f'  fused kernels {"loaded" if fused else "UNAVAILABLE (PyTorch path)"} in {t_load_kernels:.1f} s '
        f'(not counted below); C allocator: {allocator}'
    )
    print(
        f'  float forward                      {t_float:7.2f} s   '
        f'({statistics.median(f_float) / 1e3:.0f} k page faults per forward)'
    )
    print(f'  calibration forward                {t_calib_forward:7.2f} s   ({res["calib_over_fp"]:.2f}x)')
    print(f'  wrap + calibrate + reparameterize  {t_full:7.2f} s   ({res["wrap_calib_reparam_over_fp"]:.2f}x)')
    print(
        f'  quantized forward                  {t_quant:7.2f} s   (medians: {res["quant_median_over_fp_median"]:.2f}x, '
        f'{statistics.median(f_quant) / 1e3:.0f} k page faults per forward)'
    )
    print(
        f'  of which in the activation quantizers {sum(quantizer_s.values()):5.2f} s   '
        f'({res["activation_quantizers_over_fp"]:.3f}x float; uniform {quantizer_s["uniform"]:.3f} s, '
        f'log-sqrt2 {quantizer_s["log_sqrt2"]:.3f} s, one more forward)'
    )
    print(
        f'  quantized / float, per pair        {" ".join(f"{r:.2f}" for r in pair_ratios)}  '
        f'(median {res["quant_over_fp"]:.2f})'
    )
    if args.bypass_quantizers:
        print(
            f'  quantized, quantizers bypassed     {statistics.median(t_bypass):7.2f} s   '
            f'(median per-run ratio to the float forward {runs["quant_bypassed_over_fp"]:.2f}x)'
        )
    common.write_json(args.out, res)
    print(f'calib/fp={res["calib_over_fp"]:.2f} quant/fp={res["quant_over_fp"]:.2f}')
    return res


if __name__ == '__main__':
    main()
