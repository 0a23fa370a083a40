"""Peak memory and time of streamed calibration against the number of calibration images.

    .venv/bin/python bench/calibration_memory.py                       # N = 1..32 streamed, 1..8 one batch
    .venv/bin/python bench/calibration_memory.py --data-root COCO_ROOT # a folder with train2017/ + annotations/
    .venv/bin/python bench/calibration_memory.py --tables-only         # rewrite the table from the JSON

mmdet's Mask R-CNN Swin-T (``configs/mask_rcnn_swin_t_w4a4.py``: W4A4, RepQ-ViT's protocol) with
random weights — no pretrained weights exist here; memory and time do not depend on them — and,
as in ``bench/calibration_speed.py``, its classifier biased towards one class so that ~100
detections reach the mask head, as with a trained detector. Calibration images: real COCO train
images at the test resolution (1333x800), chosen as the hook chooses them (``calib.num_images=N``,
``seed=0``, ``source='train'`` under ``--data-root``), through the hook's ``ModelQuantizer``.

Each row runs in its own fresh process: build the detector, one untimed float forward
(warm-up), a copy of it wrapped and calibrated on the N images (``calib.batch_size``: 1,
streamed, or N, the one-batch calibration of before), reparameterized. Each image also goes
through the float copy right next to its calibration — even images just before, odd ones just
after (ABBA), so that a slow phase of a shared machine hits both alike. Memory: the resident
high-water mark (``VmHWM``) is reset (``5`` into ``/proc/self/clear_refs``) at the start of the
calibration and around every float forward, so the **calibration's own peak** excludes the float
forwards' transient memory (it includes both models' weights, ``float_weights_mb`` each); the
process's peak is the largest mark of its whole life.

Calibration time per image is the streamed loop's wall time (loading the images, the calibration
forwards, combining the ranges; not the float forwards interleaved with it) over N, compared
with the float forward per image on the same images; the calibration forwards alone, and process
CPU seconds (less sensitive to other processes' load), are recorded too. The C allocator is left
as it is (as ``tools/test.py`` runs it). A one-batch row whose peak, extrapolated linearly from
the smaller one-batch rows, would not fit in the memory available is skipped with a note.
``--no-profile`` skips the profile of one calibration forward (:func:`profile`, also in a fresh
process), which says where a calibration forward's time goes beyond the float forward's.

Writes ``results/calibration_memory.json`` and replaces the block between
``<!-- calibration_memory:begin -->`` / ``<!-- calibration_memory:end -->`` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

try:
    from bench import common
except ImportError:  # python bench/calibration_memory.py: bench/ is sys.path[0]
    import common

REPO = common.REPO
DEFAULT_DATA = osp.join(REPO, '..', 'shared', 'data', 'coco_mini')
STREAMED_NS = (1, 2, 4, 8, 16, 32)
ONE_BATCH_NS = (1, 2, 4, 8)
MEMORY_TARGET = 1.3  # peak at the largest N <= this x the peak at N = 1 (streamed)
TIME_TARGET = 1.5  # calibration time per image <= this x one float forward
MARKERS = ('<!-- calibration_memory:begin -->', '<!-- calibration_memory:end -->')
COMMAND = 'python bench/calibration_memory.py'
DOC = common.BENCHMARKS_PAGE


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MB (2^20 bytes)."""
    with open('/proc/self/status') as f:
        line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024


def mem_available_mb() -> float:
    with open('/proc/meminfo') as f:
        return int(next(line for line in f if line.startswith('MemAvailable:')).split()[1]) / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall and process CPU seconds of what runs inside ``with``."""

    def __enter__(self) -> Stopwatch:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, cpu_seconds() - self.cpu0


# ---------------------------------------------------------------------------------- one row
class Peaks:
    """Resident high-water marks of alternating windows (calibration / float forwards) of one process.

    Linux keeps one ``VmHWM``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
    RSS. Reading it at the end of each window and resetting it at the start of the next gives each
    kind of window its own peak."""

    def __init__(self) -> None:
        self.peak: dict[str, float] = {}
        self.process = proc_status_mb('VmHWM')  # imports, model builds, warm-up
        self.start = proc_status_mb('VmRSS')
        self.trace: list[dict] = []  # per window: its kind, RSS at its start, its peak

    def close(self, window: str) -> None:
        """End a window: fold the mark since the last reset into ``window``'s peak; reset."""
        hwm = proc_status_mb('VmHWM')
        self.peak[window] = max(self.peak.get(window, 0.0), hwm)
        self.process = max(self.process, hwm)
        self.trace.append(dict(window=window, start_rss_mb=round(self.start, 1), peak_mb=round(hwm, 1)))
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        self.start = proc_status_mb('VmRSS')


