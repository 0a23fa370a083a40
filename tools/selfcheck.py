"""A user's first minute on a new machine: does the stack work, and does quantization work on each device?

    python tools/selfcheck.py            # every device torch sees: cpu, and cuda when available
    python tools/selfcheck.py --quick    # under a minute on 2 CPU cores (fewer images and timings)
    python tools/selfcheck.py --device cuda --json selfcheck.json

It prints the stack (versions, mmcv's ops: CPU or CUDA, the fused CPU kernels: on or off and why),
then on each device quantizes the bundled miniature-world Mask R-CNN
(``configs/miniworld/mask_rcnn_swin_mini_quant.py``: CRL W4A4, one calibration image) with
``init_quantized_detector``, evaluates it and the float model on the first val images with mmdet's
``CocoMetric`` (on an annotation file of exactly those images), and prints one line per device:
box/mask AP (quantized, float in brackets), calibration time, the quantized/float forward-time ratio
(median of interleaved forwards), and the largest difference of the quantized model's detection
scores and FPN features from the CPU run on the same images (under torch's default precision
settings, as evaluation runs: cuDNN convolutions may use TF32). The data is generated into a temporary
folder (seconds) unless ``--data`` points at a miniature world. Exit status 1 on any failure, with
its reason: a broken stack, a missing or unfitting checkpoint, missing data, a device that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import os.path as osp
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# torch and MMDetection are imported inside the functions: the stack is printed and checked first,
# so a broken install is reported as such instead of failing at an import here.

QUANT_CONFIG = osp.join(REPO, 'configs', 'miniworld', 'mask_rcnn_swin_mini_quant.py')
FLOAT_CONFIG = osp.join(REPO, 'configs', 'miniworld', 'mask_rcnn_swin_mini.py')
CHECKPOINT = osp.join(REPO, 'checkpoints', 'miniworld', 'mask_rcnn_swin_mini.pth')
CALIB_IMAGES = 8  # the calib split's size in the full world: the seeded calibration pick is the same image


@dataclass(frozen=True)
class Effort:
    """How much work one device's check does."""

    val_images: int
    timed_forwards: int  # of each model, interleaved, after one warm-up forward each


FULL, QUICK = Effort(val_images=16, timed_forwards=5), Effort(val_images=4, timed_forwards=3)


class CheckError(Exception):
    """An expected failure: its message says what is wrong and what to do."""


@dataclass
class DeviceResult:
    device: str
    ok: bool = False
    error: str | None = None
    box_ap: float | None = None
    mask_ap: float | None = None
    float_box_ap: float | None = None
    float_mask_ap: float | None = None
    calibration_seconds: float | None = None
    quantize_seconds: float | None = None  # init_quantized_detector: build, load, calibrate, reparameterize
    forward_ratio: float | None = None
    forward_ms: dict = field(default_factory=dict)
    diff_vs_cpu: dict | None = None

    def line(self) -> str:
        if not self.ok:
            return f'{self.device:>4}: FAILED: {self.error}'
        diff = (
            '-'
            if self.diff_vs_cpu is None
            else (
                f'scores {self.diff_vs_cpu["scores"]:.1e}, features {self.diff_vs_cpu["features"]:.1e} (relative)'
                + ('' if self.diff_vs_cpu['same_counts'] else ', detection counts differ')
            )
        )
        return (
            f'{self.device:>4}: box AP {self.box_ap:5.1f} (float {self.float_box_ap:5.1f})  '
            f'mask AP {self.mask_ap:5.1f} (float {self.float_mask_ap:5.1f})  '
            f'calibration {self.calibration_seconds:.1f}s  quantized/float forward {self.forward_ratio:.2f}x  '
            f'max diff vs cpu: {diff}'
        )


# ----------------------------------------------------------------------------------------- stack
def fused_kernels_status() -> dict:
    """Whether the fused CPU kernels load, and why not (compiling them on first use takes a minute)."""
    from mmdet_lrpq.quant import _ext

    if os.environ.get('MMDET_LRPQ_NO_EXT', '') not in ('', '0'):
        return dict(on=False, why=f'MMDET_LRPQ_NO_EXT={os.environ["MMDET_LRPQ_NO_EXT"]} forces the PyTorch path')
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        module = _ext.kernels()
    seconds = time.perf_counter() - start
    if module is None:
        why = next((str(w.message) for w in caught if 'kernels unavailable' in str(w.message)), 'they did not build')
        return dict(on=False, why=why)
    built = f'; compiled now in {seconds:.0f}s' if seconds > 5 else ''
    return dict(on=True, why=f'built in {_ext.build_dir()}{built}')


