"""LRP on timm's Swin: exact forward, conserved relevance, well-formed site scores, image loading."""

import io
import math

import pytest
import timm
import torch
from PIL import Image
from timm.models.swin_transformer import SwinTransformer

from conftest import randomize_
from mmdet_lrpq.lrp import (
    UnreadableImageError,
    eval_transform,
    iter_batches,
    iter_images,
    linear_relevance,
    list_images,
    load_image,
    lrp_site_scores,
    matmul_relevance,
    mean_pool_relevance,
    relative_importance,
    residual_relevance,
    swin_relevance,
)
from mmdet_lrpq.models.timm_swin import swin_sites
from mmdet_lrpq.plan.sites import SWIN_LAYER_TYPES
from mmdet_lrpq.swin import swin_site_layout

TOL = 1e-4  # conservation tolerance in float32 (total relevance is 1; the measured error is < 1e-6)


def tiny_swin(img_size=112, seed=0, **kwargs) -> SwinTransformer:
    torch.manual_seed(seed)
    kwargs = dict(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        num_classes=10,
        always_partition=True,
        img_size=img_size,
        **kwargs,
    )
    return randomize_(SwinTransformer(**kwargs), seed)


def images(n, size, seed=0):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def tiny112():
    """Stage 3 is 4x4 tokens for a 7x7 window (padded, shifted, masked); 7x7 -> 4x4 merging pads."""
    return tiny_swin(112)


@pytest.fixture(scope='module')
def tiny112_result(tiny112):
    return swin_relevance(tiny112, images(2, (112, 112)))


# ------------------------------------------------------------------------------ relevance rules


def randn64(gen, *shapes):
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def test_linear_rule_is_alpha1_beta0_and_conserves():
    gen = torch.Generator().manual_seed(0)
    x, w, rel = randn64(gen, (5, 7, 16), (12, 16), (5, 7, 12))
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = rel / (xp @ wp.T + xn @ wn.T)
    expected = xp * (s @ wp) + xn * (s @ wn)
    got = linear_relevance(x, w, None, x @ w.T, rel)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum(), rel.sum(), rtol=1e-10, atol=0)
    bias = torch.randn(12, generator=gen, dtype=torch.float64)  # excluded: same relevance
    with_bias = linear_relevance(x, w, bias, x @ w.T + bias, rel)
    torch.testing.assert_close(with_bias, expected, rtol=1e-9, atol=1e-12)
    # a row of zero input (zero padding) has nowhere to send its relevance: it is dropped, not inf/nan
    x[0, 0] = 0
    got = linear_relevance(x, w, None, x @ w.T, rel)
    assert torch.isfinite(got).all() and (got[0, 0] == 0).all()
    torch.testing.assert_close(got.sum(), rel.sum() - rel[0, 0].sum(), rtol=1e-10, atol=0)