def measure(n: int, batch_size: int, config: str, data_root: str, image_ids: list[int] | None = None) -> dict:
    """One row (see the module docstring), in this process, which must be fresh; ``image_ids``: these
    calibration images instead of the seeded choice of ``n``."""
    import copy

    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate

    import mmdet_lrpq
    from mmdet_lrpq.engine.calib_data import CalibrationImages, CalibSettings, batch_input_hw
    from mmdet_lrpq.engine.hook import QuantizationHook
    from mmdet_lrpq.models import ModelQuantizer
    from mmdet_lrpq.models.quantizer import images_in
    from mmdet_lrpq.quant._ext import kernels
    from mmdet_lrpq.registry import is_quantization_hook

    register_all_modules()
    mmdet_lrpq.register_all_modules()
    torch.set_grad_enabled(False)
    fused = kernels() is not None  # compiled/loaded before anything is timed
    cfg = Config.fromfile(config)
    hook = next(h for h in cfg.custom_hooks if is_quantization_hook(h['type']))
    settings = QuantizationHook(**{k: v for k, v in hook.items() if k != 'type'}).config
    calib = CalibSettings(num_images=n, batch_size=batch_size, seed=0, data_root=data_root, image_ids=image_ids)
    images = CalibrationImages(cfg.test_dataloader.dataset, calib)

    torch.manual_seed(0)
    float_model = MODELS.build(cfg.model)
    float_model.eval()
    float_model.roi_head.bbox_head.fc_cls.bias[0] += 6.0  # see bench/calibration_speed.py
    weights_mb = sum(p.numel() * p.element_size() for p in float_model.parameters()) / 2**20
    first = pseudo_collate([images.dataset[images.indices[0]]])
    float_model.test_step(first)  # warm-up
    input_hw = batch_input_hw(float_model, first)
    model = copy.deepcopy(float_model)

    peaks = Peaks()
    float_runs: dict[int, tuple[float, float, int, list]] = {}  # position -> wall s, CPU s, detections, h x w
    forwards: list[tuple[float, float]] = []
    in_float = [0.0]  # generator time spent on float forwards

    def float_forward(position: int) -> None:
        t0 = time.perf_counter()
        peaks.close('calibration')
        batch = pseudo_collate([images.dataset[images.indices[position]]])
        with Stopwatch() as watch:
            out = float_model.test_step(batch)
        float_runs[position] = (watch.wall, watch.cpu, len(out[0].pred_instances), list(out[0].img_shape))
        peaks.close('float')
        in_float[0] += time.perf_counter() - t0

    def batches() -> Iterator[dict]:
        """The calibration batches, with each image's float forward next to its calibration:
        even images just before, odd ones just after (ABBA order)."""
        position = 0
        for batch in images.batches():
            size = len(batch['inputs'])
            for p in range(position, position + size):
                if p % 2 == 0:
                    float_forward(p)
            yield batch
            for p in range(position, position + size):
                if p % 2 == 1:
                    float_forward(p)
            position += size

    def run(m: torch.nn.Module, batch: dict) -> Any:
        with Stopwatch() as watch:
            out = m.test_step(batch)
        forwards.append((watch.wall, watch.cpu))
        return out

    load_before = os.getloadavg()
    quantizer = ModelQuantizer(model, settings)
    with Stopwatch() as whole:
        report = quantizer.calibrate(
            batches(), run, images_in=images_in, image_ids=images.ids, batch_size=batch_size, input_shape=input_hw
        )
    peaks.close('calibration')
    calibration_s = report.calibration['seconds'] - in_float[0]
    n = len(images)
    float_wall = [float_runs[p][0] for p in range(n)]
    float_cpu = [float_runs[p][1] for p in range(n)]
    return dict(
        n=n,
        batch_size=batch_size,
        image_ids=images.ids,
        input_hw_first=list(input_hw),
        detections_per_image=[float_runs[p][2] for p in range(n)],
        image_hw=[float_runs[p][3] for p in range(n)],
        threads=torch.get_num_threads(),
        fused_kernels=fused,
        float_weights_mb=round(weights_mb, 1),
        calibration_peak_mb=round(peaks.peak['calibration'], 1),
        float_forward_peak_mb=round(peaks.peak['float'], 1),
        process_peak_mb=round(peaks.process, 1),
        calibration_s=round(calibration_s, 2),
        wrap_calibrate_reparam_s=round(whole.wall - in_float[0], 2),
        calibration_per_image_s=calibration_s / n,
        calibration_forward_s=[w for w, _ in forwards],
        calibration_forward_cpu_s=[c for _, c in forwards],
        float_forward_s=float_wall,
        float_forward_cpu_s=float_cpu,
        float_per_image_s=statistics.fmean(float_wall),
        calib_over_float=calibration_s / sum(float_wall),
        calib_forward_over_float=sum(w for w, _ in forwards) / sum(float_wall),
        calib_forward_cpu_over_float_cpu=sum(c for _, c in forwards) / sum(float_cpu),
        loadavg_before=list(load_before),
        loadavg_after=list(os.getloadavg()),
        memory_windows=peaks.trace,
        calibration_report=report.calibration,
    )


