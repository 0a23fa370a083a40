"""Relevance propagation (Chefer et al. 2021) through timm's ``SwinTransformer``, and site scores.

How: an explicit forward over the timm modules' own parameters reproduces timm's logits (eval
semantics whatever ``model.training`` says: dropout and drop-path are identities) while keeping
the values the relevance rules need. The model is cut into *units* (each patch merging, each
block, the head) whose inputs are detached leaves, so the gradient of the target logit is taken
one unit at a time as the explicit relevance backward walks the units in reverse; each unit's
graph and records are freed once its sites are scored. Nothing loops over images, windows,
heads or channels.

Relevance rules (see :mod:`.rules`): Linear alpha1/beta0 without the bias; LayerNorm, GELU,
softmax, dropout pass relevance unchanged; ``q@kᵀ`` and ``attn@v`` split it half/half by the
z-rule; the relative-position bias and the shift mask are constants, so the relevance of the
attention logits goes to ``q@kᵀ`` whole; residual adds split it by Chefer's rescaled z-rule (per
image); cyclic shift, window partition and the 2x2 patch-merging regrouping move relevance with
the values; relevance reaching zero padding is dropped (and reported); the head is alpha1/beta0
on its Linear and the z-rule on the mean pool. Relevance starts as the one-hot target logit, so
every image carries a total relevance of 1.

Site scores (docs/method.md): ``mean(clamp(∂y_t/∂Y ⊙ R_Y, min=0))`` over the elements (and heads)
of the site output ``Y`` (a Linear's output includes its bias; ``qkv`` is the whole q|k|v
output). For ``matmul1``, ``Y`` is the post-softmax attention map (the operand ``matmul2``
consumes and the log-√2 quantizer sees) and ``R_Y`` its half share from the ``attn@v`` z-rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, window_partition
from torch import Tensor, nn

from ..swin import check_swin, swin_units, unit_sites
from .rules import linear_relevance, matmul_relevance, mean_pool_relevance, residual_relevance


@dataclass
class SwinRelevance:
    """What one relevance pass over a batch of ``B`` images produced.

    logits:            ``(B, classes)`` from the explicit forward (equal to ``model(images)``).
    targets:           ``(B,)`` the class whose logit was explained.
    site_scores:       site name -> ``(B,)`` float64 score of each image.
    relevance_sums:    ``'logits'``, ``'pool'`` (pooled features), ``'norm'`` (last block output)
                       and every unit name (``layers.i.downsample``, ``layers.i.blocks.j``) ->
                       ``(B,)`` float64 total relevance at that point (at a unit's *input*).
    padding_relevance: unit name -> ``(B,)`` float64 relevance that reached the zero padding
                       inside the unit and was dropped there (only units that pad).
    """

    logits: Tensor
    targets: Tensor
    site_scores: dict[str, Tensor]
    relevance_sums: dict[str, Tensor]
    padding_relevance: dict[str, Tensor]


def _linear(x: Tensor, layer: nn.Linear | nn.Conv2d) -> Tensor:
    """The Linear with detached parameters: no weight gradients are ever needed."""
    return F.linear(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())


def _linear_relevance(x: Tensor, layer: nn.Linear | nn.Conv2d, out: Tensor, relevance: Tensor) -> Tensor:
    bias = None if layer.bias is None else layer.bias.detach()
    return linear_relevance(x, layer.weight.detach(), bias, out, relevance)


def _per_image_sum(t: Tensor, batch: int) -> Tensor:
    return t.reshape(batch, -1).sum(1).double()


# ----------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class _Windows:
    """A block's cyclic shift + zero padding + window partition of an H x W map, as index maps.

    One gather replaces roll, pad and partition (and one their inverse), for the values and the
    relevance alike. ``to_windows[i]`` is the token (``H*W`` = a zero padding token) at windowed
    position ``i``; ``from_windows[t]`` is the windowed position of token ``t``.
    """

    to_windows: Tensor
    from_windows: Tensor
    padded_size: tuple[int, int]

    @classmethod
    def of(cls, block: SwinTransformerBlock, H: int, W: int, device: torch.device) -> _Windows:
        (wh, ww), (sh, sw) = block.window_size, block.shift_size
        Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
        tokens = torch.arange(H * W, device=device).view(1, H, W, 1)
        if sh or sw:
            tokens = torch.roll(tokens, shifts=(-sh, -sw), dims=(1, 2))
        tokens = F.pad(tokens, (0, 0, 0, Wp - W, 0, Hp - H), value=H * W)
        to_windows = window_partition(tokens, (wh, ww)).flatten()
        return cls(to_windows, to_windows.argsort()[: H * W], (Hp, Wp))

    @property
    def padded(self) -> bool:
        return self.to_windows.numel() > self.from_windows.numel()

    def partition(self, t: Tensor, window_area: int) -> Tensor:
        """(B, H, W, C) -> (B * windows, window_area, C)."""
        B, _, _, C = t.shape
        t = t.reshape(B, -1, C)
        if self.padded:
            t = torch.cat([t, t.new_zeros(B, 1, C)], dim=1)
        return t.index_select(1, self.to_windows).view(-1, window_area, C)

    def reverse(self, windows: Tensor, H: int, W: int) -> Tensor:
        """(B * windows, window_area, C) -> (B, H, W, C); padding positions are cropped."""
        C = windows.shape[-1]
        return windows.reshape(-1, self.to_windows.numel(), C).index_select(1, self.from_windows).view(-1, H, W, C)


def _rel_pos_bias(attn: Any) -> Tensor:  # timm's WindowAttention: its buffers by name
    n = attn.window_area
    table = attn.relative_position_bias_table.detach()
    return table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


def _block_forward(name: str, block: SwinTransformerBlock, x: Tensor) -> dict:
    B, H, W, C = x.shape
    attn_mod, mlp = block.attn, block.mlp
    windows = _Windows.of(block, H, W, x.device)
    if block.dynamic_mask:  # built for this input size; only the shape, device, dtype are read
        mask = block.get_attn_mask(x.new_empty(1, *windows.padded_size, 1))
    else:
        mask = cast(Tensor | None, block.attn_mask)
    xw = windows.partition(block.norm1(x), block.window_area)
    Bw, N, _ = xw.shape
    nh = attn_mod.num_heads
    qkv = _linear(xw, attn_mod.qkv)
    q, k, v = qkv.view(Bw, N, 3, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * attn_mod.scale
    qk = q @ k.transpose(-2, -1)
    logits = qk + _rel_pos_bias(attn_mod)
    if mask is not None:
        n_win = mask.shape[0]
        logits = (logits.view(-1, n_win, nh, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, nh, N, N)
    attn = attn_mod.softmax(logits)
    o = attn @ v
    p = _linear(o.transpose(1, 2).reshape(Bw, N, -1), attn_mod.proj)
    branch = windows.reverse(p, H, W)
    x1 = x + branch
    h2 = block.norm2(x1)
    f1 = _linear(h2, mlp.fc1)
    g = mlp.act(f1)
    f2 = _linear(g, mlp.fc2)
    sites = dict(zip(unit_sites(name), (qkv, attn, o, p, f1, f2)))
    return dict(
        x_in=x, out=x1 + f2, sites=sites, windows=windows, xw=xw, q=q, k=k, v=v, qk=qk, branch=branch, x1=x1, h2=h2, g=g
    )


def _block_relevance(
    name: str, block: SwinTransformerBlock, rec: dict, rel_out: Tensor
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Relevance at the block input, at its sites, and what was dropped into window padding."""
    x, sites = rec['x_in'], rec['sites']
    B, H, W, C = x.shape
    attn_mod, mlp = block.attn, block.mlp
    qkv, attn, o, p, f1, f2 = sites.values()
    Bw, nh, N, hd = o.shape

    rel_x1, rel_f2 = residual_relevance(rec['x1'], f2, rel_out)
    rel_f1 = _linear_relevance(rec['g'], mlp.fc2, f2, rel_f2)
    rel_h2 = _linear_relevance(rec['h2'], mlp.fc1, f1, rel_f1)
    rel_x, rel_branch = residual_relevance(x, rec['branch'], rel_x1 + rel_h2)

    windows = rec['windows']
    rel_p = windows.partition(rel_branch, N)
    rel_o = _linear_relevance(o.transpose(1, 2).reshape(Bw, N, -1), attn_mod.proj, p, rel_p)
    rel_o = rel_o.view(Bw, N, nh, hd).transpose(1, 2)
    rel_attn, rel_v = matmul_relevance(attn, rec['v'], o, rel_o)
    # softmax passes relevance on; bias and mask are constants: all of it reaches q@kᵀ
    rel_q, rel_kt = matmul_relevance(rec['q'], rec['k'].transpose(-2, -1), rec['qk'], rel_attn)
    rel_qkv = qkv.new_empty(Bw, N, 3, nh, hd)  # inverse of the forward's view + permute
    for i, rel_part in enumerate((rel_q, rel_kt.transpose(-2, -1), rel_v)):
        rel_qkv[:, :, i] = rel_part.transpose(1, 2)
    rel_qkv = rel_qkv.view(Bw, N, -1)
    rel_xw = _linear_relevance(rec['xw'], attn_mod.qkv, qkv, rel_qkv)
    rel_in = rel_x + windows.reverse(rel_xw, H, W)

    padding = None
    if windows.padded:  # padded tokens have a zero input: their qkv relevance has nowhere to go
        is_pad = (windows.to_windows == H * W).to(rel_qkv.dtype).view(1, -1, 1)
        padding = _per_image_sum(rel_qkv.view(B, -1, rel_qkv.shape[-1]) * is_pad, B)
    return rel_in, dict(zip(sites, (rel_qkv, rel_attn, rel_o, rel_p, rel_f1, rel_f2))), padding


# ----------------------------------------------------------------------------- patch merging


def _merge_forward(name: str, merge: PatchMerging, x: Tensor) -> dict:
    B, H, W, C = x.shape
    x_pad = F.pad(x, (0, 0, 0, W % 2, 0, H % 2)) if (H % 2 or W % 2) else x
    Hp, Wp = x_pad.shape[1:3]
    grouped = x_pad.reshape(B, Hp // 2, 2, Wp // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
    h = merge.norm(grouped)
    y = _linear(h, merge.reduction)
    return dict(x_in=x, out=y, sites={f'{name}.reduction': y}, h=h)


def _merge_relevance(
    name: str, merge: PatchMerging, rec: dict, rel_out: Tensor
) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    B, H, W, C = rec['x_in'].shape
    y = rec['out']
    rel_h = _linear_relevance(rec['h'], merge.reduction, y, rel_out)
    H2, W2 = rel_h.shape[1:3]
    rel_pad = rel_h.view(B, H2, W2, 2, 2, C).permute(0, 1, 4, 2, 3, 5).reshape(B, 2 * H2, 2 * W2, C)
    padding = None
    if H % 2 or W % 2:  # LayerNorm makes the zero padding non-zero, so it takes relevance: dropped
        padding = _per_image_sum(rel_pad[:, H:], B) + _per_image_sum(rel_pad[:, :H, W:], B)
    return rel_pad[:, :H, :W], {f'{name}.reduction': rel_out}, padding


# ------------------------------------------------------------------------------------ model


def _unit_fns(unit: nn.Module) -> tuple[Callable, Callable]:
    """(forward, relevance) functions of a unit."""
    if isinstance(unit, SwinTransformerBlock):
        return _block_forward, _block_relevance
    return _merge_forward, _merge_relevance


def _site_score(grad: Tensor, rel: Tensor, batch: int) -> Tensor:
    return (grad * rel).clamp_(min=0).reshape(batch, -1).mean(1).double()


def swin_relevance(model: SwinTransformer, images: Tensor, targets: Tensor | None = None) -> SwinRelevance:
    """One relevance pass over ``images`` (B, 3, H, W) at the model's input size.

    ``targets``: ``(B,)`` class indices; a negative entry (or ``targets=None``) explains the
    predicted class. Deterministic, and each image's results do not depend on the rest of the
    batch (up to float rounding of batched matmuls).
    """
    check_swin(model)
    fc = model.head.fc
    images = images.to(device=fc.weight.device, dtype=fc.weight.dtype)
    B = images.shape[0]

    with torch.no_grad():
        x = model.patch_embed(images)
    records = []
    with torch.enable_grad():
        for name, unit in swin_units(model):
            rec = _unit_fns(unit)[0](name, unit, x.detach().requires_grad_())
            records.append((name, unit, rec))
            x = rec['out']
        x_last = x.detach().requires_grad_()
        features = model.norm(x_last)
        pooled = features.mean((1, 2))
        logits = _linear(pooled, fc)

    if targets is None:
        targets = torch.full((B,), -1, dtype=torch.long, device=logits.device)
    targets = targets.to(device=logits.device, dtype=torch.long)
    if targets.shape != (B,) or (targets >= logits.shape[1]).any():
        raise ValueError(
            f'targets must be {B} class indices < {logits.shape[1]} (negative = predicted), got {targets.tolist()}'
        )
    targets = torch.where(targets < 0, logits.detach().argmax(1), targets)
    grad = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x_last)[0]

    scores: dict[str, Tensor] = {}
    padding: dict[str, Tensor] = {}
    with torch.no_grad():
        logits = logits.detach()
        one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        rel_pooled = _linear_relevance(pooled.detach(), fc, logits, one_hot)
        rel = mean_pool_relevance(features.detach(), rel_pooled[:, None, None, :], (1, 2))
        sums = {
            'logits': _per_image_sum(one_hot, B),
            'pool': _per_image_sum(rel_pooled, B),
            'norm': _per_image_sum(rel, B),
        }
    del x, x_last, features, pooled

    while records:
        name, unit, rec = records.pop()
        wanted = list(rec['sites'].values()) + ([rec['x_in']] if records else [])
        grads = torch.autograd.grad(rec['out'], wanted, grad)
        with torch.no_grad():
            rel, site_rels, pad = _unit_fns(unit)[1](name, unit, rec, rel)
            for (site, site_rel), site_grad in zip(site_rels.items(), grads):
                scores[site] = _site_score(site_grad, site_rel, B)
            sums[name] = _per_image_sum(rel, B)
        if pad is not None:
            padding[name] = pad
        if records:
            grad = grads[-1]
        del rec, grads, site_rels

    order = [site for name, _ in swin_units(model) for site in unit_sites(name)]
    return SwinRelevance(logits, targets, {s: scores[s] for s in order}, sums, padding)
