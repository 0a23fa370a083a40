"""timm / original / mmdet Swin names and weights: one rule table, checked numerically."""

import pytest
import timm
import torch
from mmdet.models.backbones import SwinTransformer

from mmdet_lrpq.models.swin_names import convert_swin_to_mmdet, load_mmdet_swin_from_timm, swin_name_to_mmdet


@pytest.mark.parametrize(
    'name, layout, expected',
    [
        ('layers.0.blocks.1.attn.qkv', 'timm', 'stages.0.blocks.1.attn.w_msa.qkv'),
        ('layers.2.blocks.5.attn.matmul2', 'timm', 'stages.2.blocks.5.attn.w_msa.matmul2'),
        ('layers.1.blocks.0.mlp.fc1.weight', 'timm', 'stages.1.blocks.0.ffn.layers.0.0.weight'),
        ('layers.3.blocks.1.mlp.fc2', 'timm', 'stages.3.blocks.1.ffn.layers.1'),
        ('layers.1.downsample.reduction', 'timm', 'stages.0.downsample.reduction'),
        ('layers.1.downsample.reduction', 'original', 'stages.1.downsample.reduction'),
        ('patch_embed.proj.bias', 'timm', 'patch_embed.projection.bias'),
        ('head.fc.weight', 'timm', None),
        ('norm.weight', 'timm', None),
    ],
)
def test_name_mapping(name, layout, expected):
    assert swin_name_to_mmdet(name, layout) == expected


def test_unknown_name_is_an_error():
    with pytest.raises(KeyError, match='unknown Swin name'):
        swin_name_to_mmdet('stages.0.blocks.0.attn.w_msa.qkv')


def _randomized_timm(**kw):
    torch.manual_seed(0)
    model = timm.create_model(
        'swin_tiny_patch4_window7_224', pretrained=False, always_partition=True, strict_img_size=False, **kw
    ).eval()
    for name, p in model.named_parameters():  # non-trivial norms, so a wrong channel order shows
        if 'norm' in name:
            p.data = torch.randn_like(p) * 0.5 + (1.0 if name.endswith('weight') else 0.0)
    return model


@pytest.mark.parametrize('size', [(224, 224), (448, 224)])
def test_timm_weights_in_mmdet_swin_give_the_same_stage_features(size):
    """Within 1e-5 at sizes where no window padding occurs (timm rolls before padding, mmdet after)."""
    timm_swin = _randomized_timm()
    mmdet_swin = SwinTransformer(
        embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_indices=(0, 1, 2, 3)
    )
    mmdet_swin.eval()
    load_mmdet_swin_from_timm(mmdet_swin, timm_swin.state_dict())
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        outs = mmdet_swin(x)
        h = timm_swin.patch_embed(x)
        for i, layer in enumerate(timm_swin.layers):
            h = layer(h)
            expected = getattr(mmdet_swin, f'norm{i}')(h).permute(0, 3, 1, 2)
            assert outs[i].shape == expected.shape
            torch.testing.assert_close(outs[i], expected, atol=1e-5, rtol=0)


def test_size_mismatch_is_reported_with_counts():
    small = SwinTransformer(embed_dims=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
    with pytest.raises(ValueError, match=r'mismatch: \d+ of \d+ tensors have a different shape'):
        load_mmdet_swin_from_timm(small, _randomized_timm().state_dict())


def test_convert_drops_head_and_reorders_patch_merging():
    sd = _randomized_timm().state_dict()
    out = convert_swin_to_mmdet(sd)
    assert not any(k.startswith(('head', 'norm.')) for k in out)
    w = sd['layers.1.downsample.reduction.weight']
    assert not torch.equal(out['stages.0.downsample.reduction.weight'], w)
    assert torch.equal(out['stages.0.downsample.reduction.weight'].sort(1).values, w.sort(1).values)
