"""MPTQ-ViT's options: SQ-b (``smooth='sq-b'``) and OPT-m (``gelu_scales='opt-m'``).

SQ-b's fold is exact in float (the miniature world's classifier and a Swin with padded windows, alone
and under CRL); its factors and the region-wise quantizer give the numbers their formulas say; the
options are validated and refused where they cannot combine; with both off nothing of theirs runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from mmdet_lrpq import QuantConfig, quantize_
from mmdet_lrpq.models.quantizer import ModelQuantizer
from mmdet_lrpq.quant import (
    QuantLinear,
    QuantState,
    RegionUniformQuantizer,
    activation_quantizers,
    calibrate_stream,
    fake_quant_regions,
    fake_quant_uniform,
    quant_modules,
    recording_ranges,
    region_qparams,
    set_quant_state,
    smooth_,
    uniform_qparams,
)
from mmdet_lrpq.quant import functional as F
from mmdet_lrpq.quant.smooth import sqb_factors
from test_api import images, tiny_timm_swin  # a Swin whose last stage pads its windows (112 px)


@pytest.fixture(scope='module')
def classifier():
    """The committed miniature-world classifier as tools/test_cls.py builds it, and 8 of its images."""
    from miniworld_classifier import classifier_and_images

    model, images, _ = classifier_and_images(1, 8)
    return model, images


def smoothed_float(model: nn.Module, config: QuantConfig, calib: list) -> ModelQuantizer:
    """``model`` wrapped (FLOAT) with SQ-b folded in from ``calib``."""
    q = ModelQuantizer(model, config)
    q.wrap()
    q.smooth(calib, lambda m, b: m(b))
    set_quant_state(model, QuantState.FLOAT)
    return q


# ------------------------------------------------------------------------------ SQ-b: exact in float
@pytest.mark.parametrize('method', ['none', 'crl'])
def test_sqb_folded_classifier_gives_the_float_outputs(classifier, method):
    model, x = classifier
    with torch.no_grad():
        ref = model(x)
    smoothed = copy.deepcopy(model)
    q = smoothed_float(smoothed, QuantConfig(method=method, smooth='sq-b'), [x[:4], x[4:]])
    assert len(q.smooth_pairs) == 2 * 8 + 3  # norm1/norm2 of 8 blocks, 3 mergings
    norm1 = smoothed.layers[0].blocks[0].norm1
    assert not torch.equal(norm1.weight, model.layers[0].blocks[0].norm1.weight)  # something was folded
    with torch.no_grad():
        got = smoothed(x)
    assert (got - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))


def test_sqb_then_crl_is_exact_in_float_with_padded_windows():
    """SQ-b, then CRL on the same LayerNorm pairs: two folds, the norm1 shifts composed behind the padding."""
    model = tiny_timm_swin()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    quantize_(
        model, QuantConfig(w_bits=8, a_bits=8, method='crl', smooth='sq-b', gelu_scales='opt-m'), calib=[x[:1], x[1:]]
    )
    set_quant_state(model, QuantState.FLOAT)
    with torch.no_grad():
        got = model(x)
    assert (got - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
    attn = model.layers[3].blocks[0].attn
    assert attn.input_shift is not None and attn.input_shift.shape == (256,)


def test_sqb_factors_are_the_formula():
    lo, hi = torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 2.0])  # the last channel constant
    weight = torch.tensor([[2.0, -0.5, 0.0], [-1.0, 0.25, 0.0]])  # column maxima 2, 0.5, 0
    s, z = sqb_factors(lo, hi, weight, alpha=0.5)
    assert z.tolist() == [1.0, 2.0, 2.0]
    torch.testing.assert_close(s, torch.tensor([1.0, 2.0, 1.0]), rtol=1e-6, atol=0)  # sqrt(2/2), sqrt(2/.5), 1e-5/1e-5
    s1, _ = sqb_factors(lo, hi, weight, alpha=1.0)
    torch.testing.assert_close(s1, torch.tensor([2.0, 2.0, 1e-5]))  # alpha=1: all on the weights
    with pytest.raises(ValueError, match='alpha must be in'):
        sqb_factors(lo, hi, weight, alpha=1.5)


def test_sqb_centres_and_balances_the_smoothed_inputs():
    """After the fold, each channel of the layer's input is centred on 0 and spans 2·a/s = 2·a^(1-α)·w^(1-α)."""
    torch.manual_seed(0)
    norm, fc = nn.LayerNorm(6), nn.Linear(6, 4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0, 8.0]))
        norm.bias.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5, -1.0]))
    layer = QuantLinear.from_float(fc)
    x = torch.randn(3, 10, 6)
    with recording_ranges({'fc': layer}) as ranges, torch.no_grad():
        layer(norm(x))
    lo, hi = ranges['fc'].lo.clone(), ranges['fc'].hi.clone()
    w_max = fc.weight.detach().abs().amax(0)
    ref = layer(norm(x)).detach()
    res = smooth_(norm, layer, ranges['fc'], alpha=0.5)
    with torch.no_grad():
        y = norm(x)
        torch.testing.assert_close(layer(y), ref, atol=1e-5, rtol=1e-5)
    new_lo, new_hi = y.reshape(-1, 6).aminmax(dim=0)
    torch.testing.assert_close(new_lo, -new_hi, atol=1e-5, rtol=0)
    torch.testing.assert_close(new_hi, ((hi - lo) / 2) ** 0.5 * w_max**0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.b * res.r, (lo + hi) / 2)  # b = z/s


