"""Test (and evaluate) an MMDetection model — quantized when its config adds ``QuantizationHook``.

Same command line as mmdet's ``tools/test.py``::

    python tools/test.py configs/mask_rcnn_swin_t_mp4.py CKPT [--work-dir D] [--out R.pkl]
        [--show-dir D] [--cfg-options k=v ...] [--launcher none|pytorch]

On top of mmdet's script it checks its inputs up front (config and checkpoint exist, and the
checkpoint's keys fit the model — reported as counts, with the likely fix), loads mmengine
checkpoints under torch's ``weights_only`` loading, runs distributed tests on CPU (gloo), takes
``--data-root`` to move datasets and evaluator annotation files together, and writes
``<work_dir>/metrics.json`` (metrics plus the quantization report, when the hook ran).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

import torch


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='MMDet test (and eval) a (quantized) model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='directory for metrics, logs and the quantization report')
    parser.add_argument('--out', help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir', help='save painted images under work_dir/timestamp/show_dir')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. test_dataloader.dataset.data_root=...)',
    )
    parser.add_argument(
        '--data-root',
        help='COCO root (annotations/, val2017/, train2017/): moves the test/val '
        "datasets and the evaluators' annotation files there together",
    )
    parser.add_argument(
        '--tta',
        action='store_true',
        help="test-time augmentation (the config's tta_model and "
        'tta_pipeline, else horizontal flip); the hook quantizes the detector inside the TTA wrapper',
    )
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _has_mask_head(node) -> bool:
    if isinstance(node, dict):
        return node.get('mask_head') is not None or any(_has_mask_head(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_mask_head(v) for v in node)
    return False


def enable_tta(cfg) -> None:
    """mmdet's --tta: wrap the model in its TTA model and give the test set the TTA pipeline."""
    import copy

    from mmengine.config import ConfigDict

    if _has_mask_head(cfg.model):
        raise ValueError(
            "--tta: mmdet's DetTTAModel merges boxes only (instance masks are not supported by "
            "MMDetection's test-time augmentation); run this mask detector without --tta, or a "
            'box-only detector with it'
        )
    if 'tta_model' not in cfg:
        cfg.tta_model = dict(type='DetTTAModel', tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        dataset = cfg.test_dataloader.dataset
        while 'dataset' in dataset:
            dataset = dataset['dataset']
        pipeline = copy.deepcopy(dataset.pipeline)
        pack = dict(pipeline[-1])
        if 'meta_keys' in pack:  # the flip must reach the TTA merge
            pack['meta_keys'] = tuple(pack['meta_keys']) + ('flip', 'flip_direction')
        # unflipped first: calibration takes the first variant of each TestTimeAug stage
        pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[dict(type='RandomFlip', prob=0.0), dict(type='RandomFlip', prob=1.0)], [pack]],
        )
        cfg.tta_pipeline = pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_cfg(args):
    from mmengine.config import Config

    if not osp.isfile(args.config):
        sys.exit(f'error: config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.data_root is not None:
        from mmdet_lrpq.cli import set_data_root

        set_data_root(cfg, args.data_root)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.tta:
        enable_tta(cfg)
    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook

        cfg = trigger_visualization_hook(cfg, args)
    if args.launcher != 'none' and not torch.cuda.is_available():
        # mmengine's pytorch launcher assumes CUDA (torch.cuda.set_device, DDP device_ids):
        # start the gloo group ourselves and use the CPU-aware wrapper.
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group('gloo')
        cfg.model_wrapper_cfg = dict(type='mmdet_lrpq.CPUAwareDistributedDataParallel', broadcast_buffers=False)
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    import mmdet_lrpq
    from mmdet_lrpq.engine.checkpoint_check import check_checkpoint_fits
    from mmdet_lrpq.safe_load import require_checkpoint

    register_all_modules(init_default_scope=True)
    mmdet_lrpq.register_all_modules()

    require_checkpoint(args.checkpoint)
    cfg = build_cfg(args)
    if 'runner_type' in cfg:
        from mmdet.registry import RUNNERS

        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    check_plans(runner)  # a plan that does not fit stops the run before the checkpoint and data load
    check_checkpoint_fits(runner.model.module if hasattr(runner.model, 'module') else runner.model, args.checkpoint)
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            sys.exit('error: --out must be a .pkl file')
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    save_metrics(runner, metrics)
    return metrics


def check_plans(runner) -> None:
    """Each QuantizationHook's bit plan against the built model (no weights or data needed)."""
    from mmdet_lrpq.engine.hook import QuantizationHook
    from mmdet_lrpq.engine.quantize import detector_of

    for hook in runner.hooks:
        if isinstance(hook, QuantizationHook):
            hook.check_plan(detector_of(runner.model))


def save_metrics(runner, metrics: dict) -> None:
    """``<work_dir>/metrics.json``: the evaluator's numbers and, when quantized, the hook's report."""
    import json

    from mmengine.dist import is_main_process

    if not is_main_process():
        return
    report = runner.message_hub.get_info('quantization_report')  # set by the hook
    record = {
        'metrics': {k: float(v) for k, v in (metrics or {}).items()},
        'quantization': report,
        # e.g. a placeholder bit plan: these numbers are not what the config's name promises
        'warnings': list((report or {}).get('warnings') or []),
    }
    with open(osp.join(runner.work_dir, 'metrics.json'), 'w') as f:
        json.dump(record, f, indent=1)
    for warning in record['warnings']:  # again after the numbers, where they are read
        runner.logger.warning(warning)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError, TypeError, ImportError) as err:  # bad input: a message, not a trace
        if os.environ.get('MMDET_LRPQ_TRACEBACK'):
            raise
        sys.exit(f'error ({type(err).__name__}): {err}\n(set MMDET_LRPQ_TRACEBACK=1 for the traceback)')
