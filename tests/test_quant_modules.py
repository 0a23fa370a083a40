"""Fake-quant modules: states, weight cache, the generic wrapper, reparameterization, CRL."""

import math

import pytest
import torch
from torch import nn

import repq_reference as ref
from mmdet_lrpq.quant import (
    LayerQuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    QuantState,
    calibrate,
    calibrating,
    crl_clip,
    fake_quant_uniform,
    quant_modules,
    reparameterize_,
    set_quant_state,
    uniform_qparams,
    wrap_modules,
)


class TinyBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, a conv stem and an attention-like matmul."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.matmul = QuantMatMul(a_bits=8, log_sqrt2_a=True)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)  # [B, N, 16]
        h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        attn = torch.softmax(h @ h.transpose(1, 2) / 4, dim=-1)
        return self.matmul(attn, h)


def _outlier_norm(norm: nn.LayerNorm, seed=0):
    """LayerNorm affine with a few outlier channels, as Swin's post-LN activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(norm.normalized_shape, generator=g) + 0.2
    w[::5] *= 12
    norm.weight.data, norm.bias.data = w, torch.randn(norm.normalized_shape, generator=g)


def _wrapped(per_channel=('fc1',), bits=4):
    torch.manual_seed(0)
    model = TinyBlock().eval()
    _outlier_norm(model.norm)
    wrap_modules(model, lambda name, m: LayerQuantConfig(bits, bits, per_channel_input=name in per_channel))
    return model


def test_wrapper_swaps_by_type_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    model = TinyBlock()
    keys = {k for k in model.state_dict() if 'quantizer' not in k}
    wrapped = wrap_modules(model, lambda name, m: None if name == 'fc2' else LayerQuantConfig(6, 5))
    assert set(wrapped) == {'stem', 'fc1'}
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.fc1, QuantLinear)
    assert type(model.fc2) is nn.Linear
    assert keys == {k for k in model.state_dict() if 'quantizer' not in k}  # only quantizer extras added
    assert (model.fc1.w_bits, model.fc1.a_bits) == (6, 5)
    mha = nn.MultiheadAttention(16, 2)
    assert wrap_modules(mha, lambda n, m: LayerQuantConfig()) == {}  # out_proj's forward never runs
    with pytest.raises(ValueError, match='bit-width'):
        LayerQuantConfig(w_bits=9)


def test_float_state_is_bit_identical_to_the_float_model():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    img = torch.randn(2, 3, 32, 32)
    expected = model(img)
    wrap_modules(model, lambda name, m: LayerQuantConfig(4, 4))
    assert torch.equal(model(img), expected)


def test_state_transitions_and_calibration_protocol():
    model = _wrapped()
    img = torch.randn(2, 3, 32, 32)
    float_out = model(img)
    assert all(m.state is QuantState.FLOAT for m in quant_modules(model).values())
    with pytest.raises(RuntimeError, match='received no input during calibration'):
        set_quant_state(model, QuantState.QUANTIZED)
    model.fc1.state = QuantState.QUANTIZED
    with pytest.raises(RuntimeError, match='never calibrated'):
        model(img)
    model.fc1.state = QuantState.FLOAT

    calib_out = calibrate(model, lambda m: m(img))
    assert all(m.state is QuantState.QUANTIZED and m.calibrated for m in quant_modules(model).values())
    quant_out = model(img)
    assert torch.equal(calib_out, quant_out)  # the calibration forward is already quantized
    assert not torch.equal(quant_out, float_out)
    assert model.fc1.input_quantizer.delta.shape == (1, 1, 16)  # per channel
    assert model.stem.input_quantizer.delta.shape == ()  # per tensor
    # sequential calibration: fc1's input quantizer saw LayerNorm(quantized stem output)
    x = model.norm(model.stem(img).flatten(2).transpose(1, 2)).detach()
    expected = uniform_qparams(x, 4, channel_axis=-1)
    assert torch.equal(model.fc1.input_quantizer.delta, expected[0])


def test_uncalibrated_layers_are_reported_not_silently_float():
    model = _wrapped()
    with pytest.raises(RuntimeError, match=r'3 quantized layer\(s\) received no input.*stem'):
        with calibrating(model):
            model.fc1(torch.randn(1, 5, 16))
    assert all(m.state is QuantState.FLOAT for m in quant_modules(model).values())
    model = _wrapped()
    with calibrating(model):  # empty input (no RoIs): the layer stays uncalibrated, no crash
        assert model.fc1(torch.empty(0, 16)).shape == (0, 32)
        model(torch.randn(1, 3, 32, 32))


def test_weights_quantized_once_and_requantized_when_they_change(monkeypatch):
    model = _wrapped()
    calibrate(model, lambda m: m(torch.randn(2, 3, 32, 32)))
    calls = []
    original = type(model.fc1.weight_quantizer).calibrate
    monkeypatch.setattr(
        type(model.fc1.weight_quantizer), 'calibrate', lambda self, w: (calls.append(1), original(self, w))[1]
    )
    x = torch.randn(2, 10, 16)
    y1 = model.fc1(x)
    model.fc1(x)
    assert calls == []  # cached since calibration
    w_q = model.fc1.quantized_weight()
    d, z = uniform_qparams(model.fc1.weight, 4, channel_axis=0)
    assert torch.equal(w_q, ref.uniform_fake_quant(model.fc1.weight.detach(), d, z, 4))
    with torch.no_grad():
        model.fc1.weight.mul_(2)  # in-place change invalidates
    y2 = model.fc1(x)
    assert calls == [1] and not torch.equal(y1, y2)
    model.fc1.weight.data = model.fc1.weight.data / 2  # replacing the tensor invalidates too
    model.fc1(x)
    assert calls == [1, 1]


def test_repq_reparam_is_exact_with_an_integer_zero_point():
    """Reparameterized LN + Linear with a per-tensor quantizer == original with a per-channel one."""
    torch.manual_seed(1)
    norm, fc = nn.LayerNorm(64), nn.Linear(64, 48)
    _outlier_norm(norm)
    x = torch.randn(2, 200, 64) * 3
    q = QuantLinear.from_float(fc, w_bits=8, a_bits=4, per_channel_input=True)
    ln_out = norm(x).detach()
    q.input_quantizer.calibrate(ln_out)
    d_c, z_c = q.input_quantizer.delta.clone(), q.input_quantizer.zero_point.clone()
    w0, b0 = fc.weight.detach().clone(), fc.bias.detach().clone()
    expected = torch.nn.functional.linear(fake_quant_uniform(ln_out, d_c, z_c, 4), w0, b0)

    res = reparameterize_(norm, q, round_zero_point=True)
    assert q.input_quantizer.channel_axis is None and q.input_quantizer.zero_point == round(z_c.mean().item())
    ln_new = norm(x).detach()
    x_hat = q.input_quantizer(ln_new)
    got = torch.nn.functional.linear(x_hat, q.weight, q.bias)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # the quantization grid is literally the same: r·(x̂' + b) == per-channel x̂
    torch.testing.assert_close(
        x_hat * res.r + res.b * res.r, fake_quant_uniform(ln_out, d_c, z_c, 4), atol=1e-5, rtol=1e-5
    )
    # float path is an identity too
    torch.testing.assert_close(
        torch.nn.functional.linear(ln_new, q.weight, q.bias),
        torch.nn.functional.linear(ln_out, w0, b0),
        atol=1e-4,
        rtol=1e-5,
    )


def test_repq_fractional_zero_point_is_not_exact_but_matches_repq_formula():
    torch.manual_seed(2)
    norm, fc = nn.LayerNorm(32), nn.Linear(32, 16, bias=False)
    _outlier_norm(norm, seed=2)
    x = torch.randn(1, 300, 32)
    q = QuantLinear.from_float(fc, w_bits=8, a_bits=4, per_channel_input=True)
    q.input_quantizer.calibrate(norm(x).detach())
    d, z = q.input_quantizer.delta.reshape(-1).clone(), q.input_quantizer.zero_point.reshape(-1).clone()
    gamma, beta, w = norm.weight.detach().clone(), norm.bias.detach().clone(), fc.weight.detach().clone()
    res = reparameterize_(norm, q)  # RepQ-ViT as published: z̃ = mean(zp) unrounded
    # RepQ-ViT's formulas, written out
    td, tz = d.mean(), z.mean()
    r = d / td
    b = (-z * d) / r - (-tz * td)
    assert res.target_zero_point == pytest.approx(float(tz)) and q.input_quantizer.zero_point != tz.round()
    torch.testing.assert_close(norm.weight, gamma / r)
    torch.testing.assert_close(norm.bias, beta / r - b)
    torch.testing.assert_close(q.weight, w * r)
    torch.testing.assert_close(q.bias, (w * r) @ b)  # bias created where there was none


def test_crl_infinity_is_repq_and_finite_k_clips_outliers():
    torch.manual_seed(3)
    results = {}
    for k in (math.inf, 2.0):
        norm, fc = nn.LayerNorm(48), nn.Linear(48, 24)
        torch.manual_seed(3)
        norm.reset_parameters()
        fc.reset_parameters()
        _outlier_norm(norm, seed=3)
        x = torch.randn(2, 100, 48)
        q = QuantLinear.from_float(fc, w_bits=4, a_bits=4, per_channel_input=True)
        q.input_quantizer.calibrate(norm(x).detach())
        results[k] = (reparameterize_(norm, q, k=k), q.weight.detach().clone(), norm.weight.detach().clone())
    repq, crl = results[math.inf][0], results[2.0][0]
    assert repq.n_clipped == 0 and crl.n_clipped > 0
    assert crl.r.max() < repq.r.max()  # the migrated scale is bounded
    assert q.weight.abs().max() < results[math.inf][1].abs().max()
    d = torch.rand(40) + 0.1
    z = torch.randint(-20, 200, (40,)).float()
    for k in (math.inf,):
        dd, zz, n = crl_clip(d, z, k)
        assert dd is d and zz is z and n == 0
    dd, zz, n = crl_clip(d, z, 1e6)  # huge but finite k: nothing clipped, zp recomputed identically
    assert torch.equal(dd, d) and torch.equal(zz, z) and n == 0
    with pytest.raises(ValueError, match='k > 0'):
        crl_clip(d, z, 0.0)


def test_reparam_input_validation():
    norm, fc = nn.LayerNorm(8), nn.Linear(8, 4)
    q = QuantLinear.from_float(fc, per_channel_input=True)
    with pytest.raises(ValueError, match='per channel first'):
        reparameterize_(norm, q)
    q.input_quantizer.calibrate(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match='4 channels'):
        reparameterize_(nn.LayerNorm(4), q)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 4, 3), per_channel_input=True)
    conv.input_quantizer.calibrate(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match='1x1'):
        reparameterize_(norm, conv)


def test_reparam_through_a_1x1_conv():
    """The FPN-lateral case: LayerNorm over channels feeding a 1x1 conv on NCHW features."""
    torch.manual_seed(4)
    norm = nn.LayerNorm(16)
    _outlier_norm(norm, seed=4)
    conv = QuantConv2d.from_float(nn.Conv2d(16, 8, 1), w_bits=8, a_bits=4, per_channel_input=True)
    x = torch.randn(2, 10, 12, 16)
    feats = lambda: norm(x).permute(0, 3, 1, 2).detach()  # noqa: E731
    before = feats()
    conv.input_quantizer.calibrate(before)
    expected = torch.nn.functional.conv2d(
        fake_quant_uniform(before, conv.input_quantizer.delta, conv.input_quantizer.zero_point, 4),
        conv.weight,
        conv.bias,
    ).detach()
    reparameterize_(norm, conv, round_zero_point=True)
    got = torch.nn.functional.conv2d(conv.input_quantizer(feats()), conv.weight, conv.bias)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_calibrated_state_round_trip():
    model = _wrapped()
    img = torch.randn(2, 3, 32, 32)
    calibrate(model, lambda m: m(img))
    reparameterize_(model.norm, model.fc1, k=3.0)
    model.fc2.input_quantizer.reset()  # re-calibrate one layer on a reparam'd flow:
    model.fc2.input_quantizer.channel_axis = -1  # per channel, so that fc2 can be reparam'd too
    with calibrating(model):
        model(img)
    reparameterize_(nn.LayerNorm(32), model.fc2)  # creates the bias fc2 never had
    assert model.fc2.bias is not None
    out = model(img)
    state = model.state_dict()
    fresh = _wrapped()
    fresh.load_state_dict(state)
    set_quant_state(fresh, QuantState.QUANTIZED)
    assert torch.equal(fresh(img), out)
    assert fresh.fc1.input_quantizer.granularity == 'tensor'  # reparameterized: per tensor now
    assert fresh.fc1.input_quantizer.delta.shape == ()


def test_scratch_buffers_give_the_same_output_and_never_leak_into_results():
    """No-grad forwards write quantized activations into reused scratch buffers: outputs equal the
    autograd path's bit for bit, earlier outputs are not overwritten by later forwards, and a
    quantizer with a forward hook gets fresh memory."""
    from mmdet_lrpq.quant import modules as qm

    model = _wrapped()
    img1, img2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        calibrate(model, lambda m: m(img1))
    qm.release_scratch()
    with torch.enable_grad():
        expected1, expected2 = model(img1.requires_grad_()).detach(), model(img2.requires_grad_()).detach()
    assert not qm._SCRATCH.buffers  # autograd forwards never use scratch
    with torch.no_grad():
        out1 = model(img1.detach())
        assert set(qm._SCRATCH.buffers) == {0, 1}  # the matmul's two operands use two slots
        out2 = model(img2.detach())
    assert torch.equal(out1, expected1) and torch.equal(out2, expected2)
    kept = []
    model.fc2.input_quantizer.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        model(img1.detach())
        first = kept[0].clone()
        model(img2.detach())
    assert torch.equal(kept[0], first) and kept[0].data_ptr() != kept[1].data_ptr()