def test_matmul_residual_and_pool_rules_conserve_per_image():
    gen = torch.Generator().manual_seed(1)
    a, b, rel = randn64(gen, (3, 2, 6, 5), (3, 2, 5, 6), (3, 2, 6, 6))
    ra, rb = matmul_relevance(a, b, a @ b, rel)
    torch.testing.assert_close(ra.sum(), rel.sum() / 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(rb.sum(), rel.sum() / 2, rtol=1e-10, atol=0)

    x, y = randn64(gen, (4, 9, 8), (4, 9, 8))
    rel = torch.rand(4, 9, 8, generator=gen, dtype=torch.float64)
    rx, ry = residual_relevance(x, y, rel)
    torch.testing.assert_close((rx + ry).sum((1, 2)), rel.sum((1, 2)), rtol=1e-10, atol=0)
    rx1, ry1 = residual_relevance(x[1:2], y[1:2], rel[1:2])  # an image's relevance ignores the batch
    torch.testing.assert_close(rx1, rx[1:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(ry1, ry[1:2], rtol=1e-12, atol=0)

    tokens = x.view(4, 3, 3, 8)
    rel_pooled = torch.rand(4, 1, 1, 8, generator=gen, dtype=torch.float64)
    rp = mean_pool_relevance(tokens, rel_pooled, (1, 2))
    torch.testing.assert_close(rp, tokens * rel_pooled / tokens.sum((1, 2), keepdim=True))
    torch.testing.assert_close(rp.sum((1, 2)), rel_pooled.sum((1, 2)), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------- forward and relevance


@pytest.mark.parametrize(
    'img_size, input_hw, kwargs',
    [
        (224, (224, 224), {}),  # 56/28/14/7 tokens: shift + mask everywhere
        (112, (112, 112), {}),  # padded 4x4 stage, padded merging
        (96, (128, 96), dict(dynamic_img_size=True, window_size=(4, 6))),  # masks built per input, odd sizes
    ],
)
def test_explicit_forward_reproduces_timm_logits(img_size, input_hw, kwargs):
    model = tiny_swin(img_size, **kwargs)
    x = images(2, input_hw)
    result = swin_relevance(model, x)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all() and expected.std() > 0
    assert (result.logits - expected).abs().max() <= 1e-5
    assert result.targets.tolist() == expected.argmax(1).tolist()
    assert any(any(b.shift_size) for stage in model.layers for b in stage.blocks)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, TOL), (torch.float64, 1e-12)])
def test_relevance_conserved_at_every_block_boundary(dtype, tol):
    """Total relevance (per image) is 1 at the logits, the pooled features, the last block's output
    and the input of every block and patch merging, where nothing pads: Linear biases are excluded
    by the rules, so they absorb nothing. Measured: 7e-7 in float32, 2e-15 in float64."""
    model = tiny_swin(224, seed=3).to(dtype)
    result = swin_relevance(model, images(2, (224, 224), seed=3).to(dtype))
    assert not result.padding_relevance
    assert len(result.relevance_sums) == 3 + 8 + 3  # logits, pool, norm, blocks, mergings
    worst = max((sums - 1).abs().max().item() for sums in result.relevance_sums.values())
    assert worst <= tol, result.relevance_sums


def test_padding_drops_exactly_the_relevance_it_receives(tiny112_result):
    """With padding, relevance at each unit's input + all relevance sent into zero padding at or after
    that unit = 1: padding is the only place relevance leaves."""
    r = tiny112_result
    assert set(r.padding_relevance) == {'layers.3.downsample', 'layers.3.blocks.0', 'layers.3.blocks.1'}
    assert r.padding_relevance['layers.3.downsample'].min() > 1e-3
    assert r.padding_relevance['layers.3.blocks.0'].min() > 1e-3
    # in the shifted block the padding lands in its own mask region: real tokens never attend to it
    assert r.padding_relevance['layers.3.blocks.1'].abs().max() < 1e-12
    lost = torch.zeros(2, dtype=torch.float64)
    for unit, sums in list(r.relevance_sums.items())[3:]:  # from the last block down to the first
        lost = lost + r.padding_relevance.get(unit, 0)
        torch.testing.assert_close(sums + lost, torch.ones(2, dtype=torch.float64), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------- scores


def test_scores_cover_every_site_and_are_finite_nonnegative_deterministic(tiny112, tiny112_result):
    names = [s.name for s in swin_site_layout(tiny112)]
    assert list(tiny112_result.site_scores) == names and len(names) == 8 * 6 + 3
    scores = torch.stack(list(tiny112_result.site_scores.values()))
    assert torch.isfinite(scores).all() and (scores >= 0).all() and (scores > 0).float().mean() > 0.9
    again = swin_relevance(tiny112, images(2, (112, 112)))
    assert all(torch.equal(again.site_scores[n], tiny112_result.site_scores[n]) for n in names)


def test_score_is_gradient_times_relevance_through_timms_own_forward(tiny112):
    """Independent check of the last fc2 site: timm's modules + autograd for ∂y_t/∂Y, the head and
    residual rules applied by hand for R_Y."""
    x, target = images(1, (112, 112), seed=5), 3
    block = tiny112.layers[3].blocks[1]
    seen = {}
    hooks = [
        block.mlp.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__('fc2', o)),
        block.register_forward_hook(lambda m, i, o: seen.__setitem__('out', o)),
    ]
    logits = tiny112(x)
    for h in hooks:
        h.remove()
    grad = torch.autograd.grad(logits[0, target], seen['fc2'])[0]
    with torch.no_grad():
        features = tiny112.norm(seen['out'])
        pooled = features.mean((1, 2))
        fc = tiny112.head.fc
        rel_pooled = linear_relevance(pooled, fc.weight, fc.bias, logits.detach(), torch.eye(10)[[target]])
        rel_out = mean_pool_relevance(features, rel_pooled[:, None, None], (1, 2)).flatten(1, 2)
        f2 = seen['fc2']
        _, rel_f2 = residual_relevance(seen['out'].flatten(1, 2) - f2, f2, rel_out)
    expected = (grad * rel_f2).clamp(min=0).mean().item()
    got = swin_relevance(tiny112, x, torch.tensor([target])).site_scores['layers.3.blocks.1.mlp.fc2']
    assert expected > 0
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_batched_scores_are_the_mean_of_single_image_scores(tiny112):
    x = images(3, (112, 112), seed=7)
    targets = [None, 4, 9]
    batched = lrp_site_scores(tiny112, x, targets=targets, batch_size=3)
    done = []
    singles = lrp_site_scores(tiny112, iter(x), targets=targets, batch_size=1, progress=done.append)
    assert done == [1, 2, 3]
    assert list(batched) == list(singles)
    for name in batched:
        assert batched[name] == pytest.approx(singles[name], rel=1e-4, abs=0), name
    per_image = [
        swin_relevance(tiny112, x[i : i + 1], torch.tensor([t if t is not None else -1])).site_scores
        for i, t in enumerate(targets)
    ]
    for name in batched:
        assert batched[name] == pytest.approx(sum(float(s[name]) for s in per_image) / 3, rel=1e-4), name
    with pytest.raises(ValueError):
        lrp_site_scores(tiny112, x, targets=[1, 2])
    with pytest.raises(ValueError, match='no images'):
        lrp_site_scores(tiny112, [])


def test_relative_importance_has_mean_one_within_each_type(tiny112_result):
    raw = {n: float(s.mean()) for n, s in tiny112_result.site_scores.items()}
    rel = relative_importance(raw)
    assert list(rel) == list(raw)
    for layer_type in ('qkv', 'matmul1', 'matmul2', 'proj', 'fc1', 'fc2', 'reduction'):
        values = [v for n, v in rel.items() if n.endswith(layer_type)]
        assert len(values) == (3 if layer_type == 'reduction' else 8)
        assert sum(values) / len(values) == pytest.approx(1.0, abs=1e-12)
    assert rel['layers.0.blocks.0.attn.qkv'] == pytest.approx(
        raw['layers.0.blocks.0.attn.qkv'] * 8 / sum(v for n, v in raw.items() if n.endswith('qkv'))
    )
    assert relative_importance({'layers.0.blocks.0.mlp.fc1': 0.0, 'layers.0.blocks.1.mlp.fc1': 0.0}) == {
        'layers.0.blocks.0.mlp.fc1': 1.0,
        'layers.0.blocks.1.mlp.fc1': 1.0,
    }
    with pytest.raises(ValueError):
        relative_importance({'layers.0.blocks.0.mlp.fc1': -1.0})
    with pytest.raises(ValueError):
        relative_importance({'head.fc': 1.0})


def test_swin_t_at_224_forward_conservation_sites_and_mmdet_names():
    from mmdet_lrpq.models.swin_names import swin_name_to_mmdet

    model = randomize_(
        timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, always_partition=True), seed=11
    )
    x = images(1, (224, 224), seed=11)
    result = swin_relevance(model, x)
    with torch.no_grad():
        assert (result.logits - model(x)).abs().max() <= 1e-5
    assert max((s - 1).abs().max().item() for s in result.relevance_sums.values()) <= TOL
    sites = swin_sites(model)
    assert [s.name for s in sites] == list(result.site_scores) and len(sites) == 12 * 6 + 3
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in result.site_scores.values())
    qkv0 = sites[0]
    assert (qkv0.kind, qkv0.layer_type, qkv0.block, qkv0.stage, qkv0.params, qkv0.macs) == (
        'linear',
        'qkv',
        0,
        0,
        96 * 288,
        56 * 56 * 96 * 288,
    )
    assert sites[1].macs == 64 * 3 * 49 * 49 * 32 and sites[1].params == 0
    assert [s.block for s in sites if s.layer_type == 'fc2'] == list(range(12))
    assert sum(s.macs for s in sites) / 1e9 == pytest.approx(4.47, abs=0.01)  # Swin-T: 4.5 GMACs
    assert {s.layer_type for s in sites} == set(SWIN_LAYER_TYPES) - {'patch_embed'}
    mapped = {s.name: swin_name_to_mmdet(s.name, 'timm') for s in sites}
    assert mapped['layers.1.downsample.reduction'] == 'stages.0.downsample.reduction'
    assert mapped['layers.2.blocks.5.attn.matmul1'] == 'stages.2.blocks.5.attn.w_msa.matmul1'
    assert mapped['layers.3.blocks.1.mlp.fc1'] == 'stages.3.blocks.1.ffn.layers.0.0'
    assert len(set(mapped.values())) == len(sites) and None not in mapped.values()


