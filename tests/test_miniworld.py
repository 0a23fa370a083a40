"""The miniature world: deterministic data that MMDetection reads and scores correctly, and the
committed classifier/detectors that were trained on it (skipped when not present). No training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mmdet_lrpq.miniworld import CLASSES, IMAGE_SIZE, detection_scene, generate, render_detection_image

REPO = Path(__file__).resolve().parents[1]
CKPT_DIR = REPO / 'checkpoints' / 'miniworld'
CONFIG_DIR = REPO / 'configs' / 'miniworld'
TINY = dict(train=12, val=6, calib=2, cls_train=8, cls_val=4)


@pytest.fixture(scope='module')
def tiny_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('miniworld')
    generate(root, seed=0, sizes=TINY)
    return root


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / 'miniworld' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


# ---------------------------------------------------------------- data


def test_generation_is_deterministic_and_independent_of_workers(tmp_path, tiny_world):
    generate(tmp_path / 'again', seed=0, sizes=TINY, workers=2)
    assert _tree_bytes(tmp_path / 'again') == _tree_bytes(tiny_world)
    generate(tmp_path / 'other', seed=1, sizes=dict(TINY, cls_train=0, cls_val=0))
    assert (tmp_path / 'other/annotations/instances_val.json').read_bytes() != (
        tiny_world / 'annotations/instances_val.json'
    ).read_bytes()


def test_splits_are_disjoint(tiny_world):
    images = {split: {p.read_bytes() for p in (tiny_world / split).glob('*.jpg')} for split in TINY}
    assert all(len(images[s]) == n for s, n in TINY.items())
    splits = list(TINY)
    assert all(not images[a] & images[b] for i, a in enumerate(splits) for b in splits[i + 1 :])


def test_coco_annotations_are_consistent(tiny_world):
    coco = json.loads((tiny_world / 'annotations' / 'instances_train.json').read_text())
    assert [c['name'] for c in coco['categories']] == list(CLASSES) and len(CLASSES) >= 8
    assert [c['id'] for c in coco['categories']] == list(range(1, len(CLASSES) + 1))
    assert (
        len({a['id'] for a in coco['annotations']}) == len(coco['annotations'])
        and min(a['id'] for a in coco['annotations']) >= 1
    )  # pycocotools treats id 0 as "unmatched"
    height, width = IMAGE_SIZE
    per_image = np.bincount([a['image_id'] for a in coco['annotations']])[1:]
    assert len(per_image) == TINY['train'] and per_image.min() >= 2 and per_image.mean() >= 3
    for ann in coco['annotations']:
        mask = mask_utils.decode(ann['segmentation']).astype(bool)
        assert ann['iscrowd'] == 0 and mask.shape == (height, width) and mask.any()
        assert ann['area'] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert ann['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height


def test_scenes_have_every_class_and_partial_occlusion():
    rng = np.random.default_rng(0)
    instances = [inst for _ in range(40) for inst in detection_scene(rng)[1]]
    assert {inst.label for inst in instances} == set(range(len(CLASSES)))
    visible = np.array([inst.mask.sum() / inst.full_area for inst in instances])
    assert visible.min() >= 0.5 - 1e-9  # occluded, but never beyond recognition
    assert (visible < 0.95).sum() >= 5  # and occlusion does happen


def test_classification_split(tiny_world):
    lines = (tiny_world / 'annotations' / 'cls_train.txt').read_text().splitlines()
    assert len(lines) == TINY['cls_train']
    assert (tiny_world / 'annotations' / 'classes.txt').read_text().split() == list(CLASSES)
    for line in lines:
        name, label = line.split()
        assert (tiny_world / name).is_file() and 0 <= int(label) < len(CLASSES)


# ---------------------------------------------------------------- mmdet reads and scores it


def _coco_dataset(root: Path, split: str, pipeline: list):
    from mmdet.datasets import CocoDataset

    return CocoDataset(
        data_root=str(root),
        ann_file=f'annotations/instances_{split}.json',
        data_prefix=dict(img=f'{split}/'),
        metainfo=dict(classes=CLASSES),
        pipeline=pipeline,
        test_mode=True,
    )


def test_mmdet_coco_dataset_loads_boxes_and_masks(tiny_world):
    from mmdet.utils import register_all_modules

    register_all_modules()
    coco = json.loads((tiny_world / 'annotations' / 'instances_val.json').read_text())
    dataset = _coco_dataset(
        tiny_world,
        'val',
        [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True)],
    )
    assert len(dataset) == TINY['val'] and dataset.metainfo['classes'] == CLASSES
    sample = dataset[0]
    anns = [a for a in coco['annotations'] if a['image_id'] == sample['img_id']]
    assert sample['img'].shape == (*IMAGE_SIZE, 3)
    assert [CLASSES[label] for label in sample['gt_bboxes_labels']] == [CLASSES[a['category_id'] - 1] for a in anns]
    np.testing.assert_array_equal(
        sample['gt_masks'].to_ndarray(), np.stack([mask_utils.decode(a['segmentation']) for a in anns])
    )
    x, y, w, h = anns[0]['bbox']
    np.testing.assert_allclose(sample['gt_bboxes'].tensor[0].numpy(), [x, y, x + w, y + h])


def test_ground_truth_scores_ap_one_with_mmdet_coco_metric(tiny_world):
    from mmdet.evaluation import CocoMetric
    from mmdet.utils import register_all_modules

    register_all_modules()
    dataset = _coco_dataset(
        tiny_world,
        'val',
        [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True)],
    )
    metric = CocoMetric(ann_file=str(tiny_world / 'annotations' / 'instances_val.json'), metric=['bbox', 'segm'])
    metric.dataset_meta = dataset.metainfo
    for i in range(len(dataset)):
        sample = dataset[i]
        boxes = torch.as_tensor(sample['gt_bboxes'].tensor)
        pred = dict(
            bboxes=boxes,
            scores=torch.ones(len(boxes)),
            labels=torch.as_tensor(sample['gt_bboxes_labels']),
            masks=torch.as_tensor(sample['gt_masks'].to_ndarray()).bool(),
        )
        metric.process({}, [dict(img_id=sample['img_id'], ori_shape=sample['ori_shape'], pred_instances=pred)])
    results = metric.evaluate(len(dataset))
    assert results['coco/bbox_mAP'] == 1.0 and results['coco/segm_mAP'] == 1.0


# ---------------------------------------------------------------- classifier -> detector backbone


def test_classifier_conversion_initializes_the_detector_backbone(tmp_path):
    """The configs' Pretrained init really loads the converted classifier (mmdet ignores unprefixed keys)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    train_classifier = _load_tool('train_classifier')
    classifier = train_classifier.build_classifier(len(CLASSES))
    meta = dict(model_kwargs=dict(train_classifier.MODEL_KWARGS, num_classes=len(CLASSES)), val_accuracy=0.0)
    torch.save(dict(state_dict=classifier.state_dict(), meta=meta), tmp_path / 'cls.pth')
    converted = _load_tool('convert_classifier').convert_classifier(
        str(tmp_path / 'cls.pth'), str(tmp_path / 'backbone.pth')
    )
    cfg = Config.fromfile(str(CONFIG_DIR / 'mask_rcnn_swin_mini.py'))
    cfg.model.backbone.init_cfg.checkpoint = str(tmp_path / 'backbone.pth')
    backbone = MODELS.build(cfg.model.backbone)
    backbone.init_weights()
    own = backbone.state_dict()
    assert len(converted) == len([k for k in own if not k.startswith('norm') and 'relative_position_index' not in k])
    for key, value in converted.items():
        torch.testing.assert_close(own[key[len('backbone.') :]], value, rtol=0, atol=0)


