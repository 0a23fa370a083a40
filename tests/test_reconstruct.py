"""Optional reconstruction after calibration: learned rounding and step sizes, block by block.

It must lower the error it optimizes (measured on a block, independently of its own report),
be deterministic, live in the state file like any calibrated state and be part of its identity,
and leave the default path (no reconstruction) exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from mmdet_lrpq import QuantConfig, ReconstructConfig, quantize_
from mmdet_lrpq.models import ModelQuantizer
from mmdet_lrpq.models.state import StateMismatchError
from mmdet_lrpq.quant import QuantState, UniformQuantizer, quant_modules, set_quant_state
from mmdet_lrpq.quant import functional as F
from mmdet_lrpq.quant.reconstruct_units import _conv_rows, _Rng
from test_api import images, tiny_timm_swin

FAST = dict(iters=8, batch_size=2, max_rows=512, batch_rows=128)


def small_swin() -> nn.Module:
    return tiny_timm_swin(depths=(1, 1, 1, 1))


def calib_images() -> list[torch.Tensor]:
    return [images(1, seed=i, size=64) for i in range(4)]


def block_error(model: nn.Module, reference: nn.Module, path: str, xs: list[torch.Tensor]) -> float:
    """Relative error of block ``path``'s output in the quantized ``model`` against the float model's,
    on the same images: the error reconstruction minimizes (it learns each block on the quantized
    model's inputs towards the float model's outputs)."""
    outputs: dict[str, list] = {'got': [], 'want': []}
    handles = [
        m.get_submodule(path).register_forward_hook(lambda mod, args, out, key=key: outputs[key].append(out))
        for m, key in ((model, 'got'), (reference, 'want'))
    ]
    with torch.no_grad():
        for x in xs:
            model(x)
            reference(x)
    for h in handles:
        h.remove()
    num = sum(float((g - w).pow(2).sum()) for g, w in zip(outputs['got'], outputs['want']))
    return num / sum(float(w.pow(2).sum()) for w in outputs['want'])


def test_reconstruction_reduces_the_block_output_error():
    reference, xs = small_swin(), calib_images()
    plain, learned = copy.deepcopy(reference), copy.deepcopy(reference)
    quantize_(plain, QuantConfig(w_bits=4, a_bits=4), calib=xs)
    report = quantize_(
        learned, QuantConfig(w_bits=4, a_bits=4, reconstruct=dict(FAST, iters=40, drop_prob=0.0)), calib=xs
    )
    rec = report.calibration['reconstruction']
    assert rec['blocks'] == 8 and rec['layers'] == 1 and rec['images'] == 4  # patch embed, 4 blocks, 3 mergings; head
    for path in ('layers.1.blocks.0', 'layers.2.downsample'):
        before, after = block_error(plain, reference, path, xs), block_error(learned, reference, path, xs)
        assert after < 0.8 * before, (path, before, after)
    # what the driver reports is measured the same way (on the quantized model's own inputs)
    assert all(after < before for before, after in rec['relative_error'].values())
    roundings = [m.weight_quantizer.rounding for m in quant_modules(learned).values() if hasattr(m, 'weight_quantizer')]
    assert roundings and all(r is not None and r.dtype == torch.uint8 for r in roundings)
    assert 'reconstructed 8 blocks + 0 heads + 1 layers on 4 image(s)' in report.table()


def test_reconstruction_is_deterministic_and_seeded():
    xs = calib_images()
    states = []
    for seed in (0, 0, 1):
        model = small_swin()
        quantize_(model, QuantConfig(w_bits=4, a_bits=4, reconstruct=dict(FAST, seed=seed)), calib=xs)
        states.append(model.state_dict())
    same = all(torch.equal(states[0][k], states[1][k]) for k in states[0] if torch.is_tensor(states[0][k]))
    differ = any(
        not torch.equal(states[0][k], states[2][k])
        for k in states[0]
        if torch.is_tensor(states[0][k]) and k.endswith(('rounding', 'delta'))
    )
    assert same and differ


def test_reconstructed_state_round_trips_and_is_refused_without_reconstruction(tmp_path):
    xs, x_test = calib_images(), images(2, seed=9, size=64)
    config = QuantConfig(w_bits=4, a_bits=4, reconstruct=ReconstructConfig(**FAST))
    model, twin = small_swin(), small_swin()
    path = str(tmp_path / 'state.pth')
    quantize_(model, config, calib=xs, state_file=path, calib_id='four random images')
    state = torch.load(path, weights_only=True)
    assert any(k.endswith('weight_quantizer.rounding') for k in state['state_dict'])
    assert state['identity']['config']['reconstruct'] == config.reconstruct.describe()
    report = quantize_(
        twin,
        config,
        calib=lambda m: pytest.fail('the saved state must be loaded'),
        state_file=path,
        calib_id='four random images',
    )
    assert report.calibration['reconstruction']['blocks'] == 8
    with torch.no_grad():
        assert torch.equal(model(x_test), twin(x_test))
    # a state made without reconstruction is not one made with it, nor the other way round
    plain_path = str(tmp_path / 'plain.pth')
    quantize_(small_swin(), QuantConfig(w_bits=4, a_bits=4), calib=xs, state_file=plain_path, calib_id='four')
    with pytest.raises(StateMismatchError, match='config.reconstruct'):
        quantize_(small_swin(), config, calib=xs, state_file=plain_path, calib_id='four')
    with pytest.raises(StateMismatchError, match='config.reconstruct'):
        quantize_(
            small_swin(), QuantConfig(w_bits=4, a_bits=4), calib=xs, state_file=path, calib_id='four random images'
        )
    with pytest.raises(StateMismatchError, match='config.reconstruct'):
        quantize_(
            small_swin(),
            QuantConfig(w_bits=4, a_bits=4, reconstruct=dict(FAST, iters=9)),
            calib=xs,
            state_file=path,
            calib_id='four random images',
        )


def test_default_path_is_unchanged():
    """No reconstruction: no learned buffers, the same state-dict keys, and the same qparams and
    outputs as the driver's plain calibrate/reparameterize/requantize steps run by hand."""
    xs, x_test = calib_images(), images(2, seed=9, size=64)
    model, by_hand = small_swin(), small_swin()
    report = quantize_(model, QuantConfig(w_bits=4, a_bits=4), calib=xs)
    assert 'reconstruction' not in report.calibration and report.config['reconstruct'] is None
    quantizer = ModelQuantizer(by_hand, QuantConfig(w_bits=4, a_bits=4))
    quantizer.wrap()
    from mmdet_lrpq.quant import calibrate_stream

    calibrate_stream(by_hand, xs, lambda m, x: m(x))
    quantizer.reparameterize()
    quantizer.requantize_weights()
    a, b = model.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and not any(k.endswith('rounding') for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    with torch.no_grad():
        assert torch.equal(model(x_test), by_hand(x_test))


@pytest.mark.parametrize('bits, axis', [(4, None), (3, 0), (8, -1)])
def test_differentiable_fake_quant_gives_the_no_grad_values(bits, axis):
    """Under autograd the quantizers take the straight-through path; the values must not change."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 40, generator=g) * 3
    delta, zp = F.uniform_qparams(x, bits, axis)
    want = F.fake_quant_uniform(x, delta, zp, bits)
    xg, dg = x.clone().requires_grad_(), delta.clone().requires_grad_()
    got = F.fake_quant_uniform(xg, dg, zp, bits)
    assert torch.equal(got, want)
    got.sum().backward()
    y = x / delta
    inside = (y.round() >= -zp) & (y.round() <= (1 << bits) - 1 - zp)
    assert torch.equal(xg.grad, inside.float())  # straight through, zero where clipped
    lsq = torch.where(inside, y.round() - y, y.round().clamp(-zp, (1 << bits) - 1 - zp))
    torch.testing.assert_close(dg.grad, lsq.sum_to_size(delta.shape) if delta.dim() else lsq.sum())
    attn = torch.softmax(torch.randn(2, 3, 7, 7, generator=g) * 4, dim=-1)
    d = F.log_sqrt2_qparams(attn, bits)
    ag, dg = attn.clone().requires_grad_(), d.clone().requires_grad_()
    out = F.fake_quant_log_sqrt2(ag, dg, bits)
    assert torch.equal(out, F.fake_quant_log_sqrt2(attn, d, bits))
    out.sum().backward()
    torch.testing.assert_close(dg.grad, (out / d).sum().detach())


def test_learned_rounding_quantizer():
    """``rounding`` replaces round-to-nearest by floor + 0/1 (random data has no exact ties)."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    q = UniformQuantizer(4, channel_axis=0)
    q.calibrate(x)
    t = x / q.delta
    q.rounding = ((t - t.floor()) >= 0.5).to(torch.uint8)  # nearest, ties up
    nearest = F.fake_quant_uniform(x, q.delta, q.zero_point, 4)
    assert torch.equal(q(x), nearest)
    q.rounding = torch.ones_like(x, dtype=torch.uint8)  # always up: one step above floor
    up = torch.clamp(t.floor() + 1, -q.zero_point, 15 - q.zero_point) * q.delta
    assert torch.equal(q(x), up)
    q.reset()
    assert q.rounding is None and not q.calibrated


@pytest.mark.parametrize('kernel, stride, padding, dilation', [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2)])
def test_conv_rows_are_the_convolution(kernel, stride, padding, dilation):
    """Sampled im2col patches times the flattened weight are the conv's output at those positions."""
    g = torch.Generator().manual_seed(kernel + stride)
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 5, 9, 11, generator=g)
    rng = _Rng(0)
    rows, valid = _conv_rows(x, conv, 40, rng)
    out = nnf.conv2d(x, conv.weight, conv.bias, stride, padding, dilation)
    pick = _Rng(0).rows(out.shape[0] * out.shape[2] * out.shape[3], 40, x.device)
    want = out.permute(0, 2, 3, 1).reshape(-1, 7)[pick]
    got = rows @ conv.weight.reshape(7, -1).t() + conv.bias
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert valid.shape == (40, kernel * kernel) and (padding > 0 or bool(valid.all()))


