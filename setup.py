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
    # The mmcv._ext import hook (a top-level module so that a .pth line can install it without
    # importing mmdet_lrpq: see its docstring).
    py_modules=['_mmdet_lrpq_mmcv'],
    package_data={'mmdet_lrpq.quant': ['csrc/*.cpp']},  # compiled at first use (mmdet_lrpq/quant/_ext.py)
    # The real minimums of the code (mmdet_lrpq/env.py checks the same at run time):
    #   Python 3.10: zip(strict=) (lrp/scores.py);  torch 2.6: weights-only torch.load with
    #   (obj, 'module.name') allow-list entries (safe_load.py);  timm 1.0.8: Swin's
    #   always_partition / strict_img_size / dynamic_mask (lrp/, cli.py);  scipy 1.9:
    #   optimize.milp (plan/allocators.py);  numpy 1.26: numpy._core (safe_load.py).
    # Lower bounds only: the exact, verified pins live in requirements/runtime.txt and
    # tools/install.sh, so that `pip install -e .` keeps the CPU/CUDA torch a user already has.
    python_requires='>=3.10',
    install_requires=['torch>=2.6', 'numpy>=1.26', 'scipy>=1.9', 'timm>=1.0.8', 'ninja', 'tqdm'],
    extras_require={
        # mmcv is not listed: `pip install mmcv-lite==2.1.0` is enough (mmdet_lrpq.ops provides the
        # compiled ops detectors use, from torchvision), and a compiled mmcv a user already has is
        # used as it is; mmcv-lite and mmcv install the same package folder, so pip must not add one
        # next to the other. mmdet 3.x refuses mmcv >= 2.2.
        'mmdet': ['mmengine>=0.10,<1', 'mmdet>=3.1,<3.4', 'pycocotools'],
        'plot': ['matplotlib>=3.5'],
        'tests': ['pytest>=7', 'pytest-timeout'],
    },
)
