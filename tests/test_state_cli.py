"""Calibrated-state files through ``tools/test.py``: every way a state file could evaluate the wrong
model is stopped with a message, never a silent number (a plan regenerated in place, a state saved
with another checkpoint, changed calibration settings, a truncated file). Only the command line
is used, so these tests run unchanged against any version of the tool."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = REPO / 'tests' / 'configs' / 'tiny_mask_rcnn_swin_coco.py'


def _run(ckpt, work_dir, *options, coco_root):
    cmd = [sys.executable, str(REPO / 'tools' / 'test.py'), str(TINY_CFG), str(ckpt), '--work-dir', str(work_dir),
           '--data-root', str(coco_root), '--cfg-options', 'test_dataloader.dataset.indices=2', *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
    from mmengine.config import Config
    from mmengine.runner.checkpoint import save_checkpoint

    import mmdet_lrpq
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
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
    rc, log = _run(tiny_ckpt, state.parent / 'work', f'custom_hooks.0.state_file={state}',
                   coco_root=shared_data('coco_mini'))
    assert rc == 0 and state.is_file(), log[-3000:]
    return state


def _copy(state: Path, tmp_path: Path) -> Path:
    path = tmp_path / 'state.pth'
    path.write_bytes(state.read_bytes())
    return path


def _plan(path: Path, bits: int) -> None:
    path.write_text('{"format": "mmdet-lrpq/bitplan@1", "bits": {"re:.*": [%d, %d]}}\n' % (bits, bits))


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
    _plan(plan, 6)                                   # what the README tells users to do
    rc, log = _run(tiny_ckpt, tmp_path / 'b', *opts, coco_root=coco_mini)
    _clean_failure(rc, log, 'plan_sha256', str(state))


def test_state_saved_with_another_checkpoint_does_not_override_its_weights(coco_mini, tiny_ckpt, saved_state,
                                                                           tmp_path):
    state = _copy(saved_state, tmp_path)
    other = torch.load(tiny_ckpt, map_location='cpu', weights_only=False)
    for key, value in other['state_dict'].items():
        if key.startswith('backbone.'):
            value.zero_()                            # a broken checkpoint: the state must not hide it
    zeroed = tmp_path / 'zeroed.pth'
    torch.save(other, zeroed)
    rc, log = _run(zeroed, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    _clean_failure(rc, log, 'float weights differ')


def test_calibration_settings_given_with_a_state_file_are_not_ignored(coco_mini, tiny_ckpt, saved_state, tmp_path):
    state = _copy(saved_state, tmp_path)
    rc, log = _run(tiny_ckpt, tmp_path / 'b', f'custom_hooks.0.state_file={state}', 'custom_hooks.0.calib.seed=5',
                   coco_root=coco_mini)
    _clean_failure(rc, log, 'calibration.seed: saved 0, now 5')


def test_truncated_state_file_is_a_clear_error_then_recalibration_on_request(coco_mini, tiny_ckpt, saved_state,
                                                                             tmp_path):
    state = _copy(saved_state, tmp_path)
    data = state.read_bytes()
    state.write_bytes(data[:len(data) // 3])         # an interrupted copy
    rc, log = _run(tiny_ckpt, tmp_path / 'b', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    _clean_failure(rc, log, 'unreadable', f'Delete {state}')
    rc, log = _run(tiny_ckpt, tmp_path / 'c', f'custom_hooks.0.state_file={state}',
                   'custom_hooks.0.state_mismatch=recalibrate', coco_root=coco_mini)
    assert rc == 0 and 'recalibrating' in log and 'calibrated state saved' in log, log[-3000:]
    rc, log = _run(tiny_ckpt, tmp_path / 'd', f'custom_hooks.0.state_file={state}', coco_root=coco_mini)
    assert rc == 0 and 'no calibration' in log, log[-3000:]
