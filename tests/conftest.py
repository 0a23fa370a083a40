"""Shared fixtures: where the real data lives, and skipping cleanly when it does not."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (repq_reference, ...)

# Real COCO / ImageNet images (../shared/data, see its README). Never copied into the repo.
SHARED_DATA = Path(os.environ.get('MMDET_LRPQ_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def shared_data(*parts: str) -> Path:
    """Path under the shared real-data folder, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'real data not available: {path} does not exist (set MMDET_LRPQ_SHARED_DATA '
                    f'to a folder with coco_mini/ and imagenet_sample/ to run this test)')
    return path


@pytest.fixture
def coco_mini() -> Path:
    return shared_data('coco_mini')


@pytest.fixture
def imagenet_sample() -> Path:
    return shared_data('imagenet_sample')
