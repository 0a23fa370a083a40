"""Fused CPU kernels vs the PyTorch path, primitive by primitive, side by side in one run.

    .venv/bin/python bench/kernel_speed.py [--out results/kernel_speed.json]
    .venv/bin/python bench/kernel_speed.py --device cuda   # the PyTorch path on a GPU, timed alone

Shapes are those of Swin-T Mask R-CNN at 1216x800 (the calibration benchmark's image): the
stage-0 MLP hidden activation (23.3 M values, post-GELU), a post-LayerNorm input calibrated per
channel (60 800 tokens x 96 channels), a stage-0 attention map for the log-sqrt2 quantizer (8.9 M
values), a stage-2 shifted-window attention map with Swin's -100 mask in half of the windows
(2.5 M values, many of them zero or subnormal), a post-ReLU FPN-sized tensor (15.6 M values,
half zeros) and the keys of stage-0 attention read out of the fused qkv projection's output
(6.0 M values: rows of 96 floats every 288). Every operation is timed as
the median of ``--repeats`` interleaved runs (fused, PyTorch, fused, ...), and both paths' results
are checked equal (bit for bit; MSE-based parameters by value) before anything is printed.
The fused kernels are a CPU fast path: on another ``--device`` only the PyTorch path runs (timed
with the device synchronized) and its results go to ``results/kernel_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from mmdet_lrpq.quant import _ext
from mmdet_lrpq.quant import functional as F

try:
    from bench import common
except ImportError:  # python bench/kernel_speed.py: bench/ is sys.path[0]
    import common


def inputs(device: torch.device) -> dict:
    """Made on the CPU from one seeded generator (the same values on any device), then moved."""
    g = torch.Generator().manual_seed(0)
    gelu = torch.nn.functional.gelu(torch.randn(23_347_200, generator=g) * 1.5)
    ln = torch.randn(1241, 49, 96, generator=g) * (torch.rand(96, generator=g) * 3 + 0.1)
    attn = torch.softmax(torch.randn(3723, 49, 49, generator=g) * 4, dim=-1)
    relu = torch.relu(torch.randn(256, 304, 200, generator=g))
    # Stage-2 shifted-window attention (88 windows x 12 heads): in the border windows (here half of
    # them) token pairs from different regions carry Swin's -100 mask, so softmax gives them
    # subnormal or zero probabilities.
    logits = torch.randn(88, 12, 49, 49, generator=g) * 4
    region = torch.randint(0, 2, (44, 1, 49), generator=g)
    logits[:44] += (region.unsqueeze(-1) != region.unsqueeze(-2)) * -100.0
    masked = torch.softmax(logits, dim=-1).reshape(-1, 49, 49)
    # Stage-0 qkv output [windows, tokens, q/k/v, heads, head dim] and its keys [windows, heads,
    # tokens, head dim] as WindowMSA slices them (a strided view).
    qkv = torch.randn(1276, 49, 3, 3, 32, generator=g)
    x = {name: t.to(device) for name, t in dict(gelu=gelu, ln=ln, attn=attn, relu=relu, masked=masked).items()}
    x['keys'] = qkv.to(device).permute(2, 0, 3, 1, 4)[1]
    return x


def operations(x: dict) -> dict:
    d_g, z_g = F.uniform_qparams(x['gelu'], 4)
    d_a = F.log_sqrt2_qparams(x['attn'], 4)
    d_m = F.log_sqrt2_qparams(x['masked'], 4)
    d_k, z_k = F.uniform_qparams(x['keys'], 4)
    scratch = torch.empty(x['gelu'].numel(), device=x['gelu'].device)
    return {
        'uniform_qparams per tensor, 23.3M post-GELU': lambda: F.uniform_qparams(x['gelu'], 4),
        'uniform_qparams per channel, 60800x96 post-LN': lambda: F.uniform_qparams(x['ln'], 4, channel_axis=-1),
        'uniform_qparams per tensor, 15.6M post-ReLU': lambda: F.uniform_qparams(x['relu'], 4),
        'log_sqrt2_qparams, 8.9M attention': lambda: F.log_sqrt2_qparams(x['attn'], 4),
        'fake_quant_uniform, 23.3M': lambda: F.fake_quant_uniform(x['gelu'], d_g, z_g, 4),
        'fake_quant_uniform, 23.3M into scratch': lambda: F.fake_quant_uniform(x['gelu'], d_g, z_g, 4, scratch),
        'fake_quant_uniform, 6.0M keys sliced from qkv into scratch': lambda: F.fake_quant_uniform(
            x['keys'], d_k, z_k, 4, scratch
        ),
        'fake_quant_log_sqrt2, 8.9M attention': lambda: F.fake_quant_log_sqrt2(x['attn'], d_a, 4),
        'fake_quant_log_sqrt2, 8.9M attention into scratch': lambda: F.fake_quant_log_sqrt2(x['attn'], d_a, 4, scratch),
        'fake_quant_log_sqrt2, 2.5M masked attention into scratch': lambda: F.fake_quant_log_sqrt2(
            x['masked'], d_m, 4, scratch
        ),
    }


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    common.add_device(parser, 'kernel_speed', 'cpu (fused vs PyTorch) or e.g. cuda (PyTorch path alone)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_path = args.out or common.device_results('kernel_speed', device.type)
    torch.set_grad_enabled(False)
    command = 'python bench/kernel_speed.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    if device.type != 'cpu':
        return device_only(args.repeats, device, command, out_path)
    fused_kernels = _ext.kernels()
    if fused_kernels is None:
        sys.exit('the fused kernels are not available (see the warning above); nothing to compare')
    x = inputs(device)
    ops = operations(x)
    pytorch_path = lambda: None  # noqa: E731
    rows = []
    for name, op in ops.items():
        results, times = {}, {'fused': [], 'pytorch': []}
        for _ in range(args.repeats):
            for path in ('fused', 'pytorch'):
                _ext.kernels = (lambda: fused_kernels) if path == 'fused' else pytorch_path
                t0 = time.perf_counter()
                out = op()
                times[path].append(time.perf_counter() - t0)
                results[path] = out.clone() if isinstance(out, torch.Tensor) else out
        _ext.kernels = lambda: fused_kernels
        if not same(results['fused'], results['pytorch']):
            sys.exit(f'{name}: the fused and PyTorch paths disagree; not reporting timings')
        fused, plain = statistics.median(times['fused']), statistics.median(times['pytorch'])
        rows.append(dict(operation=name, fused_ms=1e3 * fused, pytorch_ms=1e3 * plain, speedup=plain / fused))
        print(
            f'{name:57s} PyTorch {1e3 * plain:8.1f} ms   fused {1e3 * fused:7.1f} ms   {plain / fused:5.1f}x',
            flush=True,
        )
    res = dict(
        command=command,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        repeats=args.repeats,
        rows=rows,
    )
    common.write_json(out_path, res)
    return res


def device_only(repeats: int, device: torch.device, command: str, out_path: str) -> dict:
    """The PyTorch path on a non-CPU ``device``: median of ``--repeats`` synchronized runs per operation."""
    sync = getattr(torch, device.type).synchronize
    ops = operations(inputs(device))
    rows = []
    for name, op in ops.items():
        op()  # warm-up: kernel loading, allocator
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            op()
            sync()
            times.append(time.perf_counter() - t0)
        rows.append(dict(operation=name, pytorch_ms=1e3 * statistics.median(times)))
        print(f'{name:57s} PyTorch on {device.type} {rows[-1]["pytorch_ms"]:8.2f} ms', flush=True)
    res = dict(
        command=command,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        repeats=repeats,
        rows=rows,
    )
    common.write_json(out_path, res)
    return res


if __name__ == '__main__':
    main()
