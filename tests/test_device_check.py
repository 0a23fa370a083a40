"""tools/device_check.sh --device cpu: the GPU node's check, end to end on a CPU, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / 'device_check.json'
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ['bash', str(REPO / 'tools' / 'device_check.sh'), '--device', 'cpu', '--json', str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record['ok'] and record['quick'] and record['device'] == 'cpu'
    steps = record['steps']
    assert list(steps) == ['stack', 'selfcheck', 'tests', 'speed', 'reconstruct']
    assert all(s['ok'] for s in steps.values()), {k: s.get('error') for k, s in steps.items()}
    assert steps['stack']['result']['mmcv_ops_backend'] in ('compiled', 'torchvision')
    cpu = steps['selfcheck']['result']['results']['cpu']
    assert cpu['ok'] and 0 < cpu['box_ap'] <= 100 and 0 < cpu['mask_ap'] <= 100
    assert 'passed' in steps['tests']['result']['summary']
    speed = steps['speed']['result']
    if 'skipped' not in speed:
        assert speed['calib_over_fp'] > 1 and speed['quant_over_fp'] > 0.5
    rec = steps['reconstruct']['result']
    assert rec['with_reconstruction_s'] > rec['calibration_s'] > 0 and rec['seconds_per_step_per_unit'] > 0
    # the summary names each step and the targets
    assert 'verdict' in proc.stdout and 'recon step' in proc.stdout


def test_device_check_refuses_unknown_steps():
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'device_check.py'), '--steps', 'stack,warp'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--steps: unknown ['warp']" in proc.stderr


def test_node_without_openmmlab_and_without_wheels_is_told_to_prepare(tmp_path):
    """A Python without mmengine/mmdet and no carried wheels: the message says what to run where."""
    fake_py = tmp_path / 'python'
    fake_py.write_text('#!/bin/sh\nexit 1\n')  # 'import mmengine, mmdet, ...' fails
    fake_py.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_py), MMDET_LRPQ_DEVICE_WHEELS=str(tmp_path / 'none'))
    proc = subprocess.run(
        ['bash', str(REPO / 'tools' / 'device_check.sh')], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 1
    assert "run 'tools/device_check.sh --prepare' where the package index is reachable" in proc.stderr