def test_feature_hints_regress_the_rms_normalized_teacher_block():
    """The hint loss is the MSE between the regressed Swin stage and the teacher block divided by its
    per-channel RMS: zero for a student that reproduces it, and it trains the student, not the teacher."""
    train_classifier = _load_tool('train_classifier')
    torch.manual_seed(0)
    teacher_block = torch.rand(2, 4, 6, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1)
    hints = train_classifier.FeatureHints(((1, 2),), [8, 4, 16, 32], (3, 3, 4, 5, 6))
    with torch.no_grad():
        hints.regressors[0].weight.copy_(torch.eye(4))
        hints.regressors[0].bias.zero_()
    rms = teacher_block.pow(2).mean((0, 2, 3), keepdim=True).add(1e-6).sqrt()
    perfect = (teacher_block / rms).permute(0, 2, 3, 1).requires_grad_()
    stages = [None, perfect, None, None]
    teacher = [None, None, teacher_block, None, None]
    assert hints(stages, teacher).item() == pytest.approx(0.0, abs=1e-12)
    off = (perfect.detach() + 0.5).requires_grad_()
    loss = hints([None, off, None, None], teacher)
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    loss.backward()
    assert off.grad is not None and off.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='pair stages of equal stride'):
        hints([None, torch.zeros(2, 3, 3, 4), None, None], teacher)


