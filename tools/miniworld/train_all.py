"""Reproduce the miniature world end to end: data -> ConvNet teacher -> Swin classifier -> conversion -> detectors.

    python tools/miniworld/train_all.py                 # everything (timings: docs/miniworld.md, training_summary.json)
    python tools/miniworld/train_all.py --from mask_rcnn_swin_mini  # resume at a stage
    python tools/miniworld/train_all.py --only generate

Each stage is a subprocess running one of the tools next to this file, with its progress printed.
The two detectors train side by side (``--jobs``), ``--threads`` each; when one finishes, the other
gets the freed cores through its threads file (``train_detector.py --threads-file``).
Afterwards ``checkpoints/miniworld/training_summary.json`` records, per stage, the exact command,
the wall-clock time and the final validation numbers (read back from the checkpoints, which store
what the training scripts measured: the classifier's accuracy, mmdet CocoMetric's bbox/segm AP).
Stages not run in this invocation keep their previous entry.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import shlex
import subprocess
import sys
import time

import torch

from mmdet_lrpq import register_all_modules
from mmdet_lrpq.cli import add_threads_arg

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CKPT_DIR = 'checkpoints/miniworld'
TEACHER = f'{CKPT_DIR}/cnn_teacher.pth'  # ConvNet whose feature maps guide the Swin (FitNets hints)
CLASSIFIER = f'{CKPT_DIR}/swin_mini_cls.pth'
WORK_DIR = 'work_dirs/miniworld'  # the detectors' training logs and threads files
BACKBONE_INIT = f'{WORK_DIR}/swin_mini_backbone_mmdet.pth'  # what the configs' init_cfg points at
DETECTORS = ('mask_rcnn_swin_mini', 'cascade_mask_rcnn_swin_mini')
STAGES = ('generate', 'teacher', 'classifier', 'convert', *DETECTORS)
CLASSIFIERS = {'teacher': TEACHER, 'classifier': CLASSIFIER}


def checkpoint_path(stage: str) -> str:
    """Where a training stage writes its checkpoint (the classifiers' and detectors' ``--out``)."""
    return CLASSIFIERS.get(stage, f'{CKPT_DIR}/{stage}.pth')


def stage_command(stage: str, args: argparse.Namespace) -> list[str]:
    def tool(name: str) -> str:
        return f'tools/miniworld/{name}.py'

    if stage == 'generate':
        return [tool('generate'), '--out', args.data_root, '--seed', str(args.seed)]
    if stage in CLASSIFIERS:  # one at a time, so they get --seq-threads
        common = [
            '--data-root',
            args.data_root,
            '--out',
            checkpoint_path(stage),
            '--seed',
            str(args.seed),
            '--threads',
            str(args.seq_threads),
        ]
        if stage == 'teacher':
            return [tool('train_classifier'), '--arch', 'cnn', *common]
        # a tiny Swin from scratch sits at chance on this data; the ConvNet's hints get it learning (docs/miniworld.md)
        return [
            tool('train_classifier'),
            '--teacher',
            TEACHER,
            '--hint-pairs',
            '0:1,1:2,2:3',
            '--batch-size',
            '32',
            '--epochs',
            '6',
            '--warmup-iters',
            '50',
            '--drop-path-rate',
            '0',
            *common,
        ]
    if stage == 'convert':
        return [tool('convert_classifier'), CLASSIFIER, '--out', BACKBONE_INIT]
    data_root = args.data_root.rstrip('/') + '/'
    return [
        tool('train_detector'),
        f'configs/miniworld/{stage}.py',
        '--out',
        checkpoint_path(stage),
        '--threads',
        str(args.threads),
        '--threads-file',
        threads_file(stage),
        '--cfg-options',
        f'randomness.seed={args.seed}',
        f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        f'test_dataloader.dataset.data_root={data_root}',
        f'val_evaluator.ann_file={data_root}annotations/instances_val.json',
        f'test_evaluator.ann_file={data_root}annotations/instances_val.json',
    ]


def threads_file(stage: str) -> str:
    """The file a detector's training follows for its thread count (``train_detector.py --threads-file``)."""
    return f'{WORK_DIR}/{stage}.threads'


