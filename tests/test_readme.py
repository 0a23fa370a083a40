"""The README's Python examples run as written (the detector one on the miniature world's data)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _api_examples() -> list[str]:
    text = (REPO / 'README.md').read_text()
    section = text.split('\n## Python API\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def test_readme_has_the_two_api_examples():
    blocks = _api_examples()
    assert len(blocks) == 2 and 'quantize_' in blocks[0] and 'init_quantized_detector' in blocks[1]


@pytest.mark.parametrize('index', [0, 1], ids=['quantize_', 'init_quantized_detector'])
def test_readme_python_example_runs(index):
    if index == 1:  # the data `make demo` generates (seeded, about a minute the first time)
        from mmdet_lrpq.miniworld import experiments

        experiments.ensure_data(log=lambda msg: None)
    proc = subprocess.run(
        [sys.executable, '-c', _api_examples()[index]], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if index == 0:
        assert proc.stdout.split() == ['4.0', '4']
    else:
        assert 'Conv2d/Linear' in proc.stdout and 'tensor([' in proc.stdout