@pytest.mark.parametrize('text', ['', '1', '4:2', '1:5', 'a:b', '1:2:3'])
def test_hint_pairs_are_validated(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match='SWIN_STAGE:CNN_BLOCK'):
        _load_tool('train_classifier').parse_pairs(text)


def test_teacher_then_guided_classifier_train_end_to_end(tmp_path, tiny_world):
    """The two training stages of train_all.py on a tiny world: the ConvNet teacher, then the Swin
    guided by its features; each checkpoint records its architecture and how it was trained, and the
    Swin checkpoint is a plain timm classifier (the hint regressors are not part of it)."""
    train_classifier = _load_tool('train_classifier')
    common = ['--data-root', str(tiny_world), '--batch-size', '4', '--max-iters', '2']
    teacher_path, swin_path = tmp_path / 'cnn.pth', tmp_path / 'swin.pth'
    with pytest.raises(FileNotFoundError, match='--arch cnn'):
        train_classifier.main([*common, '--teacher', str(teacher_path), '--out', str(swin_path)])
    train_classifier.main([*common, '--arch', 'cnn', '--out', str(teacher_path)])
    teacher = torch.load(teacher_path, map_location='cpu', weights_only=True)
    assert teacher['meta']['arch'] == 'ConvNet' and teacher['meta']['iters'] == 2
    torch.save(dict(state_dict={}, meta=dict(arch='timm.models.swin_transformer.SwinTransformer')), tmp_path / 'x.pth')
    with pytest.raises(ValueError, match='not a ConvNet checkpoint'):
        train_classifier.main([*common, '--teacher', str(tmp_path / 'x.pth'), '--out', str(swin_path)])
    train_classifier.main([*common, '--teacher', str(teacher_path), '--hint-pairs', '0:1,1:2', '--out', str(swin_path)])
    meta = torch.load(swin_path, map_location='cpu', weights_only=True)['meta']
    assert meta['teacher'] == str(teacher_path) and meta['hint_pairs'] == [[0, 1], [1, 2]]
    model = train_classifier.build_classifier(len(CLASSES))
    model.load_state_dict(torch.load(swin_path, map_location='cpu', weights_only=True)['state_dict'])  # strict


def test_train_all_runs_the_teacher_before_the_guided_classifier(tmp_path, tiny_world):
    """train_all.py's own classifier-stage commands (shortened to 2 iterations, outputs redirected):
    the teacher stage trains the ConvNet, the classifier stage reads it and trains the Swin with the
    recipe of the README (hints 0:1,1:2,2:3, batch 32, 6 epochs, warm-up 50, no drop path)."""
    import argparse

    train_all, train_classifier = _load_tool('train_all'), _load_tool('train_classifier')
    assert train_all.STAGES.index('teacher') < train_all.STAGES.index('classifier') < train_all.STAGES.index('convert')
    args = argparse.Namespace(data_root=str(tiny_world), seed=0, seq_threads=1)
    teacher_cmd, swin_cmd = train_all.stage_command('teacher', args), train_all.stage_command('classifier', args)
    assert swin_cmd[swin_cmd.index('--teacher') + 1] == train_all.TEACHER == teacher_cmd[teacher_cmd.index('--out') + 1]
    short = ['--max-iters', '2', '--batch-size', '4']  # argparse: the later value wins
    teacher_path, swin_path = tmp_path / 'cnn.pth', tmp_path / 'swin.pth'
    train_classifier.main([*teacher_cmd[1:], *short, '--out', str(teacher_path)])
    train_classifier.main([*swin_cmd[1:], *short, '--teacher', str(teacher_path), '--out', str(swin_path)])
    meta = torch.load(swin_path, map_location='cpu', weights_only=True)['meta']
    assert meta['arch'].endswith('SwinTransformer') and meta['teacher'] == str(teacher_path)
    assert meta['hint_pairs'] == [[0, 1], [1, 2], [2, 3]] and meta['iters'] == 2
    assert meta['command'].startswith(
        'python tools/miniworld/train_classifier.py --teacher '
    )  # main(argv), not pytest's