# MACs per image the sites' plans are budgeted with: forward hooks on the wrapped modules must give the
# numbers the closed-form count (window padding included) gave, or every plan's BOPs would move.
SWIN_T_MACS = {
    'layers.0.blocks.0.attn.qkv': 86_704_128,
    'layers.0.blocks.0.attn.matmul1': 14_751_744,
    'layers.0.blocks.0.attn.matmul2': 14_751_744,
    'layers.0.blocks.0.attn.proj': 28_901_376,
    'layers.0.blocks.0.mlp.fc1': 115_605_504,
    'layers.0.blocks.0.mlp.fc2': 115_605_504,
    'layers.1.downsample.reduction': 57_802_752,
    'layers.2.blocks.5.attn.qkv': 86_704_128,
    'layers.3.downsample.reduction': 57_802_752,
    'layers.3.blocks.1.attn.matmul2': 1_843_968,
    'layers.3.blocks.1.mlp.fc2': 115_605_504,
}
# Stage 3 of the 112-px tiny Swin is 4x4 tokens in a 7x7 window: attention runs on the padded window.
TINY112_MACS = {
    'layers.3.downsample.reduction': 16 * 512 * 256,
    'layers.3.blocks.0.attn.qkv': 49 * 256 * 768,
    'layers.3.blocks.0.attn.matmul1': 49 * 49 * 256,
    'layers.3.blocks.0.mlp.fc1': 16 * 256 * 1024,
}