# ---------------------------------------------------------------------------------- profile
def profile(config: str, data_root: str, repeats: int = 3) -> dict:
    """Where a calibration forward's time goes beyond a float forward's (first calibration image).

    ``repeats`` times, interleaved: a float forward, then a calibration forward on a freshly
    wrapped copy, with the quantizer work timed by wrappers: activation calibration (of which the
    quantile extraction; the rest is the percentile candidates' MSE), weight calibration and weight
    fake-quant (weights are quantized from the start, so inside the calibration forward), activation
    fake-quant, each per site. Medians over the repeats; the rest of the calibration forward is the
    layers' own float work.
    """
    import copy

    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate

    import mmdet_lrpq
    from mmdet_lrpq.engine.calib_data import CalibrationImages, CalibSettings
    from mmdet_lrpq.engine.hook import QuantizationHook
    from mmdet_lrpq.models import ModelQuantizer
    from mmdet_lrpq.quant import calibrating, functional, modules
    from mmdet_lrpq.quant._ext import kernels
    from mmdet_lrpq.registry import is_quantization_hook

    register_all_modules()
    mmdet_lrpq.register_all_modules()
    torch.set_grad_enabled(False)
    kernels()
    cfg = Config.fromfile(config)
    hook = next(h for h in cfg.custom_hooks if is_quantization_hook(h['type']))
    settings = QuantizationHook(**{k: v for k, v in hook.items() if k != 'type'}).config
    images = CalibrationImages(cfg.test_dataloader.dataset, CalibSettings(num_images=1, seed=0, data_root=data_root))
    batch = pseudo_collate([images.dataset[images.indices[0]]])
    torch.manual_seed(0)
    float_model = MODELS.build(cfg.model)
    float_model.eval()
    float_model.roi_head.bbox_head.fc_cls.bias[0] += 6.0
    float_model.test_step(batch)  # warm-up

    names: dict[int, str] = {}
    spent: dict[tuple[str, str], float] = {}

    def timing(kind: Callable[[Any], str], original: Callable) -> Callable:
        def timed_call(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            key = (kind(self), names.get(id(self), '?'))
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
            return out

        return timed_call

    def quantile_timing(original: Callable) -> Callable:
        def timed_quantiles(rows, qs):
            t0 = time.perf_counter()
            out = original(rows, qs)
            spent[('quantiles', current[-1])] = spent.get(('quantiles', current[-1]), 0.0) + time.perf_counter() - t0
            return out

        return timed_quantiles

    current = ['?']

    def calibrate_kind(q) -> str:
        return 'weight qparams' if names.get(id(q), '').endswith('weight_quantizer') else 'activation qparams'

    def tracked(original: Callable) -> Callable:
        def calibrate_tracked(self, x):
            current.append(names.get(id(self), '?'))
            try:
                return original(self, x)
            finally:
                current.pop()

        return calibrate_tracked

    patches = [
        (modules.UniformQuantizer, 'calibrate', lambda f: timing(calibrate_kind, tracked(f))),
        (modules.LogSqrt2Quantizer, 'calibrate', lambda f: timing(calibrate_kind, tracked(f))),
        (
            modules.UniformQuantizer,
            'forward',
            lambda f: timing(
                lambda q: 'weight fake-quant' if calibrate_kind(q) == 'weight qparams' else 'activation fake-quant', f
            ),
        ),
        (modules.LogSqrt2Quantizer, 'forward', lambda f: timing(lambda q: 'activation fake-quant', f)),
        (functional, 'quantiles', quantile_timing),
    ]
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float_model.test_step(batch)
        t_float = time.perf_counter() - t0
        model = copy.deepcopy(float_model)
        ModelQuantizer(model, settings).wrap()
        names.clear()
        names.update({id(m): name for name, m in model.named_modules()})
        spent.clear()
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for (owner, attr, wrap), (_, _, original) in zip(patches, saved):
            setattr(owner, attr, wrap(original))
        try:
            t0 = time.perf_counter()
            with calibrating(model):
                model.test_step(batch)
            t_calib = time.perf_counter() - t0
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)
        runs.append((t_float, t_calib, dict(spent)))
        del model
    float_s = statistics.median(r[0] for r in runs)
    calib_s = statistics.median(r[1] for r in runs)
    keys = sorted({k for r in runs for k in r[2]})
    per_key = {k: statistics.median(r[2].get(k, 0.0) for r in runs) for k in keys}
    kinds = sorted({k for k, _ in keys})
    by_kind = {kind: sum(v for (k, _), v in per_key.items() if k == kind) for kind in kinds}
    sites = sorted({s for _, s in keys})
    site_total = {s: sum(v for (k, site), v in per_key.items() if site == s and k != 'quantiles') for s in sites}
    top = sorted(site_total.items(), key=lambda kv: -kv[1])[:12]
    return dict(
        image_id=images.ids[0],
        repeats=repeats,
        float_forward_s=float_s,
        calibration_forward_s=calib_s,
        runs=[dict(float_s=f, calibration_s=c) for f, c, _ in runs],
        by_kind_s=by_kind,
        top_sites_s=[dict(site=s, seconds=v, **{k: per_key.get((k, s), 0.0) for k in kinds}) for s, v in top],
        per_site_s={f'{k} | {s}': v for (k, s), v in per_key.items()},
    )


