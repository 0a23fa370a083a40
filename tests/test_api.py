"""The Python API without MMDetection: ``quantize_`` on plain modules and timm Swins, streaming
calibration, ``nn.MultiheadAttention``, and calibrated-state files that refuse other inputs."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

import mmdet_lrpq
from conftest import randomize_
from mmdet_lrpq import BitPlan, QuantConfig, quantize_
from mmdet_lrpq.models.attention import QuantMultiheadAttention
from mmdet_lrpq.models.state import StateFileError, StateMismatchError
from mmdet_lrpq.models.timm_swin import QuantWindowAttention, TimmSwinAdapter
from mmdet_lrpq.quant import (
    LayerQuantConfig,
    QuantMatMul,
    QuantState,
    activation_quantizers,
    calibrate_stream,
    calibrating,
    quant_modules,
    set_quant_state,
    wrap_modules,
)


def tiny_timm_swin(depths=(2, 2, 2, 2), seed=0) -> SwinTransformer:
    torch.manual_seed(seed)
    return randomize_(
        SwinTransformer(
            img_size=112,
            embed_dim=32,
            depths=depths,
            num_heads=(1, 2, 4, 8),
            num_classes=10,
            always_partition=True,
            strict_img_size=False,
        ),
        seed,
        norm_std=0.3,
    )


def images(n: int, seed: int = 0, size: int = 112) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def swin_plan(model: SwinTransformer, k: int = 4) -> BitPlan:
    """A plan as tools/lrp_plan.py writes it: mmdet backbone names, the architecture, re:.* last."""
    from mmdet_lrpq.models.swin_names import swin_name_to_mmdet
    from mmdet_lrpq.models.timm_swin import swin_sites

    bits = {s.name: (k + 1, k + 1) if s.block in (0, 1) else (k, k) for s in swin_sites(model)}
    plan = BitPlan(bits).rename(lambda n: 'backbone.' + swin_name_to_mmdet(n, 'timm')).with_default(k, k)
    plan.architecture = TimmSwinAdapter(model, '').architecture()
    return plan


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


# ------------------------------------------------------------------------------ quantize_
def test_quantize_plain_module_generically_and_report():
    torch.manual_seed(0)
    model = ConvNet()
    x = images(4, size=16)
    with torch.no_grad():
        ref = model(x)
    report = quantize_(model, QuantConfig(w_bits=6, a_bits=6), calib=[x[:2], x[2:]])
    assert [s.name for s in report.sites] == ['conv', 'fc']
    assert all(m.state is QuantState.QUANTIZED for m in quant_modules(model).values())
    assert report.calibration['num_images'] == 4 and report.totals['avg_weight_bits'] == 6
    assert report.sites[0].macs == 16 * 16 * 8 * 27  # measured per image
    with torch.no_grad():
        got = model(x)
    assert not torch.equal(got, ref) and (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert 'conv' in str(report) and 'rule: envelope of per-batch RepQ ranges' in report.table()


def test_quantize_options_are_checked():
    model = ConvNet()
    with pytest.raises(ValueError, match='calibration inputs'):
        quantize_(model, QuantConfig())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['w_bit'\]"):
        quantize_(model, calib=[images(1, size=8)], w_bit=4)
    with pytest.raises(TypeError, match='not both'):
        quantize_(model, QuantConfig(), calib=[images(1, size=8)], w_bits=4)
    with pytest.raises(ValueError, match='w_bits: bit-width'):
        QuantConfig(w_bits=9)
    with pytest.raises(FileNotFoundError, match='tools/lrp_plan.py'):
        QuantConfig(plan='no/such/swin_t_mp4.json')


def test_callable_calibration_is_one_batch():
    torch.manual_seed(0)
    model, twin = ConvNet(), None
    twin = copy.deepcopy(model)
    x = images(3, size=16)
    quantize_(model, calib=lambda m: m(x))
    quantize_(twin, calib=[x])
    for a, b in zip(activation_quantizers(model), activation_quantizers(twin)):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.zero_point, b.zero_point)


def test_timm_swin_takes_a_detector_plan_by_mmdet_names():
    model = tiny_timm_swin()
    plan = swin_plan(model)
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    report = quantize_(model, plan, calib=[x[:1], x[1:]])
    assert isinstance(model.layers[0].blocks[0].attn, QuantWindowAttention)
    bits = report.bits
    assert bits['layers.0.blocks.1.attn.qkv'] == (5, 5) and bits['layers.2.blocks.0.mlp.fc2'] == (4, 4)
    assert bits['layers.0.blocks.0.attn.matmul2'] == (5, 5)
    assert bits['patch_embed.proj'] == (4, 8)  # re:.*, image input at 8 bits
    assert bits['head.fc'] == (4, 4)  # generic, via re:.*
    assert len(report.reparameterized) == 8 * 2 + 3  # norm1/norm2 per block, 3 mergings
    with torch.no_grad():
        got = model(x)
    assert (got.softmax(1) - ref.softmax(1)).abs().max() < 0.5 and not torch.equal(got, ref)


def test_timm_swin_float_state_and_reparameterization_are_exact_with_padded_windows():
    """QuantWindowAttention in FLOAT is timm's forward; reparameterized weights compute the same
    function (stage 3 is 4x4 tokens padded to 7x7 windows: the shift after padding matters)."""
    model = tiny_timm_swin()
    x = images(1)
    with torch.no_grad():
        ref = model(x)
    from mmdet_lrpq.models.quantizer import ModelQuantizer

    q = ModelQuantizer(model, QuantConfig(w_bits=8, a_bits=8, method='repq'))
    q.wrap()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    q.calibrate([x], lambda m, b: m(b))
    set_quant_state(model, QuantState.FLOAT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_plan_for_another_swin_size_is_refused():
    """A Swin-T-style plan on a deeper Swin would send the extra blocks to re:.* silently."""
    plan = swin_plan(tiny_timm_swin(depths=(2, 2, 2, 2)))
    deeper = tiny_timm_swin(depths=(2, 2, 4, 2))
    with pytest.raises(ValueError, match=r'another architecture.*depths: plan \[2, 2, 2, 2\] vs model \[2, 2, 4, 2\]'):
        quantize_(deeper, plan, calib=[images(1)])
    assert not quant_modules(deeper)  # refused before touching the model


# ------------------------------------------------------------------------------ streaming calibration
class Branchy(nn.Module):
    """fc2 only runs on inputs with a positive mean (an RoI head that sees no proposals elsewhere)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)
        self.matmul = QuantMatMul(a_bits=4, log_sqrt2_a=True)

    def forward(self, x):
        h = self.fc1(x)
        a = self.matmul(torch.softmax(h @ h.transpose(-1, -2), -1), h)
        return self.fc2(a) if x.mean() > 0 else a[..., :3]