def test_site_macs_are_the_ones_plans_were_budgeted_with(tiny112):
    swin_t = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)
    sites = {s.name: s.macs for s in swin_sites(swin_t)}
    assert {name: sites[name] for name in SWIN_T_MACS} == SWIN_T_MACS
    assert sum(sites.values()) == 4_475_347_968
    sites = {s.name: s.macs for s in swin_sites(tiny112)}
    assert {name: sites[name] for name in TINY112_MACS} == TINY112_MACS
    assert sum(sites.values()) == 116_642_304


def test_rejects_models_it_does_not_cover():
    with pytest.raises(TypeError):
        swin_relevance(torch.nn.Linear(3, 3), torch.zeros(1, 3))
    headless = tiny_swin(112)
    headless.reset_classifier(0)
    with pytest.raises(ValueError, match='head'):
        swin_relevance(headless, images(1, (112, 112)))
    with pytest.raises(ValueError, match='targets'):
        swin_relevance(tiny_swin(112), images(1, (112, 112)), torch.tensor([10]))


# ------------------------------------------------------------------------------------------ data


def _jpeg(mode='RGB', size=(40, 30), color=(200, 30, 90)):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != 'L' else 128).save(buf, 'JPEG')
    return buf.getvalue()


def test_image_order_labels_and_errors(tmp_path):
    for cls, n in (('n02', 3), ('n01', 1), ('n03', 2)):
        (tmp_path / 'val' / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / 'val' / cls / f'{cls}_{i}.JPEG').write_bytes(_jpeg())
    (tmp_path / 'wnids.txt').write_text('n01 first\nn02 second\n\nn03 third\n')
    items = list_images(tmp_path / 'val')
    assert [i.path.name for i in items] == [
        'n01_0.JPEG',
        'n02_0.JPEG',
        'n03_0.JPEG',
        'n02_1.JPEG',
        'n03_1.JPEG',
        'n02_2.JPEG',
    ]
    assert [i.label for i in items] == [0, 1, 2, 1, 2, 1]
    assert list_images(tmp_path / 'val', num_images=4) == items[:4]
    with pytest.raises(ValueError, match='only 6'):
        list_images(tmp_path / 'val', num_images=7)

    flat = tmp_path / 'flat'
    flat.mkdir()
    for name in ('b.png', 'a.jpg', '.hidden.jpg', 'notes.txt'):
        (flat / name).write_bytes(_jpeg())
    assert [(i.path.name, i.label) for i in list_images(flat)] == [('a.jpg', None), ('b.png', None)]

    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    with pytest.raises(ValueError, match='no images found'):
        list_images(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / 'missing')


