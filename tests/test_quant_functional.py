"""Bit-exact parity of the vectorized quantizers with RepQ-ViT's semantics (tests/repq_reference.py)."""

import math

import numpy as np
import pytest
import torch

import repq_reference as ref
from mmdet_lrpq.quant import _ext, integer_form
from mmdet_lrpq.quant import functional as F
from mmdet_lrpq.quant.quantiles import _top_tail, quantiles

SHAPES = {  # (shape, channel axis as RepQ-ViT uses it)
    'linear-weight': ((96, 384), 0),
    'conv-weight': ((64, 3, 4, 4), 0),
    'activation': ((2, 300, 48), -1),
}


@pytest.fixture(params=['fused', 'torch'])
def quant_path(request, monkeypatch):
    """Run a test through the fused CPU kernels and through the PyTorch path: same answers."""
    if request.param == 'torch':
        monkeypatch.setattr(_ext, 'kernels', lambda: None)
    else:
        assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    return request.param


def _data(kind, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == 'normal':
        return torch.randn(shape, generator=g) * 3 + 0.5
    if kind == 'heavy':  # Student-t(1.5): the outlier-heavy regime post-LayerNorm activations live in
        z = torch.randn(shape, generator=g)
        chi = torch.distributions.Chi2(torch.tensor(1.5)).sample(shape)
        return z / torch.sqrt(chi / 1.5)
    if kind == 'relu':  # a spike of exact zeros plus a tail
        return torch.relu(torch.randn(shape, generator=g)) ** 2
    raise ValueError(kind)


@pytest.mark.parametrize('bits', [2, 4, 6, 8])
@pytest.mark.parametrize('kind', ['normal', 'heavy', 'relu'])
@pytest.mark.parametrize('layout', list(SHAPES))
def test_uniform_qparams_match_repq_per_tensor_and_per_channel(layout, kind, bits, quant_path):
    shape, axis = SHAPES[layout]
    x = _data(kind, shape, seed=bits)
    delta, zp = F.uniform_qparams(x, bits)
    r_delta, r_zp = ref.uniform_per_tensor(x, bits)
    assert torch.equal(delta, r_delta) and torch.equal(zp, r_zp)

    delta, zp = F.uniform_qparams(x, bits, channel_axis=axis)
    r_delta, r_zp = ref.uniform_per_channel(x, bits)
    assert delta.shape == r_delta.shape
    assert torch.equal(delta, r_delta), (delta - r_delta).abs().max()
    assert torch.equal(zp, r_zp)
    assert torch.equal(F.fake_quant_uniform(x, delta, zp, bits), ref.uniform_fake_quant(x, r_delta, r_zp, bits))


@pytest.mark.parametrize('n', [2, 3, 7, 999, 1001, 10_000, 123_457])
def test_quantiles_bit_identical_to_torch_quantile(n):
    x = _data('heavy', (n,), seed=n)
    qs = [0.999, 0.001, 0.9999, 0.0001, 0.99999, 0.00001, 0.5, 0.25]
    ours = quantiles(x.reshape(1, -1), qs)[:, 0]
    theirs = torch.stack([torch.quantile(x, q) for q in qs])
    assert torch.equal(ours, theirs)


def test_large_tensor_above_2_pow_24(quant_path):
    """RepQ-ViT needed a numpy fallback above 2^24 elements; ours is the same code path, exact."""
    n = (1 << 24) + 12_345
    x = _data('heavy', (n,), seed=3)
    delta, zp = F.uniform_qparams(x, 4)
    r_delta, r_zp = ref.uniform_per_tensor(x, 4)  # torch.quantile has no size limit in torch 2.14
    assert torch.equal(delta, r_delta) and torch.equal(zp, r_zp)
    # the strided-threshold path equals topk over everything
    rows = x.reshape(1, -1)
    k = 2000
    assert torch.equal(_top_tail(rows, k, largest=True), rows.topk(k, dim=1).values)
    assert torch.equal(_top_tail(rows, k, largest=False), rows.topk(k, dim=1, largest=False).values)


@pytest.mark.parametrize('kind', ['relu', 'neg_relu', 'few_levels', 'relu_with_negative_zeros'])
def test_threshold_selection_with_massive_ties_is_exact(kind, quant_path):
    """Post-ReLU activations tie millions of values at the bottom-tail threshold; the tie path
    (values strictly beyond the threshold, then copies of it) must equal torch.quantile and topk."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3_000_000, generator=g)
    x = {
        'relu': torch.relu(x),
        'neg_relu': -torch.relu(x),
        'few_levels': (x * 2).round(),
        'relu_with_negative_zeros': torch.where(x > 0, x, -0.0 * x.abs()),
    }[kind]
    qs = [0.999, 0.001, 0.9999, 0.0001, 0.99999, 0.00001]
    ours = quantiles(x.reshape(1, -1), qs)[:, 0]
    theirs = torch.stack([torch.quantile(x, q) for q in qs])
    assert torch.equal(ours, theirs)
    rows = x.reshape(1, -1)
    for k in (10, 3000, 30_000):
        for largest in (True, False):
            assert torch.equal(_top_tail(rows, k, largest), rows.topk(k, dim=1, largest=largest).values)
    delta, zp = F.uniform_qparams(x, 4)
    r_delta, r_zp = ref.uniform_per_tensor(x, 4)
    assert torch.equal(delta, r_delta) and torch.equal(zp, r_zp)


def test_threshold_selection_survives_adversarial_order():
    """Sorted data defeats a strided sample's estimate; the exact fallback must still be right."""
    x = torch.cat([torch.zeros(3_000_000), torch.linspace(1, 2, 50_000)]).reshape(1, -1)
    k = 3_100
    assert torch.equal(_top_tail(x, k, largest=True), x.topk(k, dim=1).values)


@pytest.mark.parametrize('bits', [3, 4, 6, 8])
def test_log_sqrt2_matches_repq(bits, quant_path):
    g = torch.Generator().manual_seed(bits)
    # small, and above one 2^20-element chunk for 4 bits
    attn = torch.softmax(torch.randn(360 if bits == 4 else 4, 3, 49, 49, generator=g) * 4, dim=-1)
    attn[0, 0, :5] = 0.0  # exact zeros (masked positions)
    delta = F.log_sqrt2_qparams(attn, bits)
    assert torch.equal(delta, ref.log_sqrt2_delta(attn, bits))
    assert torch.equal(F.fake_quant_log_sqrt2(attn, delta, bits), ref.log_sqrt2_quantize(attn, delta, bits))


@pytest.mark.parametrize('bits', [3, 4, 6, 8])
def test_log2_shift_form_equals_log_sqrt2(bits):
    """Inference form: x̂ = 2^-s · Δ_parity (a log2 quantizer plus a √2-scaled copy), bit-exact."""
    g = torch.Generator().manual_seed(10 + bits)
    attn = torch.softmax(torch.randn(2, 3, 49, 49, generator=g) * 3, dim=-1)
    delta = F.log_sqrt2_qparams(attn, bits)
    codes = integer_form.log_sqrt2_codes(attn, delta, bits)
    fq = F.fake_quant_log_sqrt2(attn, delta, bits)
    shifted = integer_form.log2_shift_dequant(codes, delta, bits)
    normal = (fq == 0) | (fq.abs() >= torch.finfo(torch.float32).tiny)
    assert normal.float().mean() > 0.99
    assert torch.equal(shifted[normal], fq[normal])
    shift, odd, nonzero = integer_form.log2_shift_form(codes, bits)
    assert shift.max() <= 2 ** (bits - 1) and set(odd.unique().tolist()) <= {0, 1}
    assert torch.equal(nonzero, fq != 0)


def test_log2_shift_integer_matmul_is_exact():
    """A·V with integer V through shifts and adds only, equal to the fake-quant product exactly."""
    bits = 4
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 49, 49, generator=g) * 2, dim=-1)
    v_int = torch.randint(-8, 8, (3, 49, 32), generator=g)
    delta = F.log_sqrt2_qparams(attn, bits)
    codes = integer_form.log_sqrt2_codes(attn, delta, bits)
    even, odd, s_max = integer_form.log2_shift_matmul_int(codes, v_int, bits)
    scales = integer_form.log2_shift_scales(delta).double()
    via_shifts = (scales[0] * even.double() + scales[1] * odd.double()) * 2.0**-s_max
    reference = F.fake_quant_log_sqrt2(attn, delta, bits).double() @ v_int.double()
    assert torch.equal(via_shifts, reference)  # float64 holds both sides exactly at these sizes
    with pytest.raises(ValueError, match='62'):
        integer_form.log2_shift_matmul_int(codes + 120, v_int, 8)  # shifts up to ~68