def test_train_all_detector_command_trains_follows_its_threads_file_and_records_provenance(tmp_path, tiny_world):
    """train_all.py's own Mask R-CNN command, shortened to 3 iterations on the tiny world with outputs
    redirected (later options win; --cfg-options merge), through mmdet's train loop: the thread count
    follows the threads file train_all writes (it hands a finished detector's core to the other), and
    the slim checkpoint records the change, the command, the val metrics and the sha256 of the
    converted classifier the backbone started from."""
    import argparse
    import hashlib

    train_all, train_detector = _load_tool('train_all'), _load_tool('train_detector')
    args = argparse.Namespace(data_root=str(tiny_world), seed=0, threads=1)
    command = train_all.stage_command('mask_rcnn_swin_mini', args)
    assert command[command.index('--threads-file') + 1] == train_all.threads_file('mask_rcnn_swin_mini')
    classifier = tmp_path / 'cls.pth'
    train_classifier = _load_tool('train_classifier')
    meta = dict(model_kwargs=dict(train_classifier.MODEL_KWARGS, num_classes=len(CLASSES)), val_accuracy=0.0)
    torch.save(dict(state_dict=train_classifier.build_classifier(len(CLASSES)).state_dict(), meta=meta), classifier)
    backbone = tmp_path / 'backbone.pth'
    _load_tool('convert_classifier').convert_classifier(str(classifier), str(backbone))
    threads_file, out = tmp_path / 'det.threads', tmp_path / 'det.pth'
    threads_file.write_text('2\n')
    before = torch.get_num_threads()
    try:
        train_detector.main(
            [
                *command[1:],
                '--out',
                str(out),
                '--work-dir',
                str(tmp_path / 'work'),
                '--threads-file',
                str(threads_file),
                '--cfg-options',
                'train_cfg.max_iters=3',
                'train_cfg.val_interval=100',
                'default_hooks.checkpoint.interval=3',
                f'model.backbone.init_cfg.checkpoint={backbone}',
            ]
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    meta = torch.load(out, map_location='cpu', weights_only=True)['meta']
    assert meta['iter'] == 3 and meta['threads'] == 1 and list(map(tuple, meta['thread_changes'])) == [(0, 2)]
    assert meta['backbone_init_sha256'] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert meta['command'].startswith(
        'python tools/miniworld/train_detector.py configs/miniworld/mask_rcnn_swin_mini.py'
    )
    assert 0.0 <= meta['final_val_metrics']['coco/bbox_mAP'] <= 1.0


def test_train_all_gives_a_finished_detectors_cores_to_the_one_still_training(tmp_path, monkeypatch, capsys):
    """train_all's own side-by-side loop, with each detector's command replaced by a stand-in process:
    the first finishes at once, the second waits until its threads file (train_detector's
    --threads-file) says the machine's cores are now its own, writes down what it read, and exits."""
    train_all = _load_tool('train_all')
    stand_in = tmp_path / 'stand_in.py'
    stand_in.write_text(
        'import sys, time\n'
        'threads_file, expected, seen = sys.argv[1:4]\n'
        'deadline = time.time() + (60 if expected else 0)\n'
        'while time.time() < deadline and open(threads_file).read().strip() != expected:\n'
        '    time.sleep(0.1)\n'
        'open(seen, "w").write(open(threads_file).read())\n'
    )
    assert train_all.share_cores(['cascade_mask_rcnn_swin_mini'], floor=1, cores=2) == {
        'cascade_mask_rcnn_swin_mini': 2
    }
    assert train_all.share_cores(['a', 'b'], floor=1, cores=2) == {'a': 1, 'b': 1}
    cores = train_all.share_cores(['cascade_mask_rcnn_swin_mini'], floor=1)['cascade_mask_rcnn_swin_mini']
    waits = {'mask_rcnn_swin_mini': '', 'cascade_mask_rcnn_swin_mini': str(cores)}
    monkeypatch.setattr(train_all, 'WORK_DIR', str(tmp_path / 'work'))
    monkeypatch.setattr(
        train_all,
        'stage_command',
        lambda stage, args: [
            str(stand_in),
            train_all.threads_file(stage),
            waits[stage],
            str(tmp_path / f'{stage}.seen'),
        ],
    )
    monkeypatch.setattr(train_all, 'stage_results', lambda stage: {'described': stage})
    monkeypatch.chdir(tmp_path)  # main() changes into the repository; restored afterwards
    train_all.main(
        ['--from', 'mask_rcnn_swin_mini', '--jobs', '2', '--threads', '1', '--summary', str(tmp_path / 'summary.json')]
    )
    assert (tmp_path / 'mask_rcnn_swin_mini.seen').read_text() == '1\n'  # started at --threads
    assert (tmp_path / 'cascade_mask_rcnn_swin_mini.seen').read_text() == f'{cores}\n'
    assert f'===== [cascade_mask_rcnn_swin_mini] now {cores} threads' in capsys.readouterr().out
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert {s: summary['stages'][s]['described'] for s in waits} == {s: s for s in waits}


def test_train_all_replaces_a_summary_entry_whose_checkpoint_changed():
    """A stage not run in this invocation is re-described from its checkpoint: a matching entry keeps
    its command, wall time and notes (tuples in the description compare as the JSON lists they are
    stored as); any differing field (here only the accuracy, the command unchanged) replaces it."""
    train_all = _load_tool('train_all')
    described = dict(recorded_command='train_classifier.py --seed 0', val_accuracy=0.69, hint_pairs=((0, 1), (1, 2)))
    stored = json.loads(json.dumps(dict(described, command='python x', wall_seconds=2364.0, note='kept')))
    entries = {'classifier': dict(stored)}
    train_all.refresh_entry(entries, 'classifier', described)
    assert entries['classifier'] == stored
    train_all.refresh_entry(entries, 'classifier', dict(described, val_accuracy=0.71))
    assert entries['classifier'] == dict(
        recorded_command='train_classifier.py --seed 0', val_accuracy=0.71, hint_pairs=[[0, 1], [1, 2]]
    )
    train_all.refresh_entry(entries, 'teacher', dict(val_accuracy=0.9))  # no entry yet
    assert entries['teacher'] == dict(val_accuracy=0.9)
    assert train_all.checkpoint_path('classifier') == train_all.CLASSIFIER
    assert train_all.checkpoint_path('mask_rcnn_swin_mini') == f'{train_all.CKPT_DIR}/mask_rcnn_swin_mini.pth'


# ---------------------------------------------------------------- AP benchmark tables


def _load_bench():
    return importlib.import_module('bench.ap_benchmark')


def _bench_row(setting, method=None, box=0.0, mask=0.0, allocator=None, weight_mb=1.0, **extra):
    return dict(
        detector='mask_rcnn',
        setting=setting,
        method=method,
        allocator=allocator,
        box_ap=box,
        mask_ap=mask,
        weight_mb=weight_mb,
        **extra,
    )


def test_ap_benchmark_judges_each_target_on_the_ladder_rows():
    """The targets table is computed, not typed: drops are measured from float on the printed 0.1
    values (a 0.5 drop still meets 'within 0.5'), sweep points (crl_k, calib.image_ids) and other
    allocators never stand in for ladder rows, and an MP4 plan with more weight memory misses."""
    bench = _load_bench()
    rows = [
        _bench_row('FP', box=60.0, weight_mb=13.0),
        _bench_row('W8A8', 'repq', 59.5, weight_mb=3.3),
        _bench_row('W8A8', 'crl', 59.4, weight_mb=3.3),
        _bench_row('W6A6', 'repq', 58.0, weight_mb=2.5),
        _bench_row('W6A6', 'crl', 59.0, weight_mb=2.5),
        _bench_row('W4A4', 'repq', 50.3, 48.0, weight_mb=1.64),
        _bench_row('W4A4', 'crl', 50.1, 48.2, weight_mb=1.64),
        _bench_row('W4A4', 'crl', 99.0, weight_mb=1.64, crl_k=1.0),
        _bench_row('W4A4', 'crl', 99.0, weight_mb=1.64, **{'calib.image_ids': [2]}),
        _bench_row('MP4', 'crl', 50.4, 48.5, allocator='lrp_qvit', weight_mb=1.61),
        _bench_row('MP4', 'crl', 10.0, allocator='uniform', weight_mb=1.64),
    ]
    checks = {name: (figures, verdict) for name, figures, verdict in bench.target_checks(rows, 'mask_rcnn')}
    assert checks['float box AP >= 50'] == ('60.0', 'met')
    assert checks['W8A8 within 0.5 AP of float'] == ('-0.5 (RepQ), -0.6 (CRL)', '**missed** by 0.1')
    assert checks['W6A6 within 2 AP of float'] == ('-2.0 (RepQ), -1.0 (CRL)', 'met')
    assert checks['W4A4: CRL >= RepQ'] == ('50.1 vs 50.3 (mask 48.2 vs 48.0)', '**missed** by 0.2')
    mp4 = 'MP4 (LRP plan, CRL) >= W4A4 (CRL), no more weight memory'
    assert checks[mp4] == ('50.4 vs 50.1 (mask 48.5 vs 48.2), 1.61 vs 1.64 MB', 'met')
    rows[-2]['weight_mb'] = 1.65
    assert dict((n, v) for n, _, v in bench.target_checks(rows, 'mask_rcnn'))[mp4] == '**missed**: more weight memory'
    assert [n for n, _, _ in bench.target_checks(rows[:1], 'mask_rcnn')] == ['float box AP >= 50']  # rows not run


def test_committed_ap_benchmark_tables_are_generated_from_its_json():
    """results/ap_benchmark.md and the generated block of docs/benchmarks.md are exactly what the
    committed JSON's rows give."""
    bench = _load_bench()
    results = REPO / 'results' / 'ap_benchmark.json'
    if not results.is_file():
        pytest.skip(f'{results} not present (python bench/ap_benchmark.py)')
    markdown = bench.tables(json.load(open(results))['rows'])
    assert (
        REPO / 'results' / 'ap_benchmark.md'
    ).read_text() == f'<!-- generated by `{bench.COMMAND}` -->\n\n{markdown}\n'
    assert f'\n\n{markdown}\n{bench.MARKERS[1]}' in (REPO / bench.DOC).read_text()
    assert bench.MARKERS[0] not in (REPO / 'README.md').read_text()  # one copy of the tables, in the docs


# ---------------------------------------------------------------- committed checkpoints


def _committed(name: str) -> Path:
    path = CKPT_DIR / name
    if not path.is_file():
        pytest.skip(f'{path} not present (train with tools/miniworld/train_all.py)')
    return path


def test_committed_classifier_reproduces_its_recorded_accuracy():
    """The committed classifier loads strictly into the recorded architecture and, on the cls_val
    split rendered afresh, scores exactly the validation accuracy its training recorded (the number
    the README and training_summary.json report, whatever it is)."""
    from mmdet_lrpq.miniworld import DEFAULT_SIZES, render_classification_image

    train_classifier = _load_tool('train_classifier')
    ckpt = torch.load(_committed('swin_mini_cls.pth'), map_location='cpu', weights_only=True)
    meta = ckpt['meta']
    assert meta['classes'] == list(CLASSES)
    model = train_classifier.build_classifier(len(CLASSES))
    model.load_state_dict(ckpt['state_dict'])  # strict
    import io

    from PIL import Image

    rendered = [render_classification_image(0, 'cls_val', i) for i in range(1, DEFAULT_SIZES['cls_val'] + 1)]
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg)))).permute(2, 0, 1) for jpeg, _, _ in rendered]
    )
    labels = torch.tensor([label for _, label, _ in rendered])
    assert train_classifier.accuracy(model, images, labels) == pytest.approx(meta['val_accuracy'], abs=1e-9)


