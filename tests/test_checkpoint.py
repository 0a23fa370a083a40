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
        'meta': {'epoch': 2, 'iter': 3, 'seed': np.int64(7), 'mmengine_version': '0.10.7',
                 'dataset_meta': {'classes': ('circle', 'square'), 'palette': [(1, 2, 3)]}},
        'state_dict': {'backbone.weight': torch.arange(6.).reshape(2, 3), 'head.bias': torch.ones(2)},
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
    code = textwrap.dedent(f'''
        import torch, mmengine, mmdet_lrpq
        from mmengine.runner.checkpoint import _load_checkpoint
        ck = _load_checkpoint({str(path)!r}, map_location='cpu')   # torch.load, weights_only default
        assert ck['meta']['seed'] == 7 and ck['meta']['dataset_meta']['classes'] == ('circle', 'square')
        assert torch.equal(ck['state_dict']['backbone.weight'], torch.arange(6.).reshape(2, 3))
        buf = ck['message_hub']['log_scalars']['train/loss']
        assert abs(buf.mean() - (1 + 1/2 + 1/3) / 3) < 1e-12 and buf.current() == 1/3
        print('ok')
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('ok')


def test_allow_list_refuses_other_getattr(tmp_path):
    """The allow-listed getattr resolves HistoryBuffer statistics only, nothing else."""
    import mmdet_lrpq.safe_load as ckpt
    from mmengine.logging.history_buffer import HistoryBuffer
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