class ToyDetector(nn.Module):
    """A detector's shape without mmdet: a conv backbone (no adapter), a neck, and a RoI box head
    whose inputs are 'RoIs' (feature vectors) rather than images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.neck = nn.Conv2d(8, 8, 3, padding=1)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        feats = self.neck(self.backbone(x))
        return self.roi_head.bbox_head(feats.flatten(2).transpose(1, 2).reshape(-1, 8))


@pytest.mark.parametrize('heads', ['module', 'layer'])
def test_heads_reconstruct_as_modules_or_layers(heads, device_audit):
    """Without an adapter the backbone's convs go alone; the neck and the RoI head go whole
    (``'module'``) or layer by layer; every tensor made follows the model's device."""
    xs = [images(1, seed=i, size=16) for i in range(3)]
    model = ToyDetector().eval()
    with torch.no_grad():
        ref = model(xs[0])
    with device_audit(allow={('models/state.py', '_update_tensor'): 'identity hash reads host bytes'}):
        report = quantize_(model, QuantConfig(w_bits=4, a_bits=4, reconstruct=dict(FAST, heads=heads)), calib=xs)
    rec = report.calibration['reconstruction']
    assert (rec['heads'], rec['layers']) == ((2, 1) if heads == 'module' else (0, 4))
    assert set(rec['relative_error']) == (
        {'neck', 'roi_head.bbox_head', 'backbone.0'}
        if heads == 'module'
        else {'backbone.0', 'neck', 'roi_head.bbox_head.0', 'roi_head.bbox_head.2'}
    )
    with torch.no_grad():
        got = model(xs[0])
    assert (got - ref).pow(2).sum() < 0.1 * ref.pow(2).sum()
    assert all(p.requires_grad for p in model.parameters())  # parameters as they were
    set_quant_state(model, QuantState.FLOAT)
    with torch.no_grad():
        assert torch.equal(model(xs[0]), ref)  # weights, biases untouched


def test_calibration_source_must_be_readable_twice():
    config = QuantConfig(w_bits=4, a_bits=4, reconstruct=dict(FAST, iters=2))
    with pytest.raises(ValueError, match='one-shot iterator.*list'):
        quantize_(small_swin(), config, calib=iter(calib_images()))
    model = small_swin()
    xs = calib_images()
    report = quantize_(model, config, calib=lambda m: [m(x) for x in xs])  # a callable is called again
    assert report.calibration['reconstruction']['images'] == 1  # one calibration call


def test_reconstruct_config_validation():
    with pytest.raises(TypeError, match="unknown option.*'iter'"):
        QuantConfig(reconstruct=dict(iter=3))
    with pytest.raises(ValueError, match='drop_prob'):
        ReconstructConfig(drop_prob=1.0)
    with pytest.raises(ValueError, match='nothing to learn'):
        ReconstructConfig(weight_rounding=False, act_step=False)
    with pytest.raises(ValueError, match='heads'):
        ReconstructConfig(heads='all')
    assert QuantConfig(reconstruct=dict(beta=[10, 2])).reconstruct.beta == (10.0, 2.0)
    assert QuantConfig(reconstruct=ReconstructConfig(iters=5)).describe()['reconstruct']['iters'] == 5
