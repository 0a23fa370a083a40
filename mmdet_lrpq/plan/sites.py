"""What a bit plan talks about: the quantization sites of a model, as plain data.

A *site* is one quantized operation: a Linear/Conv2d (weights + input activation) or an
activation-activation matmul (both operands). Architecture adapters (``mmdet_lrpq.models``)
enumerate them; plans, budgets and allocators only ever see this description, so this package
needs neither torch nor mmdet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SITE_KINDS = ('linear', 'conv', 'matmul')
# Layer types of a Swin backbone; every other quantized layer (neck, heads) is 'other'.
SWIN_LAYER_TYPES = ('patch_embed', 'qkv', 'matmul1', 'matmul2', 'proj', 'fc1', 'fc2', 'reduction')


@dataclass(frozen=True)
class Site:
    """One quantization site.

    name:       module path in the model being quantized (a plan's key), e.g.
                ``backbone.stages.0.blocks.1.attn.w_msa.qkv``; matmul sites are named by the
                module that performs them (``...attn.w_msa.matmul1``).
    kind:       ``linear`` | ``conv`` | ``matmul``.
    layer_type: one of ``SWIN_LAYER_TYPES`` for backbone sites, ``other`` elsewhere.
    block:      global index (0-based, forward order) of the transformer block the site is in;
                ``None`` outside blocks (patch embedding, patch merging, neck, heads).
    stage:      backbone stage index, ``None`` outside the backbone.
    params:     number of weight elements (0 for a matmul).
    macs:       multiply-accumulates per image at the reference input size (for BOPs), 0 if unknown.
    """

    name: str
    kind: str
    layer_type: str = 'other'
    block: int | None = None
    stage: int | None = None
    params: int = 0
    macs: int = 0

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f'site {self.name!r}: kind must be one of {SITE_KINDS}, got {self.kind!r}')
        if self.layer_type not in SWIN_LAYER_TYPES + ('other',):
            raise ValueError(f'site {self.name!r}: unknown layer type {self.layer_type!r}')
        if self.kind == 'matmul' and self.params:
            raise ValueError(f'site {self.name!r}: a matmul has no weights')

    @property
    def has_weights(self) -> bool:
        return self.kind != 'matmul'

    def to_dict(self) -> dict:
        return asdict(self)