def check_stack() -> dict:
    """Print the stack; raise :class:`CheckError` when it cannot run mmdet-lrpq."""
    from mmdet_lrpq.env import print_and_check

    report, error = print_and_check()
    if error is not None:
        raise CheckError(str(error)) from None
    kernels = fused_kernels_status()
    print(
        f'{"lrpq kernels":>12}: fused CPU quantization kernels {"on" if kernels["on"] else "off"} '
        f'({kernels["why"]}); other devices take the PyTorch path'
    )
    return dict(report, fused_kernels=kernels)


def devices_to_check(choice: str, stack: dict) -> list[str]:
    import torch

    if choice == 'cpu':
        return ['cpu']
    if not torch.cuda.is_available():
        if choice == 'cuda':
            raise CheckError(
                f'--device cuda: torch {torch.__version__} sees no CUDA device '
                f'({stack.get("cuda_error") or "torch.cuda.is_available() is False"}); check nvidia-smi '
                f'and that the driver supports CUDA {torch.version.cuda or "(CPU-only torch build)"}'
            )
        return ['cpu']
    return ['cuda'] if choice == 'cuda' else ['cpu', 'cuda']


# ------------------------------------------------------------------------------------------ data
def prepare_data(data: str | None, work: str, n_val: int) -> tuple[str, str]:
    """(data root, annotation file of exactly the first ``n_val`` val images, written under ``work``)."""
    if data is None:
        from mmdet_lrpq.miniworld import generate

        data = osp.join(work, 'world')
        generate(data, seed=0, sizes=dict(train=0, val=n_val, calib=CALIB_IMAGES, cls_train=0, cls_val=0))
    needed = [
        osp.join(data, p)
        for p in ('annotations/instances_val.json', 'val', 'annotations/instances_calib.json', 'calib')
    ]
    missing = [p for p in needed if not osp.exists(p)]
    if missing:
        raise CheckError(
            f'--data {data} is not a miniature world: {", ".join(missing)} missing (make one with '
            f'`python tools/miniworld/generate.py --out DIR`, or omit --data to generate one)'
        )
    with open(osp.join(data, 'annotations', 'instances_val.json')) as f:
        coco = json.load(f)
    images = sorted(coco['images'], key=lambda image: image['id'])[:n_val]
    if len(images) < n_val:
        raise CheckError(f'--data {data}: its val split has {len(images)} images, the check needs {n_val}')
    ids = {image['id'] for image in images}
    subset = dict(coco, images=images, annotations=[a for a in coco['annotations'] if a['image_id'] in ids])
    ann_file = osp.join(work, f'instances_val_first{n_val}.json')
    with open(ann_file, 'w') as f:
        json.dump(subset, f)
    return data, ann_file


def data_options(root: str, ann_file: str) -> dict:
    """The test set and its evaluator on exactly the chosen images, loaded in this process."""
    return {
        'test_dataloader.dataset.data_root': root.rstrip('/') + '/',
        'test_dataloader.dataset.ann_file': ann_file,
        'test_dataloader.num_workers': 0,
        'test_dataloader.persistent_workers': False,
        'test_evaluator.ann_file': ann_file,
    }


# ---------------------------------------------------------------------------------------- models
def load_float_model(checkpoint: str, options: dict):
    """The float detector on the CPU, refusing a checkpoint that does not fit it, with the reason."""
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint

    import mmdet_lrpq
    from mmdet_lrpq.engine import check_checkpoint_fits

    mmdet_lrpq.register_all_modules()
    cfg = Config.fromfile(FLOAT_CONFIG)
    cfg.merge_from_dict(options)
    with relayed_warnings():
        model = init_detector(cfg, None, device='cpu')
    try:
        check_checkpoint_fits(model, checkpoint)
    except ValueError as err:
        raise CheckError(str(err)) from None
    load_checkpoint(model, checkpoint, map_location='cpu', logger='silent')
    return model.eval()