def test_constant_and_zero_tensors_do_not_divide_by_zero(quant_path):
    for v in (0.0, 2.5, -1.25):
        x = torch.full((10, 10), v)
        delta, zp = F.uniform_qparams(x, 4)
        assert delta > 0 and torch.isfinite(zp)
        assert torch.equal(F.fake_quant_uniform(x, delta, zp, 4), x)  # represented exactly
    # a dead channel among live ones: neutral mean delta, value represented to within delta/2
    x = torch.randn(8, 100)
    x[3] = 0.0
    x[5] = 0.3
    delta, zp = F.uniform_qparams(x, 4, channel_axis=0)
    live = [i for i in range(8) if i not in (3, 5)]
    assert torch.allclose(delta[3], delta[live].mean()) and torch.allclose(delta[5], delta[live].mean())
    fq = F.fake_quant_uniform(x, delta, zp, 4)
    assert torch.equal(fq[3], x[3]) and (fq[5] - 0.3).abs().max() <= delta[5] / 2 + 1e-7
    # a channel that is constant except for a handful of values: the non-degenerate candidate wins
    y = torch.zeros(1, 100_000)
    y[0, :3] = torch.tensor([1.0, 2.0, 3.0])
    d, _ = F.uniform_qparams(y, 8)
    assert d > 0
    attn = torch.zeros(2, 49, 49)
    assert F.log_sqrt2_qparams(attn, 4) == 1.0


