"""Does a checkpoint fit a model? Counts and the likely fix instead of mmengine's wall of keys.

mmengine loads checkpoints non-strictly and only *warns* about mismatches, which would let a
detector with randomly initialised layers be evaluated and its AP reported. We refuse instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Buffers a model recomputes itself; their absence from a checkpoint is harmless.
_SELF_COMPUTED = ('relative_position_index',)


def _state_dict_of(checkpoint) -> Mapping:
    if isinstance(checkpoint, Mapping):
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    return checkpoint


def load_checkpoint_file(path: str):
    """``torch.load`` (weights only), with an unreadable file reported by name instead of a torch traceback."""
    from ..safe_load import allow_mmengine_checkpoints

    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except torch.serialization.pickle.UnpicklingError as err:
        raise ValueError(
            f'checkpoint {path} holds objects that weights-only loading refuses ({str(err).splitlines()[0]}); '
            f'it is not an mmdet/mmengine checkpoint, or it must be re-saved as a plain state dict'
        ) from None
    except Exception as err:
        raise ValueError(
            f'checkpoint {path} is unreadable ({type(err).__name__}: {str(err).strip()[:200]}); it is '
            f'truncated or corrupt: download or save it again'
        ) from None


def check_checkpoint_fits(model: nn.Module, path: str) -> None:
    """Raise ``ValueError`` unless every model tensor is in the checkpoint with the same shape."""
    saved = _state_dict_of(load_checkpoint_file(path))
    if not isinstance(saved, Mapping) or not saved:
        raise ValueError(f'{path} holds no state dict (expected a dict of tensors, or one under "state_dict")')
    own = model.state_dict()
    missing = [k for k in own if k not in saved and not k.endswith(_SELF_COMPUTED)]
    unexpected = [k for k in saved if k not in own and not k.endswith(_SELF_COMPUTED)]
    shapes = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    hints = []
    if any(k.startswith('backbone.layers.') for k in unexpected):
        hints.append(
            'its backbone keys are in the original Swin layout of the official mmdet-2.x '
            'checkpoints: convert it first with `python tools/convert_checkpoint.py IN OUT`'
        )
    if shapes:
        k = shapes[0]
        hints.append(
            f'shapes differ, e.g. {k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)} '
            f'(a different model size or number of classes?)'
        )
    raise ValueError(
        f'checkpoint {path} does not fit the model: {len(missing)} of {len(own)} model tensors are '
        f'missing from it (e.g. {missing[:2]}), {len(unexpected)} of its {len(saved)} tensors are '
        f'unexpected (e.g. {unexpected[:2]}), {len(shapes)} have other shapes. ' + ' '.join(hints)
    )