@contextlib.contextmanager
def relayed_warnings() -> Iterator[None]:
    """Warnings shown after the block, except mmdet's "checkpoint is None, use COCO classes" of a model
    built before its checkpoint is loaded (mmdet resets the warning filters to show it, so recording
    is the only way to drop it)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if 'checkpoint is None' not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def synchronize(device: str) -> None:
    import torch

    if device == 'cuda':
        torch.cuda.synchronize()


def evaluate(model, cfg) -> tuple[dict, list]:
    """COCO box/mask AP (percent) of ``model`` on the test set of ``cfg``, and its predictions (on the CPU)."""
    import torch
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner

    loader = Runner.build_dataloader(cfg.test_dataloader)
    evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = loader.dataset.metainfo
    predictions = []
    with torch.no_grad():
        for batch in loader:
            outputs = model.test_step(batch)
            evaluator.process(data_samples=outputs, data_batch=batch)
            predictions += [o.pred_instances.scores.cpu() for o in outputs]
    metrics = evaluator.evaluate(len(loader.dataset))
    return {'box': 100 * metrics['coco/bbox_mAP'], 'mask': 100 * metrics['coco/segm_mAP']}, predictions


def first_batch(cfg) -> dict:
    from mmengine.runner import Runner

    return next(iter(Runner.build_dataloader(cfg.test_dataloader)))


def forward_times(float_model, quant_model, batch: dict, device: str, n: int) -> dict[str, list[float]]:
    """Seconds per ``test_step`` of each model, interleaved (so that load from other jobs hits both alike)."""
    import torch

    times: dict[str, list[float]] = {'float': [], 'quantized': []}
    with torch.no_grad():
        for model in (float_model, quant_model):  # warm-up: lazy initialization, cuDNN's choices
            model.test_step(batch)
        for _ in range(n):
            for name, model in (('float', float_model), ('quantized', quant_model)):
                synchronize(device)
                start = time.perf_counter()
                model.test_step(batch)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def fpn_features(model, batch: dict) -> list:
    import torch

    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        return [f.cpu() for f in model.extract_feat(data['inputs'])]


def difference(got: dict, want: dict) -> dict:
    """Largest difference of a device's quantized outputs from the CPU's: detection scores (each image's
    sorted scores, over the detections both have) and FPN features (relative to the CPU's largest value)."""
    scores, same = 0.0, True
    for a, b in zip(got['scores'], want['scores']):
        n = min(len(a), len(b))
        same = same and len(a) == len(b)
        if n:
            scores = max(scores, (a.sort(descending=True)[0][:n] - b.sort(descending=True)[0][:n]).abs().max().item())
    features = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(got['features'], want['features']))
    return {'scores': scores, 'features': features, 'same_counts': same}


def check_device(
    device: str, float_cpu, checkpoint: str, options: dict, effort: Effort, cpu_outputs: dict | None
) -> tuple[DeviceResult, dict]:
    """Quantize, evaluate and time on ``device``; returns the result and the quantized model's outputs."""
    import copy

    from mmengine.config import Config

    from mmdet_lrpq.apis import init_quantized_detector
    from mmdet_lrpq.env import stack_report

    result = DeviceResult(device)
    stack = stack_report()
    if device == 'cuda' and stack.get('mmcv_ops_backend') == 'compiled' and not stack.get('mmcv_ops_cuda'):
        raise CheckError(
            "mmcv's ops were built for the CPU only, so RoIAlign and NMS cannot run on CUDA tensors: "
            'use the torchvision backend (MMDET_LRPQ_MMCV_OPS=torchvision, or mmcv-lite: '
            'docs/install.md, section 2), rebuild mmcv with CUDA ops (section 3), or check with '
            '--device cpu'
        )
    cfg = Config.fromfile(QUANT_CONFIG)
    cfg.merge_from_dict(options)
    float_model = copy.deepcopy(float_cpu).to(device)
    start = time.perf_counter()
    with relayed_warnings():
        quant_model = init_quantized_detector(QUANT_CONFIG, checkpoint, device=device, cfg_options=options)
    result.quantize_seconds = time.perf_counter() - start
    result.calibration_seconds = quant_model.quantization_report.calibration['seconds']
    (fp, _), (q, scores) = evaluate(float_model, cfg), evaluate(quant_model, cfg)
    if not fp['box'] > 0:
        raise CheckError(
            f'the float model scored box AP {fp["box"]:.1f} on {device}: its checkpoint or the data '
            f'is broken (the trained miniature-world detector scores well above 0)'
        )
    result.float_box_ap, result.float_mask_ap = fp['box'], fp['mask']
    result.box_ap, result.mask_ap = q['box'], q['mask']
    batch = first_batch(cfg)
    times = forward_times(float_model, quant_model, batch, device, effort.timed_forwards)
    result.forward_ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    result.forward_ratio = statistics.median(times['quantized']) / statistics.median(times['float'])
    outputs = {'scores': scores, 'features': fpn_features(quant_model, batch)}
    if cpu_outputs is not None:
        result.diff_vs_cpu = difference(outputs, cpu_outputs)
    result.ok = True
    return result, outputs