def test_bad_input_raises_clear_errors(quant_path):
    for bits in (1, 9, 4.0, True, '4'):
        with pytest.raises(ValueError, match='bit-width must be an integer in 2..8'):
            F.uniform_qparams(torch.randn(10), bits)
    with pytest.raises(ValueError, match='1 NaN and 1 Inf'):
        F.uniform_qparams(torch.tensor([1.0, float('nan'), float('inf')]), 4)
    # one bad value anywhere, in every path (per tensor, per channel, the large-tensor select path)
    big = torch.randn(1 << 21)
    for bad, match in (
        (float('nan'), '1 NaN and 0 Inf'),
        (float('inf'), '0 NaN and 1 Inf'),
        (-float('inf'), '0 NaN and 1 Inf'),
    ):
        for x, axis in ((torch.randn(4, 50, 8), None), (torch.randn(4, 50, 8), -1), (big.clone(), None)):
            x.view(-1)[x.numel() // 3] = bad
            with pytest.raises(ValueError, match=match):
                F.uniform_qparams(x, 4, channel_axis=axis)
    with pytest.raises(ValueError, match='empty'):
        F.uniform_qparams(torch.empty(0, 4), 4, channel_axis=-1)
    with pytest.raises(ValueError, match='non-negative'):
        F.log_sqrt2_qparams(torch.randn(100), 4)
    assert F.check_bits(np.int64(3)) == 3
    assert math.isclose(F.SQRT2**2, 2.0)


@pytest.mark.parametrize(
    'layout', ['per-tensor', 'per-last-axis', 'per-first-axis', 'per-middle-axis', 'non-contiguous']
)
def test_fused_kernels_compute_the_pytorch_floats(layout, monkeypatch):
    """The fused kernels do the PyTorch path's float operations: fake-quant bit for bit (exact
    .5 ties, values past both clamps, ±Inf, NaN), squared-error sums to summation-order rounding."""
    assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 257, 48, generator=g) * 3
    shape = {'per-last-axis': (48,), 'per-first-axis': (4, 1, 1), 'per-middle-axis': (257, 1)}.get(layout, ())
    delta = 0.25 * (1 + torch.arange(math.prod(shape)).reshape(shape) / 300)
    zp = torch.full_like(delta, 7.0)
    d0 = delta.reshape(-1)[0]
    special = (0, 0, slice(0, 7)) if layout == 'per-middle-axis' else (0, slice(0, 7), 0)  # all in channel 0
    x[special] = torch.tensor([0.5, -1.5, 1e6, -1e6, float('inf'), -float('inf'), float('nan')]) * d0
    if layout == 'non-contiguous':
        x = x.transpose(0, 1)
    fused = F.fake_quant_uniform(x, delta, zp, 4)
    monkeypatch.setattr(_ext, 'kernels', lambda: None)
    plain = F.fake_quant_uniform(x, delta, zp, 4)
    assert torch.equal(fused.isnan(), plain.isnan()) and int(plain.isnan().sum()) == 1
    assert torch.equal(fused.nan_to_num(), plain.nan_to_num()) and fused.stride() == plain.stride()
    if layout == 'non-contiguous':
        plain = plain.transpose(0, 1)
    assert plain[special][:6].tolist() == (torch.tensor([0, -2, 8, -7, 8, -7]) * d0).tolist()  # half to even, clamps
    monkeypatch.undo()

    rows = torch.randn(96, 50_001, generator=g) * torch.rand(96, 1, generator=g) * 4
    d = torch.rand(3, 96, generator=g) * 0.2 + 0.01
    z = torch.randint(0, 16, (3, 96), generator=g).float()
    fused = _ext.kernels().uniform_sq_err(rows, d, z, 15)
    plain = torch.stack(
        [
            F._sum_sq_err(rows, lambda t, dd=dd[:, None], zz=zz[:, None]: F._uniform_error(t, dd, zz, 15))
            for dd, zz in zip(d, z)
        ]
    )
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)