@pytest.mark.parametrize('name', ['mask_rcnn_swin_mini', 'cascade_mask_rcnn_swin_mini'])
def test_committed_detector_loads_and_detects(name):
    import io

    from mmengine.config import Config
    from PIL import Image

    path = _committed(f'{name}.pth')
    from mmdet.apis import inference_detector, init_detector

    cfg = Config.fromfile(str(CONFIG_DIR / f'{name}.py'))
    cfg.model.backbone.init_cfg = None
    model = init_detector(cfg, None, device='cpu')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'meta', 'state_dict'}  # slim: no optimizer state
    assert tuple(ckpt['meta']['dataset_meta']['classes']) == CLASSES
    model.load_state_dict(ckpt['state_dict'])  # strict: keys and shapes match the config's model
    model.dataset_meta = ckpt['meta']['dataset_meta']
    jpeg, anns = render_detection_image(0, 'val', 1)
    image = np.asarray(Image.open(io.BytesIO(jpeg)))[..., ::-1].copy()  # BGR, as mmcv loads it
    pred = inference_detector(model, image).pred_instances
    pred = pred[pred.scores > 0.5]
    assert len(pred) >= 1
    gt = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)])
    from mmdet.structures.bbox import bbox_overlaps

    iou = bbox_overlaps(pred.bboxes, torch.as_tensor(gt, dtype=torch.float32)).numpy()
    gt_labels = np.array([a['category_id'] - 1 for a in anns])
    matched = (iou.max(0) > 0.5) & (pred.labels.numpy()[iou.argmax(0)] == gt_labels)
    assert matched.mean() >= 0.5  # most objects found with the right class