# ---------------------------------------------------------------------------------- driver
def fits(n: int, rows: list[dict], margin_mb: float = 2048) -> str | None:
    """None if a one-batch row of ``n`` images should fit in memory, else why it is skipped.

    Extrapolates the calibration peak linearly from the largest two one-batch rows already measured."""
    done = sorted((r['n'], r['calibration_peak_mb']) for r in rows if r['batch_size'] == r['n'] and r['n'] > 1)
    if len(done) < 2:
        return None
    (n0, p0), (n1, p1) = done[-2:]
    predicted = p1 + (p1 - p0) / (n1 - n0) * (n - n1)
    available = mem_available_mb()
    if predicted + margin_mb <= available:
        return None
    return (
        f'skipped: one batch of {n} would peak at about {predicted / 1024:.1f} GB (extrapolated from '
        f'N = {n0}, {n1}), {available / 1024:.1f} GB available'
    )


def run_row(mode: list[str], name: str, args: argparse.Namespace) -> dict:
    """``measure`` (or ``profile``) in a fresh process; its JSON."""
    out = osp.join(args.work_dir, f'{name}.json')
    cmd = [
        sys.executable,
        osp.abspath(__file__),
        *mode,
        '--config',
        args.config,
        '--data-root',
        args.data_root,
        '--single-out',
        out,
    ]
    with open(osp.join(args.work_dir, f'{name}.log'), 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f'{name} failed (exit {proc.returncode}); see {log.name}')
    return json.load(open(out))