# ------------------------------------------------------------------------------ OPT-m
def test_region_fake_quant_numbers():
    """4 bits, Δ = 0.5, zp = 3, m = 2: codes 0..2 below zero step by 0.125, codes 4..15 above by 0.5."""
    x = torch.tensor([-0.2, -1.0, 0.26, 10.0, 0.0, -0.0625, 4.4])
    qp = torch.tensor(0.5), torch.tensor(3.0), torch.tensor(2.0)
    want = [-0.25, -0.375, 0.5, 6.0, 0.0, -0.0, 4.5]  # -0.0625/0.125 rounds to even 0
    assert fake_quant_regions(x, *qp, bits=4).tolist() == want
    half = fake_quant_regions(x.to(torch.bfloat16), *qp, bits=4)
    assert half.dtype == torch.bfloat16 and half.float().tolist() == want
    d, z = torch.tensor(0.3), torch.tensor(5.0)  # m = 0 is the uniform quantizer
    assert torch.equal(fake_quant_regions(x, d, z, torch.tensor(0.0), 4), fake_quant_uniform(x, d, z, 4))


def _sse(x: torch.Tensor, qp: tuple, bits: int) -> float:
    return float(((x - fake_quant_regions(x, *qp, bits)) ** 2).double().sum())


@pytest.mark.parametrize('bits', [4, 6])
def test_opt_m_is_the_best_candidate_of_the_search_on_gelu_outputs(bits):
    x = nnf.gelu(torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 2.0)
    delta, zp, m = region_qparams(x, bits)
    levels = (1 << bits) - 1
    scores = {}
    for p in F.PERCENTILES:  # the candidates, from torch.quantile directly
        hi, lo = torch.quantile(x, p), torch.quantile(x, 1 - p)
        for e in F.OPT_M_EXPONENTS:
            d = (hi - lo * 2.0**e) / levels
            qp = (d, (-lo * 2.0**e / d).round(), torch.tensor(float(e)))
            scores[(p, e)] = (_sse(x, qp, bits), qp)
    best = min(scores, key=lambda key: scores[key][0])
    assert float(m) == best[1] and best[1] >= 2  # GELU's tail wants finer steps
    torch.testing.assert_close(delta, scores[best][1][0]) and float(zp) == float(scores[best][1][1])
    d_u, z_u = uniform_qparams(x, bits)  # m = 0: RepQ's own search
    uniform_sse = float(((x - fake_quant_uniform(x, d_u, z_u, bits)) ** 2).double().sum())
    assert uniform_sse == pytest.approx(min(scores[(p, 0)][0] for p in F.PERCENTILES), rel=1e-6)
    assert _sse(x, (delta, zp, m), bits) < 0.9 * uniform_sse


def test_region_qparams_of_constant_input_fall_back_to_uniform():
    delta, zp, m = region_qparams(torch.full((10,), -2.0), bits=4)
    assert (float(delta), float(zp), float(m)) == (pytest.approx(2 / 15), 15.0, 0.0)


def test_opt_m_batches_combine_to_the_envelope_of_the_regions():
    layer = QuantLinear(8, 2)
    layer.input_quantizer = RegionUniformQuantizer(4)
    a = nnf.gelu(torch.randn(1, 500, 8, generator=torch.Generator().manual_seed(1)))
    b = nnf.gelu(torch.randn(1, 500, 8, generator=torch.Generator().manual_seed(2)) * 4)
    per_batch = [region_qparams(t, 4) for t in (a, b)]
    lo = min(float(-z * d * 2.0**-e) for d, z, e in per_batch)
    hi = max(float((15 - z) * d) for d, z, e in per_batch)
    m = min(float(e) for _, _, e in per_batch)
    calibrate_stream(layer, [a, b], lambda mod, t: mod(t))
    q = layer.input_quantizer
    assert float(q.ratio_exp) == m
    assert float(q.delta) == pytest.approx((hi - lo * 2**m) / 15, rel=1e-6)
    assert float(q.zero_point) == round(-lo * 2**m / float(q.delta))
    assert per_batch[0][2] != per_batch[1][2]  # the batches chose different ratios