def test_fused_log_sqrt2_computes_the_pytorch_floats(monkeypatch):
    """Codes from PyTorch's log2, then clamp/round/lookup fused: bit for bit the PyTorch path,
    including exact zeros (code 2^b), values above Δ (code 0), NaN and a ragged last chunk."""
    assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    g = torch.Generator().manual_seed(5)
    attn = torch.softmax(torch.randn((1 << 20) + 4097, generator=g) * 6, dim=0) * 3e3
    attn[:3] = torch.tensor([0.0, 10.0, float('nan')])
    delta = torch.tensor(0.37)
    fused = F.fake_quant_log_sqrt2(attn, delta, 4)
    err = F._log_sqrt2_sq_err(attn[3:].contiguous(), delta, 4)
    monkeypatch.setattr(_ext, 'kernels', lambda: None)
    plain = F.fake_quant_log_sqrt2(attn[3:], delta, 4)
    assert torch.equal(fused[3:], plain) and fused[0] == 0 and fused[1] == delta and fused[2].isnan()
    torch.testing.assert_close(err, F._log_sqrt2_sq_err(attn[3:].contiguous(), delta, 4), rtol=1e-6, atol=0)


@pytest.mark.parametrize('bits,delta', [(4, 1.0), (4, 0.37), (8, 1.0), (3, 2.5e-3)])
def test_fused_log_sqrt2_codes_from_float_bits_are_exact_at_every_code_boundary(bits, delta, monkeypatch):
    """The fused kernel reads codes off the exponent and mantissa of x/Δ and asks PyTorch's log2 only
    near a boundary 2^(-(k+1/2)/2): around every boundary (0 to ±2^15 ulps: inside, at the edge of and
    beyond the guard band), at subnormals, ±0, negatives, ±Inf and NaN, in vector lanes and in the
    ragged tail, its values equal the PyTorch path and RepQ-ViT's formula bit for bit."""
    assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    offsets = np.array([0, 1, 2, 3, 5, 8, 40, 100, 200, 255, 256, 257, 258, 300, 1000, 1 << 15])
    offsets = np.concatenate([offsets, -offsets[1:]]).astype(np.int32)
    ks = np.arange((1 << bits) + 6)
    bounds = (2.0 ** (-(ks + 0.5) / 2)).astype(np.float32)  # float32 nearest boundary
    t = (bounds.view(np.int32)[:, None] + offsets[None, :]).view(np.float32).reshape(-1)
    special = np.array(
        [0.0, -0.0, 1e-40, 1e-45, 2.0**-126, 1.0, 2.0, 1e30, -0.5, -1e-40, np.inf, -np.inf, np.nan], dtype=np.float32
    )
    values = np.concatenate([t, special, 2.0 ** -np.arange(0, 150, 0.5, dtype=np.float32)])
    perm = np.random.default_rng(bits).permutation(values.size)
    x = torch.from_numpy(values[perm] * np.float32(delta))  # ragged length: tails too
    d = torch.tensor(delta)
    fused = F.fake_quant_log_sqrt2(x, d, bits)
    finite = x[x.isfinite() & (x >= 0)].contiguous()
    err = F._log_sqrt2_sq_err(finite, d, bits)
    monkeypatch.setattr(_ext, 'kernels', lambda: None)
    plain = F.fake_quant_log_sqrt2(x, d, bits)
    assert torch.equal(fused.isnan(), plain.isnan()) and plain[x.isnan() | (x < 0)].isnan().all()
    ok = ~plain.isnan()
    assert torch.equal(fused[ok], plain[ok])
    assert torch.equal(plain[ok], ref.log_sqrt2_quantize(x, d, bits)[ok])
    torch.testing.assert_close(err, F._log_sqrt2_sq_err(finite, d, bits), rtol=1e-6, atol=0)