def padded_area(hw: list[int], divisor: int = 32) -> int:
    """Pixels of the network input an image of (resized) ``hw`` becomes: padded to multiples of 32."""
    return math.prod(-(-side // divisor) * divisor for side in hw)


def pair_ratio(row: dict) -> float | None:
    """Median over the images of calibration forward / float forward of the same image (streamed rows):
    robust to a slow phase of a shared machine that hits a few pairs."""
    if row['batch_size'] != 1:
        return None
    return statistics.median(c / f for c, f in zip(row['calibration_forward_s'], row['float_forward_s']))


def rows_table(rows: list[dict]) -> str:
    """One line per row: memory, time per image, ratios."""
    lines = [
        '| calibration | N | peak RSS, calibration (MB) | peak RSS, process (MB) | × N=1 | '
        'calibration per image (s) | float forward per image (s) | calibration / float | '
        'median per-image pair ratio |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    base = next(
        (r for r in rows if r['n'] == 1 and r['batch_size'] == 1 and not r.get('control') and not r.get('skipped')),
        None,
    )
    for r in rows:
        kind = (
            'largest image alone'
            if r.get('control')
            else 'one image'
            if r['n'] == 1
            else 'streamed'
            if r['batch_size'] == 1
            else f'one batch of {r["n"]}'
        )
        if r.get('skipped'):
            lines.append(f'| {kind} | {r["n"]} | {r["skipped"]} | | | | | | |')
            continue
        rel = f'{r["calibration_peak_mb"] / base["calibration_peak_mb"]:.2f}' if base else '—'
        pair = pair_ratio(r)
        lines.append(
            f'| {kind} | {r["n"]} | {r["calibration_peak_mb"]:.0f} | {r["process_peak_mb"]:.0f} | {rel} | '
            f'{r["calibration_per_image_s"]:.2f} | {r["float_per_image_s"]:.2f} | '
            f'**{r["calib_over_float"]:.2f}** | {"—" if pair is None else f"{pair:.2f}"} |'
        )
    return '\n'.join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The two targets judged on the streamed rows: peak at the largest N, time per image."""
    streamed = [r for r in rows if r['batch_size'] == 1 and not r.get('skipped') and not r.get('control')]
    if not streamed:
        return []
    first, last = streamed[0], streamed[-1]
    memory = last['calibration_peak_mb'] / first['calibration_peak_mb']
    worst = max(streamed, key=lambda r: r['calib_over_float'])
    return [
        f'- Peak memory at N = {last["n"]} ≤ {MEMORY_TARGET} × N = {first["n"]}: '
        f'{last["calibration_peak_mb"]:.0f} / {first["calibration_peak_mb"]:.0f} MB = {memory:.2f}: '
        + ('**met**' if memory <= MEMORY_TARGET else '**missed**'),
        f'- Calibration time per image ≤ {TIME_TARGET} float forwards: '
        f'{min(r["calib_over_float"] for r in streamed):.2f}–{worst["calib_over_float"]:.2f} over the streamed rows '
        f'(worst N = {worst["n"]}): ' + ('**met**' if worst['calib_over_float'] <= TIME_TARGET else '**missed**'),
    ]


def profile_table(prof: dict) -> str:
    """Where one calibration forward's time goes: the quantizers' parts, the rest, and the top sites."""
    float_s, calib_s = prof['float_forward_s'], prof['calibration_forward_s']

    def part(kind: str, weight: bool) -> float:
        return sum(
            v
            for key, v in prof['per_site_s'].items()
            if key.startswith(kind + ' | ') and key.endswith('weight_quantizer') == weight
        )

    parts = [
        ('activation ranges: quantile extraction', part('quantiles', False)),
        (
            'activation ranges: the rest (MSE of the 3 candidates, selection)',
            part('activation qparams', False) - part('quantiles', False),
        ),
        ('activation fake-quant', part('activation fake-quant', False)),
        ('weight ranges (once per calibration, not per image)', part('weight qparams', True)),
        ('weight fake-quant (once per calibration)', part('weight fake-quant', True)),
    ]
    lines = [
        f'| one forward on image {prof["image_id"]} (median of {prof["repeats"]}) | seconds | × float forward |',
        '|---|---|---|',
        f'| float forward | {float_s:.2f} | 1.00 |',
        f'| calibration forward | {calib_s:.2f} | {calib_s / float_s:.2f} |',
    ]
    lines += [f'| of which {name} | {v:.2f} | {v / float_s:.3f} |' for name, v in parts]
    rest = calib_s - sum(v for _, v in parts)
    lines.append(f"| of which the layers' own work and everything else | {rest:.2f} | {rest / float_s:.2f} |")
    lines += [
        '',
        '| site (largest quantizer time in the calibration forward) | ranges (s) | of which quantiles (s) | '
        'fake-quant (s) |',
        '|---|---|---|---|',
    ]
    for site in prof['top_sites_s'][:8]:
        ranges = site.get('activation qparams', 0.0) + site.get('weight qparams', 0.0)
        fq = site.get('activation fake-quant', 0.0) + site.get('weight fake-quant', 0.0)
        lines.append(f'| `{site["site"]}` | {ranges:.3f} | {site.get("quantiles", 0.0):.3f} | {fq:.3f} |')
    return '\n'.join(lines)


def tables(report: dict) -> str:
    rows = report['rows']
    out = [rows_table(rows), '', *targets(rows), '']
    if report.get('profile'):
        out += [
            '**Where the time of one calibration forward goes** (`profile` in the JSON)',
            '',
            profile_table(report['profile']),
            '',
        ]
    return '\n'.join(out)


def write_tables(report: dict, args: argparse.Namespace) -> None:
    markdown = tables(report)
    common.publish(markdown, osp.join(REPO, DOC), MARKERS, COMMAND, update=not args.no_doc)


def main(argv: list[str] | None = None) -> None:
    parser = common.parser(__doc__)
    parser.add_argument(
        '--data-root', default=DEFAULT_DATA, help='COCO root with train2017/ and annotations/instances_train2017.json'
    )
    parser.add_argument('--config', default=osp.join(REPO, 'configs', 'mask_rcnn_swin_t_w4a4.py'))
    parser.add_argument('--ns', type=int, nargs='+', default=list(STREAMED_NS), help='streamed rows (batch 1)')
    parser.add_argument(
        '--one-batch-ns',
        type=int,
        nargs='+',
        default=list(ONE_BATCH_NS),
        help='one-batch rows (batch_size = N); skipped when they would not fit in memory',
    )
    common.add_outputs(parser, 'calibration_memory', block='table')
    parser.add_argument(
        '--no-profile', action='store_true', help='skip the profile of one calibration forward (where its time goes)'
    )
    parser.add_argument('--single', type=int, nargs=2, metavar=('N', 'BATCH_SIZE'), help=argparse.SUPPRESS)
    parser.add_argument('--single-out', help=argparse.SUPPRESS)
    parser.add_argument('--single-ids', type=int, nargs='+', help=argparse.SUPPRESS)
    parser.add_argument('--profile-only', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tables_only:
        return write_tables(common.saved_results(args.out, COMMAND), args)
    if args.single or args.profile_only:
        row = (
            profile(args.config, args.data_root)
            if args.profile_only
            else measure(*args.single, args.config, args.data_root, image_ids=args.single_ids)
        )
        with open(args.single_out, 'w') as f:
            json.dump(row, f, indent=1)
        return
    ann = osp.join(args.data_root, 'annotations', 'instances_train2017.json')
    if not (osp.isfile(ann) and osp.isdir(osp.join(args.data_root, 'train2017'))):
        print(
            f'skipped: no COCO train images at {args.data_root} (needs train2017/ and {ann}); '
            f'pass --data-root COCO_ROOT'
        )
        return
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.time()
    rows: list[dict] = []

    def log(row: dict, why: str | None = None) -> None:
        print(
            f'[{time.time() - start:5.0f}s] N={row["n"]} batch_size={row["batch_size"]}: '
            + (
                why
                or f'peak {row["calibration_peak_mb"]:.0f} MB (process {row["process_peak_mb"]:.0f} MB), '
                f'{row["calibration_per_image_s"]:.2f} s/image, float {row["float_per_image_s"]:.2f} s, '
                f'ratio {row["calib_over_float"]:.2f}'
            ),
            flush=True,
        )

    for n in args.ns:
        rows.append(run_row(['--single', str(n), '1'], f'n{n}_b1', args))
        log(rows[-1])
    # Control: the largest image of the largest streamed set, alone. The streamed peak is the
    # largest image's peak if streaming holds memory flat; more than that is memory that grows with N.
    largest = rows[-1]['image_ids'][max(range(rows[-1]['n']), key=lambda i: padded_area(rows[-1]['image_hw'][i]))]
    rows.append(
        dict(
            run_row(['--single', '1', '1', '--single-ids', str(largest)], 'n1_largest', args),
            control=f'the largest image of the N={rows[-1]["n"]} set, alone',
        )
    )
    log(rows[-1])
    for n in (n for n in args.one_batch_ns if n > 1):
        why = fits(n, rows)
        rows.append(
            dict(n=n, batch_size=n, skipped=why) if why else run_row(['--single', str(n), str(n)], f'n{n}_b{n}', args)
        )
        log(rows[-1], why)
    report = dict(
        command=' '.join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        config=osp.relpath(args.config, REPO),
        data_root=args.data_root,
        seconds=round(time.time() - start, 1),
        machine=dict(
            cpu=common.cpu_name(),
            cpus=os.cpu_count(),
            python=platform.python_version(),
            mem_total_gb=round(_mem_total_mb() / 1024, 1),
        ),
        targets=dict(
            memory=f'peak at N={max(args.ns)} <= {MEMORY_TARGET} x N=1',
            time=f'calibration per image <= {TIME_TARGET} float forwards',
        ),
        rows=rows,
        profile=None if args.no_profile else run_row(['--profile-only'], 'profile', args),
    )
    common.write_json(args.out, report)
    write_tables(report, args)


def _mem_total_mb() -> float:
    with open('/proc/meminfo') as f:
        return int(next(line for line in f if line.startswith('MemTotal:')).split()[1]) / 1024


if __name__ == '__main__':
    main()