def test_opt_m_quantizes_the_swin_fc2_inputs_and_survives_a_state_file(tmp_path):
    model, twin = tiny_timm_swin(), tiny_timm_swin()
    x = images(2)
    config = QuantConfig(w_bits=4, a_bits=4, method='none', smooth='sq-b', gelu_scales='opt-m')
    report = quantize_(model, config, calib=[x[:1], x[1:]], state_file=str(tmp_path / 's.pt'))
    fc2 = [
        n
        for n, m in quant_modules(model).items()
        if isinstance(getattr(m, 'input_quantizer', None), RegionUniformQuantizer)
    ]
    assert fc2 == [f'layers.{i}.blocks.{j}.mlp.fc2' for i in range(4) for j in range(2)]
    assert report.granularity['layers.0.blocks.0.mlp.fc2'] == 'w:channel a:regions (opt-m)'
    assert report.reparameterized['layers.0.blocks.0.attn.qkv'] == 'sq-b(alpha=0.5)'
    assert report.calibration['smoothing']['pairs'] == 19 and report.calibration['smoothing']['batches'] == 2
    assert report.to_dict()['settings']['smooth'] == 'sq-b'
    loaded = quantize_(twin, config, calib=[x[:1], x[1:]], state_file=str(tmp_path / 's.pt'))
    assert loaded.calibration == report.calibration
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


# ------------------------------------------------------------------------------ validation
def test_options_are_validated_with_the_fix_named():
    with pytest.raises(ValueError, match=r"smooth must be None or one of \('sq-b',\), got 'sq'"):
        QuantConfig(smooth='sq')
    with pytest.raises(ValueError, match=r"gelu_scales must be None or one of \('opt-m',\)"):
        QuantConfig(gelu_scales='twin')
    with pytest.raises(ValueError, match=r'smooth_alpha must be in \[0, 1\], got 1.5'):
        QuantConfig(method='none', smooth='sq-b', smooth_alpha=1.5)
    with pytest.raises(ValueError, match='smooth_alpha must be a number'):
        QuantConfig(smooth_alpha='half')
    with pytest.raises(ValueError, match=r"smooth='sq-b' cannot be combined with method='repq'.*Use method='none'"):
        QuantConfig(method='repq', smooth='sq-b')
    with pytest.raises(ValueError, match=r"method='crl' with crl_k=inf \(RepQ\)"):
        QuantConfig(method='crl', crl_k=math.inf, smooth='sq-b')
    with pytest.raises(ValueError, match=r"gelu_scales='opt-m' cannot be combined with reconstruct.*Drop one"):
        QuantConfig(gelu_scales='opt-m', reconstruct=dict(iters=10))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['gelu_scale'\].*'gelu_scales'"):
        QuantConfig.from_options({'gelu_scale': 'opt-m'})
    assert QuantConfig(method='crl', smooth='sq-b').smooth_alpha == 0.5  # CRL (finite k) composes
    assert QuantConfig(method='repq', gelu_scales='opt-m', smooth_alpha=1).smooth_alpha == 1.0


def test_sqb_refuses_a_one_shot_calibration_stream():
    model = tiny_timm_swin()
    with pytest.raises(ValueError, match='SQ-b smoothing reads the calibration inputs again'):
        quantize_(model, QuantConfig(method='none', smooth='sq-b'), calib=iter([images(1)]))


# ------------------------------------------------------------------------------ off: unchanged
def test_options_off_run_nothing_of_theirs_and_describe_as_before(monkeypatch):
    """Default identity keys are those of states made before the options existed; nothing of SQ-b or
    OPT-m runs, so the default protocol is the code path it was, bit for bit."""
    assert list(QuantConfig().describe()) == [
        'w_bits',
        'a_bits',
        'method',
        'crl_k',
        'scope',
        'round_zero_point',
        'patch_embed_a_bits',
        'reparam_output_norms',
        'reconstruct',
        'plan',
        'plan_sha256',
    ]
    import mmdet_lrpq.models.quantizer as driver

    def never(*args, **kwargs):
        raise AssertionError('an MPTQ-ViT option ran with the options off')

    for name in ('smooth_', 'recording_ranges', 'RegionUniformQuantizer'):
        monkeypatch.setattr(driver, name, never)
    model, twin = tiny_timm_swin(), tiny_timm_swin()
    x = images(2)
    report = quantize_(model, QuantConfig(), calib=[x[:1], x[1:]])
    quantize_(twin, QuantConfig(smooth=None, gelu_scales=None, smooth_alpha=0.9), calib=[x[:1], x[1:]])
    assert 'smoothing' not in report.calibration
    assert not any(isinstance(q, RegionUniformQuantizer) for q in activation_quantizers(model))
    for a, b in zip(activation_quantizers(model), activation_quantizers(twin)):
        assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a._qparam_names)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_onnx_export_refuses_the_region_quantizer_instead_of_dropping_it():
    pytest.importorskip('onnx')
    from mmdet_lrpq.export.onnx_export import ExportError, _forms

    layer = QuantLinear(8, 2)
    layer.input_quantizer = RegionUniformQuantizer(4)
    with pytest.raises(ExportError, match=r'no ONNX form .*fc2 \(RegionUniformQuantizer\)'):
        _forms({'fc2': layer}, 21, 'exact', False)