def _branchy(bits=4):
    torch.manual_seed(0)
    model = Branchy().eval()
    wrap_modules(model, lambda name, m: LayerQuantConfig(bits, bits, per_channel_input=name == 'fc1'))
    return model


def _qparams(model):
    return [tuple(getattr(q, n).clone() for n in q._qparam_names) for q in activation_quantizers(model)]


def test_one_batch_reproduces_the_single_forward_protocol_bit_for_bit():
    batch = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1)) + 0.5
    old, new = _branchy(), _branchy()
    with calibrating(old), torch.no_grad():
        old(batch)  # RepQ-ViT: every quantizer on its first input
    calibrate_stream(new, [batch], lambda m, b: m(b))
    assert all(all(torch.equal(a, b) for a, b in zip(pa, pb)) for pa, pb in zip(_qparams(old), _qparams(new)))


def test_several_batches_take_the_envelope_of_their_ranges():
    """One batch of all the images would calibrate on their union: the streamed range holds every
    batch's (a mean of per-image ranges, an earlier rule, clipped the last Swin stage of every other image)."""
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 5, 6, generator=gen) + 0.5 for n in (1, 3)]
    singles = []
    for b in batches:  # each batch calibrated alone, by the protocol
        m = _branchy()
        calibrate_stream(m, [b], lambda m, x: m(x))
        singles.append(activation_quantizers(m))
    model = _branchy()
    calibrate_stream(model, batches, lambda m, x: m(x), images_in=len)
    for q, (q1, q3) in zip(activation_quantizers(model), zip(*singles)):
        if hasattr(q, 'zero_point'):
            levels = (1 << q.bits) - 1
            lo = [(-s.zero_point * s.delta).double() for s in (q1, q3)]
            hi = [low + levels * s.delta.double() for low, s in zip(lo, (q1, q3))]
            lo_e, hi_e = torch.minimum(*lo), torch.maximum(*hi)  # the smallest range holding both
            delta = ((hi_e - lo_e) / levels).float()
            assert torch.equal(q.delta, delta)
            assert torch.equal(q.zero_point, (-lo_e / delta.double()).round().float())
            assert q.delta.shape == q1.delta.shape  # per channel stays per channel
        else:  # log-sqrt2: the largest delta
            assert torch.equal(q.delta, torch.maximum(q1.delta, q3.delta))


