"""Bit plans, budgets and allocators (docs/method.md): pure Python/NumPy/SciPy, no torch or mmdet.

Sites (:class:`Site`) describe what can be quantized; a :class:`BitPlan` says at how many bits;
:func:`account` / :class:`Budget` say what that costs; :func:`allocate` makes plans from scores;
:func:`allocate_lampq` adds LampQ's type-aware normalisation and iterative ILP to the ``sensitivity`` one;
:func:`random_plan` draws the random plans a mixed-precision plan is compared with (a control, not an allocator).
"""

from ..bits import check_bit_pair
from .allocators import ALLOCATORS, allocate
from .bitplan import CATCH_ALL, PLAN_FORMAT, BitPlan
from .budget import Accounting, Budget, BudgetCheck, account, uniform_bops
from .controls import random_plan
from .lampq import allocate_lampq, component_type, plan_cost, type_normalize
from .plot import plot_plan
from .sites import SITE_KINDS, SWIN_LAYER_TYPES, Site

__all__ = [
    'Site',
    'SITE_KINDS',
    'SWIN_LAYER_TYPES',
    'BitPlan',
    'PLAN_FORMAT',
    'CATCH_ALL',
    'check_bit_pair',
    'Budget',
    'BudgetCheck',
    'Accounting',
    'account',
    'uniform_bops',
    'allocate',
    'ALLOCATORS',
    'plot_plan',
    'allocate_lampq',
    'component_type',
    'type_normalize',
    'plan_cost',
    'random_plan',
]
