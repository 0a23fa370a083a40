"""Device correctness without a GPU: fake CUDA tensors, a factory-call audit, parity per device.

Users run on CUDA; CI has only CPUs. Three nets catch what a CPU run alone cannot:

* **Fake CUDA** (``FakeTensorMode``): tensors that claim ``device='cuda'`` and carry only shape,
  dtype and device. Every shape-only code path runs as on a GPU, and a CPU tensor the library makes
  next to them fails as on CUDA (``FakeTensorDeviceMismatchError``; 0-d CPU tensors mix, as on
  CUDA). Steps that read values (calibration's MSE search, ``bool(t)``, ``.item()``) cannot run.
* **The audit** (``device_audit``, tests/conftest.py) watches a real CPU run of calibration,
  reparameterization, the quantized forward and LRP, through the fused kernels and through the
  PyTorch path that other devices take — on small modules, and on whole models through
  ``quantize_`` and the hook's path: an mmdet Mask R-CNN (state files saved and loaded, calibration
  images from a dataset), a timm Swin, ``nn.MultiheadAttention`` — and fails on any tensor the
  library makes without following its inputs' device.
* **Parity** on every device the machine has (``device`` fixture) against the CPU PyTorch path.
"""

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as nnf
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mmdet_lrpq import quantize_
from mmdet_lrpq.config import QuantConfig
from mmdet_lrpq.lrp import (
    linear_relevance,
    lrp_site_scores,
    matmul_relevance,
    mean_pool_relevance,
    residual_relevance,
    safe_divide,
    swin_relevance,
)
from mmdet_lrpq.lrp import swin as lrp_swin
from mmdet_lrpq.models import ModelQuantizer
from mmdet_lrpq.models.attention import QuantMultiheadAttention
from mmdet_lrpq.models.mmdet_swin import QuantWindowMSA
from mmdet_lrpq.models.timm_swin import QuantWindowAttention
from mmdet_lrpq.quant import (
    LayerQuantConfig,
    LogSqrt2Quantizer,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    QuantState,
    RegionUniformQuantizer,
    UniformQuantizer,
    _ext,
    calibrate,
    crl_clip,
    integer_form,
    quant_modules,
    recording_ranges,
    reparameterize_,
    set_quant_state,
    smooth_,
    wrap_modules,
)
from mmdet_lrpq.quant import functional as F
from mmdet_lrpq.quant.quantiles import quantiles
from mmdet_lrpq.swin import swin_units

# the tiny detector and its prediction on a tensor batch, as the MMDetection integration tests run them
from test_mmdet_integration import TINY_CFG
from test_mmdet_integration import _build as build_detector
from test_mmdet_integration import _predict as predict

# FakeTensor.data_ptr() (read by the weight cache's key) warns; its value is never used as data.
pytestmark = pytest.mark.filterwarnings('ignore:Accessing the data pointer of FakeTensor')

BITS = 4


class TinyNet(nn.Module):
    """Conv stem -> LayerNorm -> Linear (per-channel input) -> GELU -> Linear -> ``attn @ h`` with
    the log-√2 quantizer on ``attn``: every quantized module type and a reparameterization pair."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.matmul = QuantMatMul(a_bits=BITS, log_sqrt2_a=True)

    def forward(self, img):
        x = self.stem(img).flatten(2).transpose(1, 2)  # [B, N, 16]
        h = self.fc2(nnf.gelu(self.fc1(self.norm(x))))
        attn = torch.softmax(h @ h.transpose(1, 2) / 4, dim=-1)
        return self.matmul(attn, h)


def tiny_net(seed: int = 0) -> TinyNet:
    """A float TinyNet with a random (non-identity) LayerNorm affine."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.2, 3.0)
        model.norm.bias.normal_()
    return model


def wrap(model: TinyNet) -> TinyNet:
    """Quantize every Conv2d/Linear at BITS; fc1's input (after the LayerNorm) per channel."""
    wrap_modules(model, lambda name, m: LayerQuantConfig(BITS, BITS, per_channel_input=name == 'fc1'))
    return model


def tiny_swin(seed: int = 0) -> SwinTransformer:
    """A 36x36 Swin with 4x4 windows, in milliseconds: 9x9 tokens make shifted, masked and zero-padded
    windows and a patch merging that pads (9 -> 5)."""
    torch.manual_seed(seed)
    model = SwinTransformer(
        img_size=36,
        embed_dim=32,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
        num_classes=10,
        always_partition=True,
        strict_img_size=False,
    )
    with torch.no_grad():  # timm starts biases at 0: random ones exercise every rule
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'relative_position_bias_table' in name:
                p.normal_(0, 0.1)
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# =============================================================================== fake CUDA