def test_a_layer_fed_by_some_batches_only_is_calibrated_on_those():
    positive = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3)).abs() + 0.1
    negative = -positive
    model = _branchy()
    calibrate_stream(model, [negative, positive, negative], lambda m, x: m(x))  # fc2 sees only one
    alone = _branchy()
    calibrate_stream(alone, [positive], lambda m, x: m(x))
    assert torch.equal(model.fc2.input_quantizer.delta, alone.fc2.input_quantizer.delta)
    never = _branchy()
    with pytest.raises(RuntimeError, match=r'1 quantized layer\(s\) received no input.*fc2'):
        calibrate_stream(never, [negative, negative], lambda m, x: m(x))
    assert all(m.state is QuantState.FLOAT for m in quant_modules(never).values())


# ------------------------------------------------------------------------------ nn.MultiheadAttention
@pytest.mark.parametrize('batch_first', [True, False])
def test_multihead_attention_float_path_matches_pytorch_and_quantizes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 16, generator=gen)
    kv = torch.randn(2, 9, 16, generator=gen)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    attn_mask = torch.rand(7, 9, generator=gen) > 0.8
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask)
    with torch.no_grad():
        ref, ref_w = mha(q, kv, kv, **kwargs)
    model = nn.Module()
    model.attn = mha
    report = quantize_(model, QuantConfig(w_bits=8, a_bits=8), calib=lambda m: m.attn(q, kv, kv, **kwargs))
    assert isinstance(mha, QuantMultiheadAttention)
    assert [s.name for s in report.sites] == ['attn.in_proj', 'attn.matmul1', 'attn.matmul2', 'attn.out_proj']
    with torch.no_grad():
        got, got_w = mha(q, kv, kv, **kwargs)
        set_quant_state(model, QuantState.FLOAT)
        flt, flt_w = mha(q, kv, kv, **kwargs)
    torch.testing.assert_close(flt, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flt_w, ref_w, atol=1e-6, rtol=1e-5)
    # the log-sqrt2 attention quantizer rounds to powers of sqrt2 at any bit-width: ~10 % of 9 keys' weights
    assert not torch.equal(got, flt) and (got - flt).abs().mean() < 0.2 * flt.abs().mean()


def test_unsupported_multihead_attention_is_reported_float(caplog):
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    model.fc = nn.Linear(16, 16)
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        report = quantize_(model, calib=lambda m: m.fc(torch.randn(2, 16)))
    assert [s.name for s in report.sites] == ['fc']
    assert report.float_modules[0]['name'] == 'attn' and 'kdim' in report.float_modules[0]['reason']
    assert report.totals['float_params'] == sum(p.numel() for p in model.attn.parameters())
    assert 'not quantized' in report.table() and 'left in float' in report.table()
    assert 'attn (nn.MultiheadAttention) stays float' in caplog.text


# ------------------------------------------------------------------------------ state files
def _convnet_and_data(seed=0):
    torch.manual_seed(seed)
    return ConvNet(), [images(2, seed=5, size=16)]


def test_state_file_round_trip_skips_calibration(tmp_path):
    path = str(tmp_path / 'state.pth')
    model, calib = _convnet_and_data()
    twin = copy.deepcopy(model)
    quantize_(model, calib=calib, state_file=path, calib_id='five')
    calls = []
    report = quantize_(twin, calib=lambda m: calls.append(1), state_file=path, calib_id='five')
    assert not calls and report.calibration['num_images'] == 2
    x = images(3, seed=9, size=16)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_state_from_other_weights_options_plan_or_calibration_is_refused(tmp_path):
    path = str(tmp_path / 'state.pth')
    model, calib = _convnet_and_data()
    fresh = copy.deepcopy(model)
    plan = tmp_path / 'plan.json'
    BitPlan({'conv': (6, 6), 're:.*': (4, 4)}).save(plan)
    quantize_(model, str(plan), calib=calib, state_file=path, calib_id='a')
    other = copy.deepcopy(fresh)
    with torch.no_grad():
        other.conv.weight.zero_()  # another checkpoint
    with pytest.raises(StateMismatchError, match='weights: the float weights differ'):
        quantize_(other, str(plan), calib=calib, state_file=path, calib_id='a')
    assert not quant_modules(other)  # refused before touching the model
    BitPlan({'conv': (8, 8), 're:.*': (4, 4)}).save(plan)  # regenerated in place
    with pytest.raises(StateMismatchError, match=r'config.plan_sha256.*regenerated at the same path'):
        quantize_(copy.deepcopy(fresh), str(plan), calib=calib, state_file=path, calib_id='a')
    with pytest.raises(StateMismatchError, match=r"config.method: saved 'crl', now 'repq'"):
        quantize_(copy.deepcopy(fresh), str(plan), calib=calib, state_file=path, calib_id='a', method='repq')
    BitPlan({'conv': (6, 6), 're:.*': (4, 4)}).save(plan)
    with pytest.raises(StateMismatchError, match=r"calibration.calib_id: saved 'a', now 'b'"):
        quantize_(copy.deepcopy(fresh), str(plan), calib=calib, state_file=path, calib_id='b')
    quantize_(copy.deepcopy(fresh), str(plan), calib=calib, state_file=path, calib_id='a')  # same inputs: fine