def describe_failure(err: BaseException) -> str:
    """The reason of a device's failure, and where it happened unless it is an expected one."""
    if isinstance(err, CheckError):
        return str(err)
    message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f'{type(err).__name__}: {message[:400]} (at {frame.filename}:{frame.lineno} in {frame.name})'


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--quick',
        action='store_true',
        help=f'{QUICK.val_images} val images and {QUICK.timed_forwards} timed forwards per model '
        f'(default {FULL.val_images} and {FULL.timed_forwards}): under a minute on 2 CPU cores',
    )
    parser.add_argument(
        '--device',
        choices=['cpu', 'cuda', 'all'],
        default='all',
        help='where to check (default: every available device)',
    )
    parser.add_argument('--data', help='an existing miniature world (default: generate one in a temporary folder)')
    parser.add_argument('--checkpoint', default=CHECKPOINT, help='the miniature-world Mask R-CNN checkpoint')
    parser.add_argument(
        '--threads',
        type=int,
        help="torch CPU threads (default: 1 with --quick, else torch's own): "
        'on cores that other jobs keep busy, multi-threaded kernels wait for each other and one '
        'thread is several times faster',
    )
    parser.add_argument('--json', help='write the stack and the results there')
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads must be at least 1, got {args.threads}')
    return args


def quiet_logs() -> None:
    """The check's lines only: mmengine's logger (CocoMetric, the quantization table) at warnings."""
    from mmengine.logging import MMLogger

    MMLogger.get_instance('mmdet_lrpq_selfcheck', log_level='WARNING')  # the current instance from now on
    logging.getLogger('mmdet_lrpq').setLevel(logging.WARNING)


def run(args: argparse.Namespace, out: dict) -> bool:
    from mmdet_lrpq.safe_load import require_checkpoint

    effort = QUICK if args.quick else FULL
    out['stack'] = check_stack()
    devices = devices_to_check(args.device, out['stack'])
    import torch

    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        torch.set_num_threads(threads)
    print(f'{"devices":>12}: {", ".join(devices)} (CPU threads: {torch.get_num_threads()})')
    try:
        require_checkpoint(args.checkpoint)  # before anything slow
    except FileNotFoundError as err:
        raise CheckError(str(err)) from None
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix='mmdet_lrpq_selfcheck_') as work:
        root, ann_file = prepare_data(args.data, work, effort.val_images)
        options = data_options(root, ann_file)
        float_cpu = load_float_model(args.checkpoint, options)
        print(
            f'\nminiature-world Mask R-CNN, CRL W4A4, 1 calibration image; {effort.val_images} val images '
            f'of {root}; AP in %, float in brackets'
        )
        results: list[DeviceResult] = []
        cpu_outputs: dict | None = None
        for device in devices:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress at every annotation load
                    result, outputs = check_device(device, float_cpu, args.checkpoint, options, effort, cpu_outputs)
                if device == 'cpu':
                    cpu_outputs = outputs
            except Exception as err:
                result = DeviceResult(device, error=describe_failure(err))
            results.append(result)
            print(result.line(), flush=True)
    out['results'] = [asdict(r) for r in results]
    return all(r.ok for r in results)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    warnings.filterwarnings('ignore', 'pkg_resources is deprecated')  # mmengine's import, harmless
    out: dict[str, Any] = {'args': vars(args)}
    try:
        ok = run(args, out)
        failed = [r['device'] for r in out['results'] if not r['ok']]
        verdict = 'passed' if ok else f'FAILED on {", ".join(failed)}: see the reason on its line above'
    except CheckError as err:
        ok, verdict = False, f'FAILED: {err}'
    out.update(ok=ok, seconds=round(time.perf_counter() - start, 1))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1, default=str)
    sys.stdout.flush()  # the lines above come first, also when both streams go to one pipe
    print(f'\nselfcheck {verdict} ({out["seconds"]:.0f}s)', file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
