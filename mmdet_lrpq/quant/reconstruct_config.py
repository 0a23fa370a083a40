"""The settings of reconstruction (:class:`ReconstructConfig`), checked when made.

What each setting does is told in :mod:`.reconstruct`. The class sits below the driver there and the
learning code (:mod:`.reconstruct_learning`), which both read it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .options import from_options

HEAD_MODES = ('module', 'layer', 'none')


@dataclass(frozen=True)
class ReconstructConfig:
    """How reconstruction runs (see :mod:`.reconstruct` for the loss).

    iters:          optimizer steps per unit (block or layer).
    batch_size:     calibration samples (images, or calibration batches) per step of a block.
    num_images:     at most this many calibration images are used (the first ones): bounds the cached
                    block inputs (three copies of one block's inputs per image).
    weight_rounding, act_step: learn the weights' rounding / the activation step sizes.
    lr_rounding, lr_step: Adam learning rates of ``V`` and of ``log Δ``.
    round_weight:   λ, weight of the rounding regularizer.
    warmup:         fraction of the steps without the regularizer.
    beta:           (start, end) of β's linear annealing.
    drop_prob:      QDrop: probability that an activation keeps its float value while a unit learns from
                    the float model's inputs (blocks, and with ``heads='module'`` the neck and RPN
                    head; 0 = BRECQ). Units learning on their own quantized inputs (RoI heads, lone
                    layers) never drop.
    heads:          the quantized layers outside the backbone's blocks (scope ``'detector'``):
                    ``'module'``: the neck, the RPN head and every RoI box / mask head whole (what an
                    mmdet detector has of them), any other layer alone; ``'layer'``: every layer alone;
                    ``'none'``: left as calibrated.
    max_rows:       RoIs kept per RoI head, and input rows (tokens, RoIs, conv patches) per lone layer.
    batch_rows:     rows per step of a lone layer.
    seed:           of every random choice.
    """

    iters: int = 300
    batch_size: int = 4
    num_images: int = 32
    weight_rounding: bool = True
    act_step: bool = True
    lr_rounding: float = 3e-2
    lr_step: float = 1e-3
    round_weight: float = 10.0
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    heads: str = 'module'
    max_rows: int = 4096
    batch_rows: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ('iters', 'batch_size', 'num_images', 'max_rows', 'batch_rows', 'seed'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == 'seed' else 1):
                raise ValueError(
                    f'reconstruct.{name} must be a {"non-negative" if name == "seed" else "positive"} '
                    f'integer, got {v!r}'
                )
        for name in ('lr_rounding', 'lr_step', 'round_weight'):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f'reconstruct.{name} must be a finite number >= 0, got {v!r}')
        if not 0 <= self.warmup < 1:
            raise ValueError(f'reconstruct.warmup must be in [0, 1), got {self.warmup!r}')
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f'reconstruct.drop_prob must be in [0, 1), got {self.drop_prob!r}')
        beta = tuple(self.beta)
        if len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta):
            raise ValueError(f'reconstruct.beta must be two positive numbers (start, end), got {self.beta!r}')
        object.__setattr__(self, 'beta', (float(beta[0]), float(beta[1])))
        if self.heads not in HEAD_MODES:
            raise ValueError(f'reconstruct.heads must be one of {HEAD_MODES}, got {self.heads!r}')
        if not (self.weight_rounding or self.act_step):
            raise ValueError('reconstruct: nothing to learn (weight_rounding and act_step are both False)')

    @classmethod
    def from_options(cls, options: dict) -> ReconstructConfig:
        return from_options(cls, options, 'reconstruct')

    def describe(self) -> dict:
        out = asdict(self)
        out['beta'] = list(self.beta)
        return out