@pytest.fixture
def fake_cuda() -> FakeTensorMode:
    """Inside it, ``torch.*(..., device='cuda')`` makes fake CUDA tensors; real tensors are refused."""
    return FakeTensorMode()


def to_fake(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Move ``module``'s parameters and buffers to fake CUDA.

    ``nn.Module.to`` cannot: it swaps parameters in place, which a tensor subclass refuses."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        fake = mode.from_tensor(t.detach())
        with mode:  # (outside it, .to('cuda') would look for a real GPU)
            return fake.to('cuda')

    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(convert(p), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = convert(b)
    return module


def assert_on_cuda(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    for what, t in tensors.items():
        assert t.device.type == 'cuda', f'{what}: on {t.device}'
        if dtype is not None:
            assert t.dtype == dtype, f'{what}: {t.dtype}, expected {dtype}'


def fake_quantizer_outputs(dtype: torch.dtype) -> dict[str, Callable[[], tuple[torch.Tensor, torch.dtype]]]:
    """Every shape-only quantizer function on fake CUDA input: name -> (output, expected dtype).

    Made lazily per name (a bug in one function must not hide the others)."""
    x = torch.randn(2, 10, 16, device='cuda', dtype=dtype)
    d_t, z_t = torch.full((), 0.1, device='cuda'), torch.full((), 7.0, device='cuda')
    d_c = torch.rand(1, 1, 16, device='cuda') + 0.05
    z_c = torch.randint(0, 16, (1, 1, 16), device='cuda').float()
    attn = torch.rand(2, 4, 8, 8, device='cuda', dtype=dtype)
    d_a = torch.full((), 0.5, device='cuda')
    codes = integer_form.log_sqrt2_codes(attn, d_a, BITS)
    return {
        'fake_quant_uniform per tensor': lambda: (F.fake_quant_uniform(x, d_t, z_t, BITS), dtype),
        'fake_quant_uniform per channel': lambda: (F.fake_quant_uniform(x, d_c, z_c, BITS), dtype),
        'uniform_codes': lambda: (integer_form.uniform_codes(x, d_c, z_c, BITS), torch.float32),
        'quantiles': lambda: (quantiles(torch.randn(3, 1000, device='cuda'), F.PERCENTILES), torch.float32),
        'log_sqrt2_codes': lambda: (codes, torch.int64),
        'log_sqrt2_table': lambda: (F.log_sqrt2_table(d_a, BITS), torch.float32),
        'fake_quant_log_sqrt2': lambda: (F.fake_quant_log_sqrt2(attn, d_a, BITS), dtype),
        'log2_shift_form': lambda: (integer_form.log2_shift_form(codes, BITS)[0], torch.int64),
        'log2_shift_scales': lambda: (integer_form.log2_shift_scales(d_a), torch.float32),
        'log2_shift_dequant': lambda: (integer_form.log2_shift_dequant(codes, d_a, BITS), torch.float32),
        'fake_quant_regions': lambda: (
            F.fake_quant_regions(x, d_t, torch.full((), 3.0, device='cuda'), torch.full((), 2.0, device='cuda'), BITS),
            dtype,
        ),
    }


FAKE_QUANTIZER_CASES = [
    'fake_quant_uniform per tensor',
    'fake_quant_uniform per channel',
    'uniform_codes',
    'quantiles',
    'log_sqrt2_codes',
    'log_sqrt2_table',
    'fake_quant_log_sqrt2',
    'log2_shift_form',
    'log2_shift_scales',
    'log2_shift_dequant',
    'fake_quant_regions',
]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('case', FAKE_QUANTIZER_CASES)
def test_quantizer_functions_follow_fake_cuda(fake_cuda, case, dtype):
    with fake_cuda:
        cases = fake_quantizer_outputs(dtype)
        assert list(cases) == FAKE_QUANTIZER_CASES
        out, want = cases[case]()
        assert_on_cuda({case: out}, want)


def fix_weight_calibration(wq: UniformQuantizer) -> None:
    """Replace a weight quantizer's calibration (an MSE search over values, which fake tensors lack;
    run inside the forward, from the weights) by fixed per-output-channel qparams of the shape it
    returns, on the weight's device: the rest of the weight path (the cache, the fake-quant) runs."""

    def fixed(w: torch.Tensor) -> None:
        per_channel = (w.shape[0],) + (1,) * (w.dim() - 1)
        wq.set_qparams(
            w.new_full(per_channel, 0.01, dtype=torch.float32),
            w.new_full(per_channel, 8.0, dtype=torch.float32),
            channel_axis=0,
        )

    wq.calibrate = fixed


def fake_quant_module(kind: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A quantized module on fake CUDA with qparams set there, and its inputs.

    Calibration reads values, which fake tensors lack: activation qparams are set directly, and the
    weight quantizer's calibration is fixed (:func:`fix_weight_calibration`)."""
    if kind == 'QuantMatMul log-sqrt2':
        module = QuantMatMul(a_bits=BITS, log_sqrt2_a=True)
        module.quantizer_a.delta = torch.full((), 0.5, device='cuda')
        module.quantizer_b.set_qparams(torch.full((), 0.1, device='cuda'), torch.full((), 7.0, device='cuda'))
        inputs = (
            torch.rand(2, 4, 8, 8, device='cuda', dtype=dtype),
            torch.randn(2, 4, 8, 5, device='cuda', dtype=dtype),
        )
    else:
        if kind == 'QuantLinear per-channel input':
            module = QuantLinear(16, 8, per_channel_input=True, device='cuda', dtype=dtype)
            shape, inputs = (1, 1, 16), (torch.randn(2, 10, 16, device='cuda', dtype=dtype),)
        else:
            module = QuantConv2d(3, 8, 3, padding=1, device='cuda', dtype=dtype)
            shape, inputs = (), (torch.randn(2, 3, 8, 8, device='cuda', dtype=dtype),)
        q = module.input_quantizer
        q.set_qparams(torch.full(shape, 0.1, device='cuda'), torch.full(shape, 7.0, device='cuda'), q.channel_axis)
        fix_weight_calibration(module.weight_quantizer)
    set_quant_state(module, QuantState.QUANTIZED)
    return module, inputs


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kind', ['QuantLinear per-channel input', 'QuantConv2d', 'QuantMatMul log-sqrt2'])
def test_quantized_modules_run_on_fake_cuda(fake_cuda, kind, dtype):
    with fake_cuda:
        module, inputs = fake_quant_module(kind, dtype)
        outputs = {'output': module(*inputs)}
        if not isinstance(module, QuantMatMul):
            outputs['quantized weight'] = module.quantized_weight()
        assert_on_cuda(outputs, dtype)


def quant_attention(kind: str) -> tuple[nn.Module, Callable[[torch.dtype], tuple[tuple, dict]]]:
    """A float attention module converted as its adapter converts it (matmuls and projections
    quantized), on the CPU; and a function making its inputs on fake CUDA: masks included, and for
    the window attentions the ``input_shift`` that the norm1 -> qkv reparameterization leaves."""
    torch.manual_seed(0)
    if kind == 'nn.MultiheadAttention':
        module = QuantMultiheadAttention.convert_(
            nn.MultiheadAttention(16, 4, batch_first=True).eval(), (BITS, BITS), BITS, BITS, (BITS, BITS)
        )

        def inputs(dtype):
            q, kv = torch.randn(2, 5, 16, device='cuda', dtype=dtype), torch.randn(2, 7, 16, device='cuda', dtype=dtype)
            masks = dict(
                key_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device='cuda'),  # bool: -inf where set
                attn_mask=torch.randn(5, 7, device='cuda', dtype=dtype),
            )  # float: added
            return (q, kv, kv), masks

        return module, inputs
    if kind == 'mmdet WindowMSA':
        from mmdet.models.backbones.swin import WindowMSA

        module = QuantWindowMSA.convert_(WindowMSA(16, 2, (4, 4)).eval(), BITS, BITS)
    else:
        module = QuantWindowAttention.convert_(WindowAttention(16, 2, window_size=4).eval(), BITS, BITS)
    wrap_modules(module, lambda name, m: LayerQuantConfig(BITS, BITS))  # qkv, proj

    def window_inputs(dtype):
        module.input_shift = torch.randn(16, device='cuda', dtype=dtype)
        windows = 3  # 2 images x 3 windows of 4x4 tokens
        return (
            torch.randn(2 * windows, 16, 16, device='cuda', dtype=dtype),
            torch.randn(windows, 16, 16, device='cuda', dtype=dtype),
        ), {}

    return module, window_inputs


def set_fake_qparams(module: nn.Module) -> None:
    """Per-tensor qparams on fake CUDA for every input quantizer, fixed weight calibrations; QUANTIZED."""
    for m in quant_modules(module).values():
        if hasattr(m, 'weight_quantizer'):
            fix_weight_calibration(m.weight_quantizer)
        for q in m.input_quantizers():
            if isinstance(q, LogSqrt2Quantizer):
                q.delta = torch.full((), 0.5, device='cuda')
            else:
                q.set_qparams(torch.full((), 0.1, device='cuda'), torch.full((), 7.0, device='cuda'))
    set_quant_state(module, QuantState.QUANTIZED)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kind', ['nn.MultiheadAttention', 'mmdet WindowMSA', 'timm WindowAttention'])
def test_quantized_attention_runs_on_fake_cuda(fake_cuda, kind, dtype):
    module, make_inputs = quant_attention(kind)
    to_fake(module.to(dtype), fake_cuda)
    with fake_cuda, torch.no_grad():
        set_fake_qparams(module)
        args, kwargs = make_inputs(dtype)
        out = module(*args, **kwargs)
    outputs = dict(zip(('output', 'attention weights'), out)) if isinstance(out, tuple) else {'output': out}
    assert outputs['output'].shape == args[0].shape
    assert_on_cuda(outputs, dtype)


@pytest.mark.parametrize('k', [math.inf, 2.0])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kind', ['linear', 'conv1x1'])
def test_reparameterization_stays_on_fake_cuda(fake_cuda, kind, dtype, k):
    with fake_cuda:
        norm = nn.LayerNorm(16, device='cuda', dtype=dtype)
        if kind == 'linear':
            layer = QuantLinear(16, 8, bias=False, per_channel_input=True, device='cuda', dtype=dtype)
            shape = (1, 1, 16)
        else:
            layer = QuantConv2d(16, 8, 1, per_channel_input=True, device='cuda', dtype=dtype)
            shape = (1, 16, 1, 1)
        delta = torch.rand(shape, device='cuda') + 0.05
        zp = torch.randint(0, 1 << BITS, shape, device='cuda').float()
        layer.input_quantizer.set_qparams(delta, zp, channel_axis=layer.input_quantizer.channel_axis)
        d_c, z_c, clipped = crl_clip(delta.reshape(-1), zp.reshape(-1), k)
        res = reparameterize_(norm, layer, k=k)
        q = layer.input_quantizer
        assert_on_cuda(
            {
                'crl delta': d_c,
                'crl zp': z_c,
                'crl count': clipped,
                'r': res.r,
                'b': res.b,
                'target delta': res.target[0],
                'target zp': res.target[1],
                'count': res.clipped,
                'quantizer delta': q.delta,
                'quantizer zp': q.zero_point,
            }
        )
        assert_on_cuda(
            {
                'LayerNorm weight': norm.weight,
                'LayerNorm bias': norm.bias,
                'layer weight': layer.weight,
                'layer bias (created)': layer.bias,
            },
            dtype,
        )
        assert q.channel_axis is None and q.delta.shape == ()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_lrp_rules_on_fake_cuda(fake_cuda, dtype):
    with fake_cuda:

        def randn(*shape):
            return torch.randn(*shape, device='cuda', dtype=dtype)

        x, w, b = randn(2, 7, 16), randn(12, 16), randn(12)
        out = nnf.linear(x, w, b)
        a, m, rel = randn(2, 3, 6, 5), randn(2, 3, 5, 6), randn(2, 3, 6, 6)
        r_a, r_m = matmul_relevance(a, m, a @ m, rel)
        r_x, r_y = residual_relevance(rel, a @ m, rel)
        assert_on_cuda(
            {
                'safe_divide': safe_divide(rel, a @ m),
                'linear': linear_relevance(x, w, b, out, randn(2, 7, 12)),
                'matmul a': r_a,
                'matmul b': r_m,
                'residual a': r_x,
                'residual b': r_y,
                'mean pool': mean_pool_relevance(x, randn(2, 1, 16), (1,)),
            },
            dtype,
        )


def test_swin_lrp_units_on_fake_cuda(fake_cuda):
    """Every unit's explicit forward and relevance rule (window index maps, masks, padding, merging).

    ``swin_relevance`` as a whole reads values (it validates the targets), so its units run here."""
    model = to_fake(tiny_swin(), fake_cuda)
    with fake_cuda, torch.no_grad():
        x = model.patch_embed(torch.randn(2, 3, 36, 36, device='cuda'))
        records = []
        for name, unit in swin_units(model):
            rec = lrp_swin._unit_fns(unit)[0](name, unit, x)
            records.append((name, unit, rec))
            x = rec['out']
        rel = torch.rand_like(x)
        for name, unit, rec in reversed(records):
            rel, site_rels, padding = lrp_swin._unit_fns(unit)[1](name, unit, rec, rel)
            scores = {site: lrp_swin._site_score(r, r, 2) for site, r in site_rels.items()}
            assert_on_cuda(
                {
                    name: rel,
                    **site_rels,
                    **rec['sites'],
                    **scores,
                    **({} if padding is None else {f'{name} padding': padding}),
                }
            )


# ============================================================================ device audit


@pytest.fixture(params=['fused', 'torch'])
def quant_path(request, monkeypatch):
    """The fused CPU kernels, and the PyTorch path every other device takes (MMDET_LRPQ_NO_EXT=1)."""
    if request.param == 'torch':
        monkeypatch.setenv('MMDET_LRPQ_NO_EXT', '1')
    else:
        assert _ext.kernels() is not None, 'the fused CPU kernels did not build (see the warning above)'
    return request.param


def library_code(source: str):
    """``source`` compiled as if it were a line of mmdet_lrpq/quant/functional.py: what the audit judges."""
    return compile(source, F.__file__, 'eval')


@pytest.mark.parametrize(
    'source',
    ['torch.arange(3)', 'torch.tensor([1.0]) * x', 'torch.full((3,), 2.0)', 'torch.as_tensor([1.0])', 'x.cpu()'],
)
def test_audit_fails_on_library_tensors_off_the_input_device(device_audit, source):
    x = torch.ones(3)
    with pytest.raises(pytest.fail.Exception, match=r'mmdet_lrpq/quant/functional\.py:1 in <module>'):
        with device_audit():
            eval(library_code(source), {'torch': torch, 'x': x})


def test_audit_passes_tensors_that_follow_and_code_it_does_not_judge(device_audit):
    x = torch.ones(3)
    follows = 'torch.arange(3, device=x.device) + torch.zeros_like(x) + x.new_ones(3) + torch.as_tensor(x)'
    with device_audit():
        eval(library_code(follows), {'torch': torch, 'x': x})
        torch.arange(3)  # test code, torch and timm are not judged
    with device_audit(allow={('quant/functional.py', '<module>'): 'a CPU-only fast path'}):
        eval(library_code('torch.arange(3)'), {'torch': torch})


def test_calibration_reparam_and_forward_follow_the_input_device(quant_path, device_audit):
    model = tiny_net()
    x = images(2, 16)
    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(torch.randn(2, 4, 16, 16, generator=g) * 3, dim=-1)
    v_int = torch.randint(-8, 8, (2, 4, 16, 8), generator=g)
    big = torch.randn((1 << 20) + 7, generator=g)  # per tensor: threshold-and-select
    long_rows = torch.randn(4, 8192, generator=g)  # per channel: fused row selection
    big_attn = torch.softmax(torch.randn(64, 128, 128, generator=g) * 3, dim=-1)
    sparse = torch.zeros(10_000)
    sparse[:5] = 0.5  # some log-√2 candidates are 0
    constant_rows = torch.randn(4, 50, generator=g)
    constant_rows[1] = 3.0
    with device_audit():
        wrap(model)
        calibrate(model, lambda m: m(x))
        reparameterize_(model.norm, model.fc1, k=2.0)
        with torch.no_grad():
            model(x)
        delta = model.matmul.quantizer_a.delta  # the integer inference form of attn @ v
        codes = integer_form.log_sqrt2_codes(attn, delta, BITS)
        integer_form.log2_shift_dequant(codes, delta, BITS)
        integer_form.log2_shift_matmul_int(codes, v_int, BITS)
        integer_form.uniform_codes(x, *F.uniform_qparams(x, BITS), BITS)
        F.uniform_qparams(big, BITS)
        F.uniform_qparams(long_rows, BITS, channel_axis=0)
        F.log_sqrt2_qparams(big_attn, BITS)
        F.log_sqrt2_qparams(sparse, BITS)
        F.log_sqrt2_qparams(torch.zeros(100), BITS)  # every candidate is 0
        F.uniform_qparams(constant_rows, BITS, channel_axis=0)  # one constant channel
        F.uniform_qparams(torch.full((3, 20), -2.0), BITS, channel_axis=0)  # all constant


def test_lrp_follows_the_input_device(device_audit):
    model = tiny_swin()
    batch = images(3, 36)
    with device_audit():
        swin_relevance(model, batch)
        lrp_site_scores(model, iter(batch), targets=[None, 3, 7], batch_size=2)


# Deliberate host copies of the state machinery (on top of DEVICE_AUDIT_ALLOWED).
IDENTITY_HASH = {
    ('models/state.py', '_update_tensor'): "hashes the float weights for a state's identity: sha256 reads host bytes"
}
STATE_HOST_COPIES = {
    **IDENTITY_HASH,
    ('models/state.py', 'host_state_dict'): 'a saved state holds CPU tensors, so that it loads on any device',
}


# Whole detectors take the PyTorch path only, the one GPUs take (the fused kernels are audited above).
ON_THE_GPU_PATH = pytest.mark.parametrize('quant_path', ['torch'], indirect=True)


@pytest.fixture(scope='module')
def tiny_detector() -> Callable[[], nn.Module]:
    """Fresh copies of the tiny random-weight Swin Mask R-CNN whose test config keeps every box
    (``score_thr=0``), so the mask head runs and calibrates too."""
    cfg, model = build_detector(TINY_CFG)
    assert cfg.model.test_cfg.rcnn.score_thr == 0
    return lambda: copy.deepcopy(model)


@ON_THE_GPU_PATH
def test_detector_calibration_and_quantized_forward_follow_the_input_device(quant_path, device_audit, tiny_detector):
    """The driver behind the hook on a whole detector: wrap, calibrate (streamed), CRL reparameterization
    of the Swin blocks and FPN laterals, weight re-quantization, quantized forward with the RoI heads."""
    model = tiny_detector()
    x = images(1, 64)
    with device_audit(allow=IDENTITY_HASH):
        quantizer = ModelQuantizer(model, QuantConfig(w_bits=BITS, a_bits=BITS, method='crl'))
        quantizer.wrap()
        quantizer.calibrate([x], predict)
        with torch.no_grad():
            out = predict(model, x)[0].pred_instances
    assert quantizer.report.reparameterized and all(
        m.state is QuantState.QUANTIZED for m in quant_modules(model).values()
    )
    assert len(out.masks) > 0 and out.masks.shape[-2:] == x.shape[-2:]


@ON_THE_GPU_PATH
def test_detector_state_file_save_and_load_follow_the_input_device(quant_path, device_audit, tiny_detector, tmp_path):
    """``quantize_`` with a state file: calibrate and save, then load into a fresh detector."""
    model, twin = tiny_detector(), tiny_detector()
    x = images(1, 64)
    path = str(tmp_path / 'state.pth')
    config = QuantConfig(w_bits=BITS, a_bits=BITS, method='crl')
    with device_audit(allow=STATE_HOST_COPIES):
        quantize_(model, config, calib=lambda m: predict(m, x), state_file=path, calib_id='random batch')
        quantize_(
            twin,
            config,
            calib=lambda m: pytest.fail('the saved state must be loaded'),
            state_file=path,
            calib_id='random batch',
        )
        with torch.no_grad():
            want, got = predict(model, x)[0].pred_instances, predict(twin, x)[0].pred_instances
    assert len(got) > 0 and torch.equal(got.scores, want.scores) and torch.equal(got.masks, want.masks)


@ON_THE_GPU_PATH
def test_hook_calibration_images_follow_the_input_device(quant_path, device_audit, tiny_detector, tmp_path):
    """The hook's own entry (``QuantizationHook.quantize_model``): calibration images loaded and
    batched from a dataset through the config's test pipeline, then the driver."""
    from mmdet_lrpq.engine import QuantizationHook
    from mmdet_lrpq.miniworld import generate

    generate(tmp_path, sizes=dict(train=0, val=0, calib=1, cls_train=0, cls_val=0))
    cfg, _ = build_detector(TINY_CFG)
    resize = next(step for step in cfg.test_dataloader.dataset.pipeline if step.type == 'Resize')
    resize.scale = (64, 64)  # the 224x224 image at 64x64: fast
    model = tiny_detector()
    hook = QuantizationHook(
        w_bits=BITS,
        a_bits=BITS,
        calib=dict(
            source='test', data_root=f'{tmp_path}/', ann_file='annotations/instances_calib.json', img_prefix='calib/'
        ),
    )
    with device_audit(allow=IDENTITY_HASH):
        report = hook.quantize_model(model, cfg, logger=None)
    assert report.calibration_ids == [1] and report.input_shape == (64, 64)


def test_quantize_timm_swin_and_multihead_attention_follow_the_input_device(quant_path, device_audit):
    swin, x = tiny_swin(), images(2, 36)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    g = torch.Generator().manual_seed(4)
    q, kv = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with device_audit(allow=IDENTITY_HASH):
        quantize_(swin, QuantConfig(w_bits=BITS, a_bits=BITS, method='crl'), calib=[x[:1], x[1:]])
        quantize_(
            model, QuantConfig(w_bits=BITS, a_bits=BITS), calib=lambda m: m.attn(q, kv, kv, key_padding_mask=padding)
        )
        with torch.no_grad():
            swin(x)
            model.attn(q, kv, kv, key_padding_mask=padding)
    assert isinstance(model.attn, QuantMultiheadAttention)
    assert isinstance(swin.layers[0].blocks[0].attn, QuantWindowAttention)


def test_mptq_options_follow_the_input_device(quant_path, device_audit):
    """SQ-b's float pass and folds (then CRL on the same pairs) and OPT-m's search and forward."""
    swin, x = tiny_swin(), images(2, 36)
    with device_audit(allow=IDENTITY_HASH):
        quantize_(
            swin,
            QuantConfig(w_bits=BITS, a_bits=BITS, method='crl', smooth='sq-b', gelu_scales='opt-m'),
            calib=[x[:1], x[1:]],
        )
        with torch.no_grad():
            swin(x)
    assert isinstance(swin.layers[0].blocks[0].mlp.fc2.input_quantizer, RegionUniformQuantizer)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sqb_fold_and_region_quantizer_stay_on_fake_cuda(fake_cuda, dtype):
    with fake_cuda:
        norm = nn.LayerNorm(16, device='cuda', dtype=dtype)
        layer = QuantLinear(16, 8, device='cuda', dtype=dtype)
        with recording_ranges({'fc': layer}) as ranges:
            layer(torch.randn(2, 10, 16, device='cuda', dtype=dtype))
        res = smooth_(norm, layer, ranges['fc'])
        q = RegionUniformQuantizer(BITS)
        q.delta, q.zero_point, q.ratio_exp = (torch.full((), v, device='cuda') for v in (0.1, 3.0, 2.0))
        out = q(torch.randn(2, 10, 16, device='cuda', dtype=dtype))
        assert_on_cuda({'s': res.r, 'b': res.b, 'lo': ranges['fc'].lo, 'bias': layer.bias})
        assert_on_cuda({'norm weight': norm.weight, 'weight': layer.weight, 'output': out}, dtype)


# ============================================================================= device parity


def cpu_reference(monkeypatch, fn):
    """``fn()`` through the CPU PyTorch path: the same element-wise float operations as any device."""
    with monkeypatch.context() as m:
        m.setenv('MMDET_LRPQ_NO_EXT', '1')
        return fn()


def test_element_wise_quantizers_are_bit_exact_on_device(device, monkeypatch):
    """Uniform fake-quant with given qparams, and log-√2 codes away from rounding boundaries, are the
    same on every device: division, round-half-even, clamp and multiply are exact IEEE operations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 24, generator=g) * 2
    x[0, 0, :8] = (torch.arange(8) - 3.5) * 0.125  # exact ties x/Δ = k + 1/2 (Δ = 1/8)
    d_t, z_t = torch.tensor(0.125), torch.tensor(5.0)
    d_c = torch.rand(1, 1, 24, generator=g) + 0.05
    z_c = torch.randint(0, 1 << BITS, (1, 1, 24), generator=g).float()
    attn = torch.softmax(torch.randn(4, 2, 32, 32, generator=g) * 4, dim=-1)
    d_a = F.log_sqrt2_qparams(attn, BITS)
    # log2 is not correctly rounded on every device (CUDA's is within 1 ulp): keep values whose
    # code does not sit within 1e-3 of a rounding boundary, where 1 ulp could decide differently.
    v = -2 * torch.log2(attn.double() / d_a.double())
    attn = torch.where(((v - v.floor()) - 0.5).abs() < 1e-3, torch.zeros_like(attn), attn)
    v_int = torch.randint(-8, 8, (4, 2, 32, 8), generator=g)

    def run(dev):
        xd, dt, zt, dc, zc, ad, da, vd = (t.to(dev) for t in (x, d_t, z_t, d_c, z_c, attn, d_a, v_int))
        codes = integer_form.log_sqrt2_codes(ad, da, BITS)
        return [
            F.fake_quant_uniform(xd, dt, zt, BITS),
            F.fake_quant_uniform(xd, dc, zc, BITS),
            integer_form.uniform_codes(xd, dc, zc, BITS),
            codes,
            F.fake_quant_log_sqrt2(ad, da, BITS),
            integer_form.log2_shift_dequant(codes, da, BITS),
            *integer_form.log2_shift_matmul_int(codes, vd, BITS)[:2],
        ]

    expected = cpu_reference(monkeypatch, lambda: run('cpu'))
    for i, (got, want) in enumerate(zip(run(device), expected)):
        assert got.device.type == device.type
        assert torch.equal(got.cpu(), want), f'output {i} differs on {device}'


def test_calibration_search_matches_cpu(device, monkeypatch):
    """Quantiles and the MSE search: Δ to 1e-6 relative (quantile interpolation may be FMA-contracted
    on a GPU; the candidates' errors are summed in another order), the same zero points."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, 48, generator=g) * (torch.rand(48, generator=g) * 3 + 0.1)
    attn = torch.softmax(torch.randn(8, 49, 49, generator=g) * 4, dim=-1)

    def run(dev):
        return [
            *F.uniform_qparams(x.to(dev), BITS),
            *F.uniform_qparams(x.to(dev), BITS, channel_axis=-1),
            F.log_sqrt2_qparams(attn.to(dev), BITS),
        ]

    expected = cpu_reference(monkeypatch, lambda: run('cpu'))
    got = run(device)
    for i in (1, 3):
        assert torch.equal(got[i].cpu(), expected[i]), f'zero point {i} differs on {device}'
    for i in (0, 2, 4):
        torch.testing.assert_close(got[i].cpu(), expected[i], rtol=1e-6, atol=0)


def mostly_close(got: torch.Tensor, want: torch.Tensor, rtol: float, share: float) -> None:
    """All but ``1 - share`` of the elements within ``rtol`` of the output scale."""
    close = (got - want).abs() <= rtol * want.abs().max()
    assert close.float().mean() >= share, f'{(~close).sum()} of {close.numel()} elements differ'


def test_calibrated_model_matches_cpu(device, monkeypatch):
    """Calibration, reparameterization and the quantized forward on ``device`` vs the CPU PyTorch
    path. On the CPU (fused kernels vs PyTorch path) bit for bit. Elsewhere convolution, matmul,
    LayerNorm and softmax sum in another order (~1e-7 relative), which may move a value across a
    rounding boundary of a later quantizer: qparams to 1e-5, and 99% of the outputs within 1e-4
    of the output scale (a moved code changes its row by about one quantization step)."""
    x = images(2, 16)

    def run(dev):
        model = wrap(tiny_net().to(dev))
        calibrate(model, lambda m: m(x.to(dev)))
        res = reparameterize_(model.norm, model.fc1, k=2.0)
        with torch.no_grad():
            out = model(x.to(dev))
        qparams = [
            t
            for m in quant_modules(model).values()
            for q in m.input_quantizers()
            for t in ([q.delta] if isinstance(q, LogSqrt2Quantizer) else [q.delta, q.zero_point])
        ]
        return out, [*qparams, res.r, res.b, model.norm.weight, model.norm.bias, model.fc1.weight, model.fc1.bias]

    want_out, want_params = cpu_reference(monkeypatch, lambda: run('cpu'))
    got_out, got_params = run(device)
    if device.type == 'cpu':
        assert torch.equal(got_out, want_out)
        assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    else:
        for a, b in zip(got_params, want_params):
            torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)
        mostly_close(got_out.cpu(), want_out, rtol=1e-4, share=0.99)


def test_reparameterization_matches_cpu(device):
    """From the same per-channel qparams: element-wise except ``mean``/``std`` over channels and the
    bias update's matmul, which sum in another order on a GPU: 1e-5 relative."""
    g = torch.Generator().manual_seed(3)
    delta = torch.rand(1, 1, 16, generator=g) + 0.05
    zp = torch.randint(0, 1 << BITS, (1, 1, 16), generator=g).float()
    delta[0, 0, ::5] *= 8  # outlier channels for CRL to clip

    def run(dev):
        torch.manual_seed(0)
        norm, fc = nn.LayerNorm(16).to(dev), nn.Linear(16, 8).to(dev)
        layer = QuantLinear.from_float(fc, w_bits=BITS, a_bits=BITS, per_channel_input=True)
        layer.input_quantizer.set_qparams(delta.to(dev), zp.to(dev), channel_axis=-1)
        res = reparameterize_(norm, layer, k=2.0)
        q = layer.input_quantizer
        return [res.r, res.b, norm.weight, norm.bias, layer.weight, layer.bias, q.delta, q.zero_point], res

    expected, ref_res = run('cpu')
    got, res = run(device)
    assert res.n_clipped == ref_res.n_clipped > 0
    for a, b in zip(got, expected):
        assert a.device.type == device.type
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)


def test_lrp_scores_match_cpu(device):
    """LRP site scores on ``device`` vs CPU: float32 matmuls summed in another order, propagated
    through four blocks and a patch merging, then averaged: 1e-3 relative to the largest score."""
    batch = images(2, 36)
    want = lrp_site_scores(tiny_swin(), batch, batch_size=2)
    got = lrp_site_scores(tiny_swin().to(device), batch.to(device), batch_size=2)
    assert list(got) == list(want)
    scale = max(want.values())
    for site in want:
        assert got[site] == pytest.approx(want[site], abs=1e-3 * scale), site
