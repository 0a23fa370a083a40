"""Names and weights across the three Swin layouts this project meets.

* **timm** (``timm.models.SwinTransformer``; the LRP model): ``layers.i.blocks.j.attn.qkv``,
  ``mlp.fc1``, the patch merging of stage ``i`` at the *start* of stage ``i`` (``layers.i.downsample``).
* **original** (Microsoft's Swin and the official mmdet-2.x Swin detection checkpoints): the same
  names, but patch merging at the *end* of stage ``i`` (``layers.i.downsample``).
* **mmdet** 3.x (``mmdet.models.backbones.SwinTransformer``): ``stages.i.blocks.j.attn.w_msa.qkv``,
  ``ffn.layers.0.0``/``ffn.layers.1``, ``stages.i.downsample`` at the end of stage ``i``,
  ``patch_embed.projection``; patch merging samples its 2×2 neighbourhood with ``nn.Unfold``, so
  its channel order differs and its weights are permuted on the way in.

One rule table maps parameter keys and quantization-site names alike (a site name is a module
path, and matmul sites live under the attention module), so the LRP plan, the converters and the
adapters can never disagree. Pure PyTorch: no mmdet import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

# (pattern on the timm/original name, replacement in mmdet) — applied in order, first match wins.
_BLOCK_RULES = [
    (r'^layers\.(\d+)\.blocks\.(\d+)\.attn\.', r'stages.\1.blocks.\2.attn.w_msa.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1(\.|$)', r'stages.\1.blocks.\2.ffn.layers.0.0\3'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2(\.|$)', r'stages.\1.blocks.\2.ffn.layers.1\3'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2)(\.|$)', r'stages.\1.blocks.\2.\3\4'),
    (r'^patch_embed\.proj(\.|$)', r'patch_embed.projection\1'),
    (r'^patch_embed\.norm(\.|$)', r'patch_embed.norm\1'),
]
_DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.(norm|reduction)(\.|$)(.*)')
# Names with no counterpart in mmdet's backbone (classification head, final norm, buffers that
# mmdet computes itself).
_NO_COUNTERPART = re.compile(r'^(head\.|norm\.|norm$|head$)|relative_position_index$|attn_mask$')


def swin_architecture(embed_dims: int, depths, num_heads, window_size: int, patch_size: int, mlp_ratio: float) -> dict:
    """The fields a Swin bit plan records and is checked against (same keys for timm and mmdet)."""
    return {
        'family': 'swin',
        'embed_dims': int(embed_dims),
        'depths': [int(d) for d in depths],
        'num_heads': [int(h) for h in num_heads],
        'window_size': int(window_size),
        'patch_size': int(patch_size),
        'mlp_ratio': float(mlp_ratio),
    }


def swin_name_to_mmdet(name: str, layout: str = 'timm') -> str | None:
    """Map a timm/original Swin parameter key or module/site name to mmdet's; ``None`` if it has none.

    ``layout='timm'``: patch merging ``layers.i.downsample`` belongs to mmdet's ``stages.(i-1)``;
    ``layout='original'``: to ``stages.i``.
    """
    if layout not in ('timm', 'original'):
        raise ValueError(f"layout must be 'timm' or 'original', got {layout!r}")
    if _NO_COUNTERPART.search(name):
        return None
    m = _DOWNSAMPLE.match(name)
    if m:
        stage = int(m.group(1)) - (1 if layout == 'timm' else 0)
        return f'stages.{stage}.downsample.{m.group(2)}{m.group(3)}{m.group(4)}'
    for pattern, repl in _BLOCK_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(f'unknown Swin name {name!r}: not part of a timm/original Swin backbone')


def _unfold_reduction_order(w: Tensor) -> Tensor:
    """Patch-merging Linear weight: timm/original 2×2 concat order -> mmdet's nn.Unfold order."""
    out_ch, in_ch = w.shape
    return w.reshape(out_ch, 4, in_ch // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_ch, in_ch)


def _unfold_norm_order(v: Tensor) -> Tensor:
    in_ch = v.shape[0]
    return v.reshape(4, in_ch // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_ch)


def convert_swin_to_mmdet(state_dict: Mapping[str, Tensor], layout: str = 'timm') -> dict[str, Tensor]:
    """Convert a timm/original Swin backbone state dict to mmdet's SwinTransformer keys and order.

    Keys without an mmdet counterpart (``head.*``, final ``norm``, index/mask buffers) are dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = swin_name_to_mmdet(key, layout)
        if new is None:
            continue
        if '.downsample.reduction.' in new:
            value = _unfold_reduction_order(value)
        elif '.downsample.norm.' in new:
            value = _unfold_norm_order(value)
        out[new] = value
    return out


def load_mmdet_swin_from_timm(mmdet_swin: torch.nn.Module, timm_state_dict: Mapping[str, Tensor]) -> None:
    """Load a timm Swin classifier's weights into an mmdet ``SwinTransformer`` (strict on real weights)."""
    converted = convert_swin_to_mmdet(timm_state_dict, layout='timm')
    own = mmdet_swin.state_dict()
    wrong = [k for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f'timm -> mmdet Swin conversion mismatch: {len(wrong)} of {len(converted)} tensors '
            f'have a different shape (e.g. {k}: {tuple(converted[k].shape)} vs '
            f'{tuple(own[k].shape)}); are the two models the same size?'
        )
    result = mmdet_swin.load_state_dict(converted, strict=False)
    missing = [
        k for k in result.missing_keys if not (k.endswith('relative_position_index') or re.match(r'^norm\d+\.', k))
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f'timm -> mmdet Swin conversion mismatch: {len(missing)} missing '
            f'(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected '
            f'(e.g. {result.unexpected_keys[:3]}); are the two models the same size?'
        )


def convert_mmdet2_detector_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Official mmdet-2.x Swin detector checkpoint -> mmdet 3.x keys.

    Only the backbone differs (it used Microsoft's original Swin code): its keys go through the
    'original' layout rules and the patch-merging reorder; neck and heads are unchanged. Returns
    the new state dict and the number of backbone tensors converted.
    """
    backbone = {k[len('backbone.') :]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if not any(k.startswith('layers.') for k in backbone):
        raise ValueError(
            'no backbone.layers.* keys: this is not an mmdet-2.x (original-layout) Swin detector '
            'checkpoint (already converted?)'
        )
    out = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    # norm0..3 (the detection outputs) keep their names in both layouts
    converted = {}
    for key, value in backbone.items():
        if re.match(r'^norm\d+\.', key):
            converted[key] = value
    converted.update(
        convert_swin_to_mmdet({k: v for k, v in backbone.items() if not re.match(r'^norm\d+\.', k)}, layout='original')
    )
    out.update({'backbone.' + k: v for k, v in converted.items()})
    return out, len(converted)
