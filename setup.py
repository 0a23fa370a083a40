"""mmdet-lrpq: LRP-guided mixed-precision post-training quantization of Swin detectors."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'mmdet_lrpq' / 'version.py').read_text()).group(1)

setup(
    name='mmdet-lrpq',
    version=VERSION,
    description='LRP-guided mixed-precision PTQ of Swin backbones in MMDetection 3.x detectors',
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmdet_lrpq', 'mmdet_lrpq.*']),
    package_data={'mmdet_lrpq.quant': ['csrc/*.cpp']},  # compiled at first use (mmdet_lrpq/quant/_ext.py)
    python_requires='>=3.9',
    # Loose bounds only: the exact, verified pins live in requirements/runtime.txt and
    # tools/install.sh, so that `pip install -e .` never replaces the CPU/CUDA torch a user has.
    install_requires=['torch>=2.1', 'numpy', 'scipy', 'timm>=0.9', 'ninja'],
    extras_require={
        'mmdet': ['mmengine>=0.10', 'mmdet>=3.1,<3.4', 'mmcv>=2.0,<2.2', 'pycocotools'],
        'plot': ['matplotlib'],
        'tests': ['pytest>=7', 'pytest-timeout'],
    },
)