def test_recalibrate_on_mismatch_replaces_the_state(tmp_path, caplog):
    path = str(tmp_path / 'state.pth')
    model, calib = _convnet_and_data()
    fresh = copy.deepcopy(model)
    quantize_(model, calib=calib, state_file=path, w_bits=6, a_bits=6)
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        report = quantize_(copy.deepcopy(fresh), calib=calib, state_file=path, state_mismatch='recalibrate')
    assert 'recalibrating' in caplog.text and report.totals['avg_weight_bits'] == 4
    quantize_(copy.deepcopy(fresh), calib=lambda m: pytest.fail('must load'), state_file=path)  # now 4 bits


def test_unreadable_state_file_is_named_with_the_fix(tmp_path):
    path = tmp_path / 'state.pth'
    model, calib = _convnet_and_data()
    quantize_(copy.deepcopy(model), calib=calib, state_file=str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(StateFileError, match=rf'{path} is unreadable.*Delete {path} to recalibrate'):
        quantize_(copy.deepcopy(model), calib=calib, state_file=str(path))
    torch.save({'format': 'something else'}, path)
    with pytest.raises(StateFileError, match='not an mmdet-lrpq calibrated state'):
        quantize_(copy.deepcopy(model), calib=calib, state_file=str(path))


def test_interrupted_save_keeps_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / 'state.pth'
    model, calib = _convnet_and_data()
    quantize_(copy.deepcopy(model), calib=calib, state_file=str(path))
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_(copy.deepcopy(model), calib=calib, state_file=str(path), state_mismatch='recalibrate', w_bits=6)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['state.pth']


def test_import_is_light_and_lazy():
    import subprocess
    import sys

    code = (
        'import sys, mmdet_lrpq; bad = [m for m in ("torch", "mmengine", "mmdet", "timm") if m in sys.modules]; '
        'assert not bad, bad; from mmdet_lrpq import quantize_, QuantConfig; assert callable(quantize_)'
    )
    subprocess.run([sys.executable, '-c', code], check=True)
    assert mmdet_lrpq.QuantConfig is QuantConfig and math.isinf(QuantConfig(method='repq').clip_k)


# ------------------------------------------------------------------------------ inputs, states, plans
def test_a_state_is_refused_when_the_calibration_inputs_changed(tmp_path, caplog):
    """Same calib_id, other images: the digest of the inputs tells them apart (it loaded silently before)."""
    path = str(tmp_path / 'state.pth')
    model, calib = _convnet_and_data()
    fresh = copy.deepcopy(model)
    quantize_(model, calib=calib, state_file=path, calib_id='my images')
    other = [images(2, seed=6, size=16)]
    with pytest.raises(StateMismatchError, match='calibration.batches_sha256: other calibration inputs') as err:
        quantize_(copy.deepcopy(fresh), calib=other, state_file=path, calib_id='my images')
    assert f'calibrated state {path} was made from other inputs' in str(err.value)
    assert 'calibrated state calibrated state' not in str(err.value) and f'Delete {path}' in str(err.value)
    quantize_(
        copy.deepcopy(fresh),
        calib=[t.clone() for t in calib],
        state_file=path,  # same content: loads
        calib_id='my images',
    )
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):  # a callable cannot be digested: said so
        quantize_(copy.deepcopy(fresh), calib=lambda m: pytest.fail('must load'), state_file=path, calib_id='my images')
    assert 'cannot be compared' in caplog.text and 'callable or a stream' in caplog.text


def test_constant_calibration_images_are_refused_or_warned_about(caplog):
    """All-zero calibration input: ranges collapse (a classifier drops to chance); refused, model left float."""
    model = tiny_timm_swin()
    with pytest.raises(ValueError, match='every calibration image is constant'):
        quantize_(model, QuantConfig(w_bits=8, a_bits=8), calib=[torch.zeros(2, 3, 112, 112)])
    assert all(m.state is QuantState.FLOAT for m in quant_modules(model).values())
    with pytest.raises(ValueError, match='every calibration image is constant'):
        quantize_(tiny_timm_swin(), QuantConfig(w_bits=8, a_bits=8), calib=iter([torch.full((1, 3, 112, 112), 0.5)]))
    x = torch.cat([torch.zeros(1, 3, 112, 112), images(1)])
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        report = quantize_(tiny_timm_swin(), QuantConfig(w_bits=8, a_bits=8), calib=[x])
    assert report.calibration['num_images'] == 2 and '1 image(s) are constant' in caplog.text


