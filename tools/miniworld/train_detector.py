"""Train a miniature-world detector with MMDetection's own train loop and save a slim checkpoint.

    python tools/miniworld/train_detector.py configs/miniworld/mask_rcnn_swin_mini.py
        --out checkpoints/miniworld/mask_rcnn_swin_mini.pth [--work-dir D] [--cfg-options k=v ...]

An MMEngine ``Runner`` built from the config trains on CPU (``launcher='none'``) and evaluates on
the val split with CocoMetric. The final checkpoint keeps only ``state_dict`` and ``meta``
(MMEngine's meta with ``dataset_meta`` and the config, plus the final val metrics and the
training time); optimizer state and message hub are dropped so the file stays small enough to
commit.

``--threads-file F``: the torch thread count follows the integer in ``F`` (read every few
iterations); ``train_all.py`` writes it to hand a finished detector's core to the one still
training. The changes are logged and recorded in the checkpoint's meta (``thread_changes``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import os.path as osp
import sys
import time

import torch
from mmengine.hooks import Hook

from mmdet_lrpq.cli import add_threads_arg  # (mmengine is loaded: also registers mmdet_lrpq)
from mmdet_lrpq.miniworld import command_line


class ThreadsFileHook(Hook):
    """MMEngine hook: every ``interval`` training iterations, set torch's thread count to the integer
    in ``path`` when the file exists and says something new; ``changes`` lists ``(iter, threads)``."""

    priority = 'LOWEST'

    def __init__(self, path: str, interval: int = 10):
        self.path, self.interval, self.changes = path, interval, []

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if runner.iter % self.interval or not osp.isfile(self.path):
            return
        try:
            with open(self.path) as f:
                threads = int(f.read().strip())
        except ValueError:  # being written, or garbage: keep the current count
            return
        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes.append((runner.iter, threads))
            runner.logger.info(f'[threads] torch threads now {threads} (from {self.path}, iter {runner.iter})')


def measure(cfg, checkpoint: str) -> dict[str, float]:
    """CocoMetric of the saved ``checkpoint`` on the config's test split (the val split), from the
    evaluator's own return value: the number is measured on exactly the file that is committed."""
    from mmengine.runner import Runner

    cfg = cfg.copy()
    cfg.load_from = checkpoint
    cfg.model.backbone.init_cfg = None
    cfg.work_dir = osp.join(cfg.work_dir, 'final_eval')
    cfg.custom_hooks = []
    return {k: float(v) for k, v in Runner.from_cfg(cfg).test().items()}


def slim_checkpoint(path: str, out: str, extra_meta: dict) -> int:
    """Re-save ``path`` with only ``state_dict`` and ``meta`` (+ ``extra_meta``); returns the file size."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    meta = {k: v for k, v in ckpt['meta'].items() if k != 'hook_msgs'}
    meta.update(extra_meta)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    torch.save(dict(meta=meta, state_dict=ckpt['state_dict']), out)
    return os.path.getsize(out)


def main(argv: list[str] | None = None) -> None:
    from mmengine.config import Config, DictAction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--out', required=True, help='slim final checkpoint to write')
    parser.add_argument('--work-dir', help='default: work_dirs/miniworld/<config name>')
    add_threads_arg(parser)
    parser.add_argument('--threads-file', help='follow the thread count written in this file while training')
    parser.add_argument(
        '--measure-only',
        action='store_true',
        help='do not train: evaluate --out on the val split and record the metrics in it',
    )
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmengine.runner import Runner

    import mmdet_lrpq

    mmdet_lrpq.register_all_modules()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = 'none'
    cfg.work_dir = args.work_dir or osp.join('work_dirs', 'miniworld', osp.splitext(osp.basename(args.config))[0])
    init = cfg.model.backbone.get('init_cfg') or {}
    if not args.measure_only and init.get('type') == 'Pretrained' and not osp.isfile(init['checkpoint']):
        sys.exit(
            f'error: backbone init checkpoint {init["checkpoint"]} not found; make it with '
            f'`python tools/miniworld/convert_classifier.py` (after training the classifier)'
        )

    if not args.measure_only:
        runner = Runner.from_cfg(cfg)
        threads_hook = None
        if args.threads_file:
            threads_hook = ThreadsFileHook(args.threads_file)
            runner.register_hook(threads_hook)
        start = time.time()
        runner.train()
        train_seconds = time.time() - start
        extra = dict(
            train_seconds=round(train_seconds, 1),
            command=command_line(__file__, argv),
            threads=args.threads,
            thread_changes=threads_hook.changes if threads_hook else [],
        )
        if init.get('type') == 'Pretrained':  # which converted classifier the backbone started from
            with open(init['checkpoint'], 'rb') as f:
                extra['backbone_init_sha256'] = hashlib.sha256(f.read()).hexdigest()
        size = slim_checkpoint(osp.join(cfg.work_dir, f'iter_{runner.iter}.pth'), args.out, extra)
        print(
            f'trained {runner.iter} iterations in {train_seconds / 60:.1f} min; wrote {args.out} '
            f'({size / 2**20:.1f} MiB)'
        )
    # measured on the saved file itself (also what --measure-only re-records in an existing one)
    metrics = measure(cfg, args.out)
    slim_checkpoint(args.out, args.out, dict(final_val_metrics=metrics))
    print(f'final val metrics: {metrics}')


if __name__ == '__main__':
    main()
