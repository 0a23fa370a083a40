"""MMEngine checkpoints load under torch's weights_only=True through an explicit allow-list."""

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch


def _save_runner_like_checkpoint(path):
    """What mmengine's Runner.save_checkpoint writes: meta with numpy scalars and a message hub."""
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance('lrpq-test-ckpt')
    for i in range(3):
        hub.update_scalar('train/loss', 1.0 / (i + 1))
    hub.update_scalar('train/lr', np.float64(0.02))
    hub.update_info('iter', 3)
    checkpoint = {
        'meta': {
            'epoch': 2,
            'iter': 3,
            'seed': np.int64(7),
            'mmengine_version': '0.10.7',
            'dataset_meta': {'classes': ('circle', 'square'), 'palette': [(1, 2, 3)]},
        },
        'state_dict': {'backbone.weight': torch.arange(6.0).reshape(2, 3), 'head.bias': torch.ones(2)},
        'message_hub': hub.state_dict(),
    }
    save_checkpoint(checkpoint, str(path))


def test_plain_torch_refuses_mmengine_checkpoint(tmp_path):
    """The problem being solved: torch >= 2.6 refuses mmengine's metadata by default."""
    path = tmp_path / 'ckpt.pth'
    _save_runner_like_checkpoint(path)
    code = f'import torch; torch.load({str(path)!r}, weights_only=True)'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode != 0 and 'Weights only load failed' in proc.stderr


def test_mmengine_checkpoint_round_trip_with_allow_list(tmp_path):
    path = tmp_path / 'ckpt.pth'
    _save_runner_like_checkpoint(path)
    code = textwrap.dedent(f"""
        import torch, mmengine, mmdet_lrpq
        from mmengine.runner.checkpoint import _load_checkpoint
        ck = _load_checkpoint({str(path)!r}, map_location='cpu')   # torch.load, weights_only default
        assert ck['meta']['seed'] == 7 and ck['meta']['dataset_meta']['classes'] == ('circle', 'square')
        assert torch.equal(ck['state_dict']['backbone.weight'], torch.arange(6.).reshape(2, 3))
        buf = ck['message_hub']['log_scalars']['train/loss']
        assert abs(buf.mean() - (1 + 1/2 + 1/3) / 3) < 1e-12 and buf.current() == 1/3
        print('ok')
    """)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('ok')


def test_allow_list_refuses_other_getattr(tmp_path):
    """The allow-listed getattr resolves HistoryBuffer statistics only, nothing else."""
    from mmengine.logging.history_buffer import HistoryBuffer

    import mmdet_lrpq.safe_load as ckpt

    ckpt.allow_mmengine_checkpoints()

    class Evil:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    path = tmp_path / 'evil.pth'
    torch.save({'x': Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        torch.load(path, weights_only=True)


def test_missing_checkpoint_message(tmp_path):
    from mmdet_lrpq.safe_load import require_checkpoint

    with pytest.raises(FileNotFoundError, match='checkpoint not found.*convert_checkpoint'):
        require_checkpoint(tmp_path / 'nope.pth')


# ----------------------------------------------------------------------------- tools/convert_checkpoint.py
def _convert(*args):
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / 'tools' / 'convert_checkpoint.py'
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True, text=True, timeout=300)


class NotAllowListed:
    """A pickled object weights-only loading refuses (only --trust loads it)."""


def _official_like(path):
    """A tiny checkpoint in the official mmdet-2.x layout (Microsoft's Swin keys under backbone.)."""
    torch.save(
        {
            'meta': {'CLASSES': ('a', 'b')},
            'state_dict': {
                'backbone.layers.0.blocks.0.attn.qkv.weight': torch.randn(6, 2),
                'neck.lateral_convs.0.conv.weight': torch.randn(2, 2, 1, 1),
            },
        },
        path,
    )
    return path.read_bytes()


def test_convert_refuses_to_overwrite_its_input_by_name_link_or_inode(tmp_path):
    import os

    src = tmp_path / 'official.pth'
    before = _official_like(src)
    os.link(src, tmp_path / 'hardlink.pth')
    os.symlink(src, tmp_path / 'symlink.pth')
    for dst in (src, tmp_path / '.' / 'official.pth', tmp_path / 'hardlink.pth', tmp_path / 'symlink.pth'):
        proc = _convert(src, dst)
        assert proc.returncode != 0 and 'is the input file' in proc.stderr and 'Traceback' not in proc.stderr, (
            proc.stderr
        )
        assert src.read_bytes() == before
    proc = _convert(src, tmp_path / 'out.pth')
    assert proc.returncode == 0, proc.stderr
    converted = torch.load(tmp_path / 'out.pth', weights_only=True)
    assert converted['meta']['dataset_meta']['classes'] == ('a', 'b') and src.read_bytes() == before


def test_convert_writes_atomically(tmp_path, monkeypatch):
    """A write killed half-way leaves the previous output (or none) and no partial file."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        'convert_checkpoint', Path(__file__).resolve().parents[1] / 'tools' / 'convert_checkpoint.py'
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src, dst = tmp_path / 'official.pth', tmp_path / 'out.pth'
    _official_like(src)
    dst.write_bytes(b'previous output')

    def killed(obj, f, *args, **kwargs):  # torch.save killed half-way, to a path or a file object
        if isinstance(f, (str, Path)):
            with open(f, 'wb') as out:
                out.write(b'partial')
        else:
            f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', killed)
    with pytest.raises(KeyboardInterrupt):
        tool.convert(str(src), str(dst))
    assert dst.read_bytes() == b'previous output'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['official.pth', 'out.pth']


def test_convert_says_what_a_file_is_not_instead_of_suggesting_trust(tmp_path):
    text, noise, truncated = tmp_path / 'notes.txt', tmp_path / 'noise.pth', tmp_path / 'truncated.pth'
    text.write_text('these are not weights\n')
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated.write_bytes(_official_like(tmp_path / 'official.pth')[:300])
    for path, needle in (
        (text, 'is not a PyTorch checkpoint'),
        (noise, 'is not a PyTorch checkpoint'),
        (truncated, 'truncated or corrupt'),
    ):
        for trust in ((), ('--trust',)):
            proc = _convert(path, tmp_path / 'out.pth', *trust)
            assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
            assert 'rerun with --trust' not in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr

    pickled = tmp_path / 'pickled.pth'
    torch.save({'state_dict': {}, 'meta': NotAllowListed()}, pickled)
    proc = _convert(pickled, tmp_path / 'out.pth')
    assert proc.returncode != 0 and 'rerun with --trust' in proc.stderr, proc.stderr