def share_cores(stages: list[str], floor: int, cores: int | None = None) -> dict[str, int]:
    """Threads per still-training detector: the machine's cores split evenly, never below ``floor``."""
    cores = cores or os.cpu_count() or 1
    return {stage: max(floor, cores // len(stages)) for stage in stages}


def write_threads(stage: str, threads: int) -> None:
    tmp = threads_file(stage) + '.tmp'
    with open(tmp, 'w') as f:
        f.write(f'{threads}\n')
    os.replace(tmp, threads_file(stage))  # the detector never reads a half-written file


def stage_results(stage: str) -> dict:
    """What the stage's artifact says about itself (metrics, its own training time)."""
    path = checkpoint_path(stage)
    if stage in CLASSIFIERS:
        meta = torch.load(path, map_location='cpu', weights_only=True)['meta']
        return dict(
            recorded_command=meta['command'],
            checkpoint=path,
            size_bytes=os.path.getsize(path),
            arch=meta['arch'],
            val_accuracy=meta['val_accuracy'],
            history=meta['history'],
            train_seconds=meta['train_seconds'],
            model_kwargs=meta['model_kwargs'],
            **({'teacher': meta['teacher'], 'hint_pairs': meta['hint_pairs']} if 'teacher' in meta else {}),
        )
    if stage in DETECTORS:
        # a detector's meta holds MMEngine objects: the registration allow-lists them for weights_only
        register_all_modules()
        meta = torch.load(path, map_location='cpu', weights_only=True)['meta']
        coco = meta['final_val_metrics']
        return dict(
            recorded_command=meta['command'],
            checkpoint=path,
            size_bytes=os.path.getsize(path),
            iters=meta.get('iter'),
            train_seconds=meta['train_seconds'],
            final_val_metrics=coco,
            **{k: meta[k] for k in ('thread_changes', 'backbone_init_sha256') if k in meta},
            box_ap=round(100 * coco['coco/bbox_mAP'], 1),
            mask_ap=round(100 * coco['coco/segm_mAP'], 1),
        )
    return {}


def refresh_entry(entries: dict, stage: str, described: dict) -> None:
    """Replace ``entries[stage]`` when the checkpoint now says something else than the entry recorded.

    Any field of the fresh description (as JSON would store it) that differs marks the entry as
    describing an older checkpoint: its command and wall time are then stale too, so the whole entry
    goes. An entry that still matches keeps its extra fields (``command``, ``wall_seconds``, notes).
    """
    described = json.loads(json.dumps(described))
    old = entries.get(stage, {})
    if any(old.get(key) != value for key, value in described.items()):
        entries[stage] = described


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', default='data/miniworld')
    parser.add_argument('--seed', type=int, default=0)
    add_threads_arg(
        parser, 'torch threads per detector (they train side by side; 1 is several times faster than 2 on shared cores)'
    )
    parser.add_argument(
        '--seq-threads',
        type=int,
        default=min(2, os.cpu_count() or 1),
        help='torch threads for the classifiers, trained one at a time (default: 2 where there are 2)',
    )
    parser.add_argument('--from', dest='start', choices=STAGES, default=STAGES[0], help='first stage to run')
    parser.add_argument('--only', choices=STAGES, help='run just this stage')
    parser.add_argument(
        '--jobs',
        type=int,
        default=min(2, os.cpu_count() or 1),
        help='detectors trained side by side (default: 2 where there are 2 cores)',
    )
    parser.add_argument('--summary', default=f'{CKPT_DIR}/training_summary.json')
    args = parser.parse_args(argv)
    os.chdir(REPO)
    stages = [args.only] if args.only else list(STAGES[STAGES.index(args.start) :])
    summary = json.load(open(args.summary)) if osp.isfile(args.summary) else {}
    summary.update(
        reproduce='python tools/miniworld/train_all.py',
        seed=args.seed,
        threads=args.threads,
        seq_threads=args.seq_threads,
        environment=dict(
            python=platform.python_version(), torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count()
        ),
    )
    summary.setdefault('stages', {})
    total = time.time()

    def save() -> None:
        os.makedirs(osp.dirname(osp.abspath(args.summary)), exist_ok=True)
        with open(args.summary, 'w') as f:
            json.dump(summary, f, indent=2)

    def record(stage: str, command: list[str], seconds: float) -> None:
        print(f'===== [{stage}] done in {seconds / 60:.1f} min', flush=True)
        summary['stages'][stage] = dict(
            command=shlex.join(command), wall_seconds=round(seconds, 1), **stage_results(stage)
        )
        save()

    sequential = [s for s in stages if s not in DETECTORS or args.jobs == 1]
    for stage in sequential:
        command = ['python', *stage_command(stage, args)]
        print(f'\n===== [{stage}] {shlex.join(command)}', flush=True)
        start = time.time()
        subprocess.run([sys.executable, *command[1:]], check=True)
        record(stage, command, time.time() - start)
    running = {}  # the detectors side by side, one process (and --threads threads) each, logs to files
    for stage in (s for s in stages if s not in sequential):
        command = ['python', *stage_command(stage, args)]
        log_path = f'{WORK_DIR}/{stage}.train.log'
        os.makedirs(osp.dirname(log_path), exist_ok=True)
        write_threads(stage, args.threads)
        print(f'\n===== [{stage}] {shlex.join(command)}  (log: {log_path})', flush=True)
        with open(log_path, 'w') as log:  # the child keeps its own copy of the descriptor
            running[stage] = (
                command,
                time.time(),
                subprocess.Popen([sys.executable, *command[1:]], stdout=log, stderr=subprocess.STDOUT),
            )
    failed = []
    while running:  # a detector that finishes hands its cores to those still training
        finished = [stage for stage, (_, _, proc) in running.items() if proc.poll() is not None]
        if not finished:
            time.sleep(5)
            continue
        for stage in finished:
            command, start, proc = running.pop(stage)
            if proc.returncode != 0:
                failed.append(stage)
            else:
                record(stage, command, time.time() - start)
        for stage, threads in share_cores(list(running), args.threads).items():
            print(f'===== [{stage}] now {threads} threads', flush=True)
            write_threads(stage, threads)
    if failed:
        sys.exit(f'training failed: {failed}; see {WORK_DIR}/<stage>.train.log')
    for stage in (*CLASSIFIERS, *DETECTORS):  # not run now: describe them from their checkpoints
        if stage not in stages and osp.isfile(checkpoint_path(stage)):
            refresh_entry(summary['stages'], stage, stage_results(stage))
    summary['total_wall_seconds_this_run'] = round(time.time() - total, 1)
    save()
    print(f'\nall stages done in {(time.time() - total) / 60:.1f} min; summary: {args.summary}')


if __name__ == '__main__':
    main()
