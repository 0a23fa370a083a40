"""Calibrated-state files through ``tools/test.py``: every way a state file could evaluate the wrong
model is stopped with a message, never a silent number (a plan regenerated in place, a state saved
with another checkpoint, changed calibration settings, a truncated file). Only the command line
is used, so these tests run unchanged against any version of the tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn_swin_coco.py'


def _run(ckpt, work_dir, *options, coco_root):
    cmd = [
        sys.executable,
        str(REPO / 'tools' / 'test.py'),
        str(TINY_CFG),
        str(ckpt),
        '--work-dir',
        str(work_dir),
        '--data-root',
        str(coco_root),
        '--cfg-options',
        'test_dataloader.dataset.indices=2',
        *options,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner.checkpoint import save_checkpoint

    import mmdet_lrpq

    register_all_modules(init_default_scope=True)
    mmdet_lrpq.register_all_modules()
    cfg = Config.fromfile(str(TINY_CFG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    save_checkpoint({'state_dict': model.state_dict(), 'meta': {'note': 'random init'}}, str(path))
    return path


@pytest.fixture(scope='module')
def saved_state(tiny_ckpt, tmp_path_factory) -> Path:
    """A state calibrated with the default hook settings, shared by the tests that reuse it."""
    state = tmp_path_factory.mktemp('state') / 'state.pth'
    rc, log = _run(
        tiny_ckpt, state.parent / 'work', f'custom_hooks.0.state_file={state}', coco_root=shared_data('coco_mini')
    )
    assert rc == 0 and state.is_file(), log[-3000:]
    return state


def _copy(state: Path, tmp_path: Path) -> Path:
    path = tmp_path / 'state.pth'
    path.write_bytes(state.read_bytes())
    return path


def _plan(path: Path, bits: int) -> None:
    path.write_text(f'{{"format": "mmdet-lrpq/bitplan@1", "bits": {{"re:.*": [{bits}, {bits}]}}}}\n')


def _clean_failure(rc: int, log: str, *needles: str) -> None:
    assert rc != 0, 'the run must stop instead of evaluating:\n' + log[-2000:]
    assert 'Traceback' not in log, log[-3000:]
    for needle in needles:
        assert needle in log, (needle, log[-2000:])


def test_plan_regenerated_at_the_same_path_is_not_evaluated_with_the_old_state(coco_mini, tiny_ckpt, tmp_path):
    plan, state = tmp_path / 'plan.json', tmp_path / 'state.pth'
    _plan(plan, 4)
    opts = (f'custom_hooks.0.plan={plan}', f'custom_hooks.0.state_file={state}')
    rc, log = _run(tiny_ckpt, tmp_path / 'a', *opts, coco_root=coco_mini)
    assert rc == 0 and state.is_file(), log[-3000:]
    _plan(plan, 6)  # what the README tells users to do
    rc, log = _run(tiny_ckpt, tmp_path / 'b', *opts, coco_root=coco_mini)
    _clean_failure(rc, log, 'plan_sha256', str(state))


def test_state_saved_with_another_checkpoint_does_not_override_its_weights(coco_mini, tiny_ckpt, saved_state, tmp_path):
    state = _copy(saved_state, tmp_path)
    other = torch.load(tiny_ckpt, map_location='cpu', weights_only=False)
    for key, value in other['state_dict'].items():
        if key.startswith('backbone.'):
            value.zero_()  # a broken checkpoint: the state must not hide it
    zeroed = tmp_path / 'zeroed.pth'
    torch.save(other, zeroed)
    rc, log = _run(zeroed, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    _clean_failure(rc, log, 'float weights differ')


def test_calibration_settings_given_with_a_state_file_are_not_ignored(coco_mini, tiny_ckpt, saved_state, tmp_path):
    state = _copy(saved_state, tmp_path)
    rc, log = _run(
        tiny_ckpt,
        tmp_path / 'b',
        f'custom_hooks.0.state_file={state}',
        'custom_hooks.0.calib.seed=5',
        coco_root=coco_mini,
    )
    _clean_failure(rc, log, 'calibration.seed: saved 0, now 5')


def test_truncated_state_file_is_a_clear_error_then_recalibration_on_request(
    coco_mini, tiny_ckpt, saved_state, tmp_path
):
    state = _copy(saved_state, tmp_path)
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3])  # an interrupted copy
    rc, log = _run(tiny_ckpt, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    _clean_failure(rc, log, 'unreadable', f'Delete {state}')
    rc, log = _run(
        tiny_ckpt,
        tmp_path / 'c',
        f'custom_hooks.0.state_file={state}',
        'custom_hooks.0.state_mismatch=recalibrate',
        coco_root=coco_mini,
    )
    assert rc == 0 and 'recalibrating' in log and 'calibrated state saved' in log, log[-3000:]
    rc, log = _run(tiny_ckpt, tmp_path / 'd', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    assert rc == 0 and 'no calibration' in log, log[-3000:]


# ----------------------------------------------------------------------------- states, plans, converter
def _coco_copy(coco_root: Path, dest: Path, change=None) -> Path:
    """``coco_root`` under another root: annotations and val2017 linked, train2017 (the calibration images)
    linked image by image, or rewritten through ``change(path, target)``."""
    dest.mkdir()
    for part in ('annotations', 'val2017'):
        (dest / part).symlink_to(coco_root / part)
    (dest / 'train2017').mkdir()
    for image in sorted((coco_root / 'train2017').iterdir()):
        target = dest / 'train2017' / image.name
        if change is None:
            target.symlink_to(image)
        else:
            change(image, target)
    return dest


def _mirror(image: Path, target: Path) -> None:
    from PIL import Image

    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, quality=95)


def test_a_state_is_refused_when_the_calibration_images_changed(coco_mini, tiny_ckpt, saved_state, tmp_path):
    """Same settings, another --data-root whose calibration images differ: the old model loaded silently."""
    state = _copy(saved_state, tmp_path)
    same = _coco_copy(coco_mini, tmp_path / 'same')
    rc, log = _run(tiny_ckpt, tmp_path / 'a', f'custom_hooks.0.state_file={state}', coco_root=same)
    assert rc == 0 and 'no calibration' in log, log[-3000:]  # a moved copy of the same images: reused
    changed = _coco_copy(coco_mini, tmp_path / 'changed', _mirror)
    rc, log = _run(tiny_ckpt, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=changed)
    _clean_failure(
        rc,
        log,
        'calibration.image_sha256',
        'content differs',
        os.path.realpath(changed / 'train2017'),
        os.path.realpath(coco_mini / 'train2017'),
        f'Delete {state}',
    )
    assert 'calibrated state calibrated state' not in log
    rc, log = _run(
        tiny_ckpt,
        tmp_path / 'c',
        f'custom_hooks.0.state_file={state}',
        'custom_hooks.0.state_mismatch=recalibrate',
        coco_root=changed,
    )
    assert rc == 0 and 'recalibrating' in log and 'calibrated state saved' in log, log[-3000:]


def test_a_corrupt_calibration_image_is_one_message_not_a_traceback(coco_mini, tiny_ckpt, tmp_path):
    broken = _coco_copy(
        coco_mini, tmp_path / 'broken', lambda image, target: target.write_bytes(image.read_bytes()[:300])
    )
    rc, log = _run(tiny_ckpt, tmp_path / 'a', coco_root=broken)
    _clean_failure(rc, log, 'CalibrationDataError', f'{broken}/train2017/', 'could not be loaded')


def test_a_placeholder_plan_is_flagged_in_the_log_the_report_and_the_metrics(coco_mini, tiny_ckpt, tmp_path):
    import json

    plan = tmp_path / 'swin_t_mp4.json'
    plan.write_text(
        json.dumps(
            {
                'format': 'mmdet-lrpq/bitplan@1',
                'bits': {'re:.*': [4, 4]},
                'source': {'weights': {'kind': 'random-init', 'seed': 0}},
            }
        )
    )
    rc, log = _run(tiny_ckpt, tmp_path / 'w', f'custom_hooks.0.plan={plan}', coco_root=coco_mini)
    assert rc == 0, log[-3000:]
    assert log.count('PLACEHOLDER BIT PLAN') >= 2  # when quantizing, and again after the AP
    metrics = json.loads((tmp_path / 'w' / 'metrics.json').read_text())
    assert metrics['warnings'] and 'random-init' in metrics['warnings'][0]
    report = json.loads((tmp_path / 'w' / 'quantization_report.json').read_text())
    assert report['warnings'] == metrics['warnings']


def test_a_plan_that_does_not_fit_stops_the_run_before_the_checkpoint_and_the_data(tmp_path):
    import json

    plan = tmp_path / 'plan.json'
    plan.write_text(
        json.dumps(
            {
                'format': 'mmdet-lrpq/bitplan@1',
                'bits': {'backbone.stages.7.blocks.0.attn.w_msa.qkv': [5, 5], 're:.*': [4, 4]},
            }
        )
    )
    not_a_checkpoint = tmp_path / 'model.pth'
    not_a_checkpoint.write_text('not a checkpoint')
    (tmp_path / 'empty').mkdir()
    rc, log = _run(not_a_checkpoint, tmp_path / 'w', f'custom_hooks.0.plan={plan}', coco_root=tmp_path / 'empty')
    _clean_failure(rc, log, 'bit plan does not fit this model', 'stages.7.blocks.0')