@pytest.mark.parametrize(
    'calib, message',
    [
        (
            [torch.randn(1, 1, 112, 112)],
            r'shape \(1, 1, 112, 112\).*patch_embed.proj, Conv2d with 3 input channels.*'
            r'\[N, 3, H, W\]: greyscale',
        ),
        ([torch.randn(3, 112, 112)], r'shape \(3, 112, 112\).*add the batch dimension, x.unsqueeze\(0\)'),
        ([torch.randn(1, 112, 112, 3)], r'channels last\? x.permute\(0, 3, 1, 2\)'),
        ('calib_images/', r"calib is a str \('calib_images/'\).*not a path"),
        (['a.jpg', 'b.jpg'], r"calib\[0\]\) is a str \('a.jpg'\).*not file names"),
        ([], r'calib is empty'),
        ([torch.zeros(0, 3, 112, 112)], r'calib\[0\]\) is empty.*shape \(0, 3, 112, 112\)'),
        ([torch.zeros(1, 3, 112, 112, dtype=torch.uint8)], r'dtype torch.uint8.*floating-point images'),
    ],
)
def test_unusable_calibration_inputs_are_named_before_the_model_is_touched(calib, message):
    model = tiny_timm_swin()
    with pytest.raises(ValueError, match=message):
        quantize_(model, QuantConfig(w_bits=8, a_bits=8), calib=calib)
    assert not quant_modules(model)


def test_a_model_with_nothing_to_quantize_says_so():
    with pytest.raises(ValueError, match=r'nothing to quantize in Sequential: it has no Conv2d or Linear layer'):
        quantize_(nn.Sequential(nn.ReLU(), nn.Tanh()), calib=[torch.randn(2, 4)])


def test_a_state_file_that_is_a_directory_is_refused_before_calibrating(tmp_path):
    calls = []
    model, calib = _convnet_and_data()
    with pytest.raises(ValueError, match=rf'state_file {tmp_path} is a directory.*quant_state.pth'):
        quantize_(model, calib=lambda m: calls.append(m(calib[0])), state_file=str(tmp_path))
    assert not calls


def test_temporaries_left_by_killed_saves_are_removed_and_live_ones_kept(tmp_path, caplog):
    import os
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = socket.gethostname()
    names = {
        'dead': f'state.pth.{host}-{dead.pid}.k1ll3d_x.tmp',
        'live': f'state.pth.{host}-{os.getpid()}.wr1t1ng_.tmp',
        'remote': f'state.pth.otherhost-{dead.pid}.r3m0te_x.tmp',
        'legacy': 'state.pth.abcd1234.tmp',
        'other_file': f'other.pth.{host}-{dead.pid}.k1ll3d_x.tmp',
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b'partial')
    old = time.time() - 2 * 3600
    os.utime(tmp_path / names['legacy'], (old, old))
    model, calib = _convnet_and_data()
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        quantize_(model, calib=calib, state_file=str(tmp_path / 'state.pth'))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {'state.pth', names['live'], names['remote'], names['other_file']}
    assert 'interrupted save' in caplog.text


def test_a_placeholder_plan_is_warned_about_in_the_log_and_the_report(caplog):
    plan = BitPlan({'re:.*': (4, 4)}, source={'weights': {'kind': 'random-init', 'seed': 0}})
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger='mmdet_lrpq'):
        report = quantize_(ConvNet(), plan, calib=[images(2, size=16)])
    assert 'PLACEHOLDER BIT PLAN' in caplog.text and "'random-init'" in caplog.text
    assert report.to_dict()['warnings'] and 'NOT LRP-QViT' in report.to_dict()['warnings'][0]
    assert report.table().startswith('WARNING: PLACEHOLDER BIT PLAN')
    assert not quantize_(ConvNet(), BitPlan.uniform(4, 4), calib=[images(2, size=16)]).to_dict()['warnings']


def test_a_state_of_an_earlier_version_says_its_images_are_not_recorded():
    from mmdet_lrpq.models.state import mismatch_message

    text = mismatch_message('calibrated state s.pth', {'calibration.image_sha256': (None, 'ab' * 32)}, 's.pth')
    assert 'not recorded in the state (made by an earlier version)' in text and 'content differs' not in text