def test_fused_row_tails_are_exact_including_ties_and_tight_samples():
    """Per-channel tails: every row's k largest/smallest equal topk's, for heavy-tailed rows, rows of
    post-ReLU ties, constant rows, and sorted rows that defeat the strided sample (topk fallback)."""
    fused = _ext.kernels()
    assert fused is not None, 'the fused CPU kernels did not build (see the warning above)'
    g = torch.Generator().manual_seed(9)
    m = 40_000
    rows = torch.randn(6, m, generator=g) ** 3
    rows[1] = torch.relu(rows[1])
    rows[2] = 1.5
    i = torch.arange(m, dtype=torch.float32)
    rows[3] = torch.where(i % 32 == 0, -1 - i / m, 1 + i / m)  # the strided sample sees only the lowest
    rows[4] = -torch.relu(rows[4])
    k_top, k_bot = 41, 1300
    top, bot, ok = fused.row_tails(rows, k_top, k_bot)
    assert ok.tolist() == [True, True, True, False, True, True]
    good = ok.nonzero()[:, 0]
    assert torch.equal(top[good], rows[good].topk(k_top, dim=1).values)
    assert torch.equal(bot[good], rows[good].topk(k_bot, dim=1, largest=False).values)
    qs = [0.999, 0.001, 0.9999, 0.0001, 0.99999, 0.00001]
    assert torch.equal(quantiles(rows, qs), torch.stack([torch.quantile(rows, q, dim=1) for q in qs]))


@pytest.mark.parametrize('operand', ['q', 'k_transposed', 'v', 'scaled_q', 'expanded'])
def test_fused_fake_quant_of_attention_operands_matches_values_and_layout(operand, monkeypatch):
    """q/k/v sliced out of a fused qkv output are not dense: the fused path reads them as strided
    rows and lays the result out as PyTorch's element-wise ops do (dims by decreasing stride)."""
    assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(6, 49, 3, 3, 32, generator=g) * 2).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, d]
    x = {
        'q': qkv[0],
        'k_transposed': qkv[1].transpose(-2, -1),
        'v': qkv[2],
        'scaled_q': qkv[0] * 0.17,
        'expanded': qkv[0][:, :1].expand(-1, 3, -1, -1),
    }[operand]
    delta, zp = torch.tensor(0.21), torch.tensor(8.0)
    scratch = torch.full((x.numel() + 5,), float('nan'))
    fused = F.fake_quant_uniform(x, delta, zp, 4, scratch)
    fresh = F.fake_quant_uniform(x, delta, zp, 4)
    monkeypatch.setattr(_ext, 'kernels', lambda: None)
    plain = F.fake_quant_uniform(x, delta, zp, 4)
    big = [d for d in range(x.dim()) if x.shape[d] > 1]
    for out in (fused, fresh):
        assert torch.equal(out, plain)
        assert [out.stride(d) for d in big] == [plain.stride(d) for d in big]


def test_fused_kernels_build_dir_is_keyed_by_everything_the_build_depends_on(tmp_path, monkeypatch):
    """Two checkouts / virtual environments on one machine, or an edited source, never share (and
    so never recompile over, or load) one another's build: the directory hashes the source's
    path and content, the torch installation, the Python headers and the flags."""
    monkeypatch.setenv('MMDET_LRPQ_EXT_DIR', str(tmp_path))
    base = _ext.build_dir()
    assert base == _ext.build_dir() and base.startswith(str(tmp_path))
    src = tmp_path / 'fused_quant.cpp'
    src.write_bytes(open(_ext._SOURCE, 'rb').read())
    monkeypatch.setattr(_ext, '_SOURCE', str(src))
    other_checkout = _ext.build_dir()  # same content, another path (in the ninja command)
    src.write_bytes(src.read_bytes() + b'\n// edited\n')
    edited = _ext.build_dir()
    assert len({base, other_checkout, edited}) == 3
    monkeypatch.setattr(_ext.torch, '__file__', '/other/venv/site-packages/torch/__init__.py')
    other_venv = _ext.build_dir()
    assert other_venv not in (base, other_checkout, edited)
    monkeypatch.setattr(_ext, '_CFLAGS', _ext._CFLAGS + ['-g'])
    assert _ext.build_dir() not in (base, other_checkout, edited, other_venv)


def test_fused_kernels_build_dir_is_the_same_after_loading(monkeypatch):
    """torch's ``load`` appends its link flags to the lists it is given: the build key's own flags
    must not change with it (the directory named after loading was another one)."""
    before = _ext.build_dir()
    monkeypatch.setattr(_ext, '_state', {})  # load again (from the existing build)
    assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    assert _ext.build_dir() == before