def test_loader_converts_modes_and_names_a_corrupt_file(tmp_path):
    model = tiny_swin(112)
    transform = eval_transform(model)
    Image.new('CMYK', (50, 70), (0, 100, 200, 10)).save(tmp_path / 'cmyk.jpg')
    Image.new('P', (33, 90), 7).save(tmp_path / 'palette.png')
    Image.new('RGBA', (90, 33), (1, 2, 3, 4)).save(tmp_path / 'rgba.png')
    batches = list(iter_batches(list_images(tmp_path), transform, batch_size=2))
    assert [b.shape for b, _ in batches] == [(2, 3, 112, 112), (1, 3, 112, 112)]
    assert all(torch.isfinite(b).all() for b, _ in batches)

    broken = tmp_path / 'broken' / 'truncated.jpg'
    broken.parent.mkdir()
    data = _jpeg(size=(300, 200))
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match='truncated.jpg'):
        load_image(broken, transform)
    with pytest.raises(UnreadableImageError, match='truncated.jpg'):
        list(iter_images(list_images(broken.parent), transform))


def test_loader_on_real_imagenet_sample(imagenet_sample):
    """Real greyscale and odd-sized JPEGs go through timm's eval transform to the model's input size."""
    items = list_images(imagenet_sample / 'val')
    assert len(items) == 220 and items[0].path.parent.name == 'n01440764' and items[0].label == 0
    assert len({i.path.parent.name for i in items[:50]}) == 50  # spread over classes

    def header(item):
        with Image.open(item.path) as image:
            return image.mode, image.size

    grey = next(i for i in items if header(i)[0] == 'L')
    odd = next(i for i in items if header(i)[1][0] % 2 and header(i)[1][0] != header(i)[1][1])
    model = tiny_swin(112)
    transform = eval_transform(model)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for item in (grey, odd):
        x = load_image(item.path, transform)
        assert x.shape == (3, 112, 112) and torch.isfinite(x).all() and x.std() > 0.1
    pixels = load_image(grey.path, transform) * std[:, None, None] + mean[:, None, None]
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)  # grey -> equal RGB channels
    scores = lrp_site_scores(model, iter_images([grey, odd], transform), batch_size=2)
    assert all(math.isfinite(v) and v >= 0 for v in scores.values())


def test_lrp_plan_records_repo_relative_or_described_paths(tmp_path):
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location('lrp_plan_tool', repo / 'tools' / 'lrp_plan.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert (
        tool.recorded_path(str(repo / 'checkpoints' / 'miniworld' / 'swin_mini_cls.pth'))
        == 'checkpoints/miniworld/swin_mini_cls.pth'
    )
    assert tool.recorded_path('/data/imagenet/val/') == '<outside-repo>/imagenet/val'
    assert (
        tool.recorded_path(str(repo.parent / 'shared' / 'data' / 'imagenet_sample' / 'val'))
        == '<outside-repo>/imagenet_sample/val'
    )
    command = tool.recorded_command(
        [
            '--model',
            'swin_tiny_patch4_window7_224',
            '--images',
            '/data/imagenet/val',
            f'--checkpoint={tmp_path}/w.pth',
            '--out',
            str(repo / 'configs/plans/x.json'),
        ]
    )
    assert command == (
        'python tools/lrp_plan.py --model swin_tiny_patch4_window7_224 --images '
        f"'<outside-repo>/imagenet/val' '--checkpoint=<outside-repo>/{tmp_path.name}/w.pth' "
        '--out configs/plans/x.json'
    )
