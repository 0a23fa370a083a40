"""Processes: each project tool as its own process, a cell's tools/test.py run and the record made of
it, and the GPU slots that keep one cell's process on one GPU."""

from __future__ import annotations

import json
import os
import os.path as osp
import queue
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .common import REPO, rel, show, write_atomic

if TYPE_CHECKING:
    from .cells import Job


def run_tool(cmd: list[str], log_path: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """One project tool as its own process (their command lines are the stable interface)."""
    if log_path is None:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    with open(log_path, 'w') as log:
        return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def execute(job: Job, threads: int | None, gpu: str | None = None) -> dict:
    """Run the cell's tools/test.py; its record (numbers, quantization report, command, inputs' digest).

    ``gpu``: the one GPU the cell's process may see (CUDA_VISIBLE_DEVICES), None to leave it as is."""
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
    t0 = time.time()
    log = osp.join(job.work_dir, 'log.txt')
    metrics_file = osp.join(job.work_dir, 'metrics.json')
    if osp.isfile(metrics_file):
        os.remove(metrics_file)  # an old run's numbers must not be read as this one's
    proc = run_tool(job.command, log_path=log, env=env)
    if proc.returncode != 0 or not osp.isfile(metrics_file):
        tail = ''.join(open(log).readlines()[-15:])
        raise RuntimeError(f'exit {proc.returncode}; log: {rel(log)}\n{tail}')
    result = json.load(open(metrics_file))
    m, q = result['metrics'], result.get('quantization') or {}
    if 'coco/bbox_mAP' not in m or 'coco/segm_mAP' not in m:
        raise RuntimeError(
            f'{rel(metrics_file)} has no coco/bbox_mAP and coco/segm_mAP (got {sorted(m)}); log: {rel(log)}'
        )
    totals = q.get('totals') or {}
    record = {
        'cell': job.cell.name,
        'model': job.cell.model,
        'detector': job.cell.detector,
        'backbone': job.cell.backbone,
        'setting': job.cell.setting,
        'box_ap': 100 * m['coco/bbox_mAP'],
        'mask_ap': 100 * m['coco/segm_mAP'],
        'avg_w_bits': totals.get('avg_weight_bits', 32.0 if not q else None),
        'avg_a_bits': totals.get('avg_act_bits', 32.0 if not q else None),
        'weight_mb': totals.get('weight_mb'),
        'gbops': totals['bops'] / 1e9 if 'bops' in totals else None,
        'scope': (q.get('settings') or {}).get('scope'),
        'calibration_ids': q.get('calibration_ids'),
        'plan': job.plan,
        'val_images': job.key['val_images'],
        'seconds': round(time.time() - t0, 1),
        'gpu': gpu,
        'command': show(job.command),
        'metrics': m,
        'key': job.key,
        'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    write_atomic(job.record, json.dumps(record, indent=1))
    return record


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs)."""
    listed = os.environ.get('CUDA_VISIBLE_DEVICES')
    if listed is not None:
        return [g.strip() for g in listed.split(',') if g.strip() and not g.strip().startswith('-')]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: no GPU to spread over
        return []


def gpu_slots(gpus: list[str], jobs: int) -> list[str | None]:
    """One GPU per job slot, round-robin (more jobs than GPUs share them evenly); [None]*jobs without GPUs."""
    if not gpus:
        return [None] * jobs
    return [gpus[i % len(gpus)] for i in range(jobs)]


def run_cells(todo: list[tuple[Job, str]], jobs: int, rows: dict, log, gpus: list[str] | None = None) -> None:
    """Each cell in its own tools/test.py process, ``jobs`` at a time; a failed cell is reported, not fatal.

    With GPUs, each running process sees exactly one (CUDA_VISIBLE_DEVICES), taken from a pool of
    ``jobs`` slots spread round-robin over ``gpus``, and gives it back when its cell ends."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    slots: queue.Queue = queue.Queue()
    for slot in gpu_slots(gpus or [], jobs):
        slots.put(slot)

    def run_one(item: tuple[Job, str]) -> None:
        job, why = item
        gpu = slots.get()
        log(f'run {job.cell.name} ({why}){"" if gpu is None else f" on GPU {gpu}"}: {show(job.command)}')
        try:
            row = rows[job.cell] = dict(execute(job, threads, gpu), reused=False)
            log(f'done {job.cell.name}: box {row["box_ap"]:.1f} mask {row["mask_ap"]:.1f} ({row["seconds"]:.0f}s)')
        except RuntimeError as err:
            rows[job.cell] = {
                'cell': job.cell.name,
                'model': job.cell.model,
                'detector': job.cell.detector,
                'backbone': job.cell.backbone,
                'setting': job.cell.setting,
                'failed': str(err),
                'plan': job.plan,
                'reused': False,
            }
            log(f'FAILED {job.cell.name}: {err}')
        finally:
            slots.put(gpu)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run_one, todo))
