"""The installed stack: mmcv's compiled ops, the import boundaries of docs/architecture.md, the install's
CPU-or-CUDA decision (tools/cuda_build_plan.py) and the stack check (mmdet_lrpq/env.py)."""

import ast
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from mmdet_lrpq import env as stack_env

REPO = Path(__file__).resolve().parents[1]
PURE_PACKAGES = ('quant', 'lrp', 'plan')


def test_mmcv_roi_align_matches_torchvision():
    from mmcv.ops import RoIAlign

    torch.manual_seed(0)
    feats = torch.randn(2, 8, 40, 56)
    boxes = torch.rand(30, 4) * torch.tensor([100.0, 70.0, 100.0, 70.0])
    boxes[:, 2:] += boxes[:, :2] + 1
    rois = torch.cat([torch.randint(0, 2, (30, 1)).float(), boxes], dim=1)
    ours = RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)(feats, rois)
    ref = torchvision.ops.roi_align(feats, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert ours.shape == (30, 8, 7, 7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.abs().sum() > 0


def test_mmcv_nms_matches_torchvision():
    from mmcv.ops import nms

    torch.manual_seed(1)
    xy = torch.rand(200, 2) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2) * 30], dim=1)
    scores = torch.rand(200)
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    ref = torchvision.ops.nms(boxes, scores, 0.5)
    assert 0 < len(keep) < 200
    assert keep.tolist() == ref.tolist()
    torch.testing.assert_close(dets[:, 4], scores[ref])


@pytest.mark.parametrize('package', PURE_PACKAGES)
def test_pure_packages_do_not_import_mmdet_or_mmcv(package):
    """quant/, lrp/, plan/ stay importable and testable without MMDetection (docs/architecture.md)."""
    offenders = []
    for path in sorted((REPO / 'mmdet_lrpq' / package).rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or '']
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f'{path.name}: {n}'
                for n in names
                if n.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')
                or (isinstance(node, ast.ImportFrom) and node.level and n.split('.')[0] in ('models', 'engine'))
            ]
    assert not offenders, offenders
    code = (
        f'import sys, mmdet_lrpq.{package}; '
        f'bad = [m for m in ("mmdet", "mmcv", "mmengine") if m in sys.modules]; '
        f'assert not bad, bad'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


# ------------------------------------------------------------------ tools/cuda_build_plan.py
# The install's CPU-or-CUDA decision, exercised with fake CUDA toolkits (a shell script printing
# `nvcc --version`) and explicit --torch-cuda / --gpus, so it runs the same with or without a GPU.
PLANNER = REPO / 'tools' / 'cuda_build_plan.py'
NVCC_VERSION = (
    'nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n'
    'Cuda compilation tools, release {v}, V{v}.88\nBuild cuda_{v}.r{v}/compiler.0_0\n'
)


def fake_toolkit(root: Path, version: str, *, complete: bool = True, archs: str = '') -> Path:
    """root/bin/nvcc printing `nvcc --version` of ``version`` (its TOP in a dry run, and ``archs``
    such as 'compute_75 compute_90' for --list-gpu-arch, if given)."""
    (root / 'bin').mkdir(parents=True)
    nvcc = root / 'bin' / 'nvcc'
    list_archs = f'  --list-gpu-arch) echo "{archs}"; exit 0;;\n' if archs else ''
    nvcc.write_text(
        '#!/bin/sh\n'
        f'case "$1" in\n  -dryrun) echo "#\\$ TOP={root}/bin/.."; exit 0;;\n{list_archs}esac\n'
        f"cat <<'TXT'\n{NVCC_VERSION.format(v=version)}TXT\n"
    )
    nvcc.chmod(0o755)
    if complete:
        (root / 'include').mkdir()
        (root / 'include' / 'cuda_runtime_api.h').write_text('')
        (root / 'lib64').mkdir()
        (root / 'lib64' / 'libcudart.so').write_text('')
    return root


def plan_env(**extra) -> dict:
    """A clean environment: no CUDA variables, PATH without any real nvcc."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('CUDA_HOME', 'CUDA_PATH', 'MMDET_LRPQ_CUDA', 'TORCH_CUDA_ARCH_LIST')
    }
    env['PATH'] = '/usr/bin:/bin'
    env.update(extra)
    return env


def run_plan(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PLANNER), *args], env=env, capture_output=True, text=True, timeout=120)


def parse_plan(out: str) -> dict:
    plan = dict(line.split('=', 1) for line in out.splitlines() if '=' in line)
    assert set(plan) == {
        'ops',
        'reason',
        'torch_cuda',
        'nvcc',
        'nvcc_cuda',
        'cuda_home',
        'gpus',
        'arch_list',
        'cache_key',
    }, out
    return plan


@pytest.fixture(scope='module')
def planner():
    spec = importlib.util.spec_from_file_location('cuda_build_plan', PLANNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules['cuda_build_plan'] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop('cuda_build_plan', None)


def test_plan_nvcc_version_mismatch_builds_cpu_ops(tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-12.8', '12.8')
    res = run_plan(plan_env(PATH=f'{cuda}/bin:/usr/bin:/bin'), '--torch-cuda', '13.0', '--gpus', 'NVIDIA H200=9.0')
    assert res.returncode == 0, res.stderr
    plan = parse_plan(res.stdout)
    assert plan['ops'] == 'cpu' and plan['cache_key'] == 'cpu'
    assert plan['nvcc'] == str(cuda / 'bin' / 'nvcc') and plan['nvcc_cuda'] == '12.8'
    assert plan['reason'].startswith(f'nvcc 12.8 ({cuda}/bin/nvcc) != torch CUDA 13.0: building CPU ops')
    assert 'only run on CPU tensors' in plan['reason']  # a GPU is there: say what the CPU build costs


def test_plan_forced_cuda_with_arch_list_builds_cuda_ops_under_its_own_key(tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-13.0', '13.0')
    env = plan_env(PATH=f'{cuda}/bin:/usr/bin:/bin', MMDET_LRPQ_CUDA='1', TORCH_CUDA_ARCH_LIST='9.0')
    res = run_plan(env, '--torch-cuda', '13.0', '--gpus', 'none')
    assert res.returncode == 0, res.stderr
    plan = parse_plan(res.stdout)
    assert plan['ops'] == 'cuda'
    assert plan['arch_list'] == '9.0' and plan['cache_key'] == 'cu130-sm90'
    assert plan['cuda_home'] == str(cuda)
    assert plan['reason'] == (
        'nvcc 13.0 matches torch CUDA 13.0, MMDET_LRPQ_CUDA=1: building CUDA ops for 9.0 (from TORCH_CUDA_ARCH_LIST)'
    )
    # several architectures: one key whatever their order or separator
    env['TORCH_CUDA_ARCH_LIST'] = '9.0 8.6+PTX'
    plan = parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', 'none').stdout)
    assert plan['arch_list'] == '8.6+PTX;9.0' and plan['cache_key'] == 'cu130-sm86+ptx-sm90'


def test_plan_matching_nvcc_without_gpu_or_variable_builds_cpu_ops(tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-13.0', '13.0')
    res = run_plan(plan_env(PATH=f'{cuda}/bin:/usr/bin:/bin'), '--torch-cuda', '13.0', '--gpus', 'none')
    assert res.returncode == 0, res.stderr
    plan = parse_plan(res.stdout)
    assert plan['ops'] == 'cpu' and plan['cache_key'] == 'cpu'
    assert plan['reason'] == (
        'nvcc 13.0 matches torch CUDA 13.0 but no GPU is visible (set MMDET_LRPQ_CUDA=1 '
        'and TORCH_CUDA_ARCH_LIST to build CUDA ops anyway): building CPU ops'
    )


def test_plan_matching_nvcc_and_gpu_builds_cuda_ops_for_that_gpu(tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-13.0', '13.0')
    env = plan_env(CUDA_HOME=str(cuda))  # CUDA_HOME wins over PATH, as in torch's extension builder
    plan = parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', 'NVIDIA H200=9.0,NVIDIA L4=8.9').stdout)
    assert plan['ops'] == 'cuda' and plan['arch_list'] == '8.9;9.0' and plan['cache_key'] == 'cu130-sm89-sm90'
    assert plan['reason'] == (
        'nvcc 13.0 matches torch CUDA 13.0, a GPU is visible (NVIDIA H200 (9.0); NVIDIA L4 '
        '(8.9)): building CUDA ops for 8.9;9.0 (from the visible GPUs)'
    )
    env['TORCH_CUDA_ARCH_LIST'] = '9.0'  # the user's list overrides the detected one
    assert parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', '9.0,8.9').stdout)['cache_key'] == 'cu130-sm90'
    env['MMDET_LRPQ_CUDA'] = '0'  # and CUDA can be refused
    plan = parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', '9.0').stdout)
    assert plan['ops'] == 'cpu' and plan['reason'].startswith('MMDET_LRPQ_CUDA=0: building CPU ops')


@pytest.mark.parametrize('case', ['no nvcc', 'mismatch', 'no arch', 'cpu torch', 'bad arch'])
def test_plan_forced_cuda_that_cannot_be_met_is_a_clear_error(tmp_path, case):
    cuda = fake_toolkit(tmp_path / 'cuda', '12.8' if case == 'mismatch' else '13.0')
    env = plan_env(MMDET_LRPQ_CUDA='1', TORCH_CUDA_ARCH_LIST='9.0', PATH=f'{cuda}/bin:/usr/bin:/bin')
    args = ['--torch-cuda', '13.0', '--gpus', 'none']
    if case == 'no nvcc':
        (tmp_path / 'empty').mkdir()
        env.update(CUDA_HOME=str(tmp_path / 'empty'))
        expected = f'error: MMDET_LRPQ_CUDA=1, but CUDA_HOME={tmp_path / "empty"} has no bin/nvcc: install the CUDA toolkit 13.0'
    elif case == 'mismatch':
        expected = f'error: MMDET_LRPQ_CUDA=1, but nvcc 12.8 ({cuda}/bin/nvcc) != torch CUDA 13.0'
    elif case == 'no arch':
        del env['TORCH_CUDA_ARCH_LIST']
        expected = 'error: MMDET_LRPQ_CUDA=1 and nvcc 13.0 matches torch CUDA 13.0, but no GPU is visible'
    elif case == 'cpu torch':
        args[1] = 'none'
        expected = 'error: MMDET_LRPQ_CUDA=1, but torch given is a CPU-only build'
    else:
        env['TORCH_CUDA_ARCH_LIST'] = 'sm_90'
        expected = "error: TORCH_CUDA_ARCH_LIST='sm_90' is not a list of compute capabilities"
    res = run_plan(env, *args)
    assert res.returncode == 2 and res.stdout == ''
    assert res.stderr.startswith(expected), res.stderr
    if case in ('no arch', 'bad arch'):
        assert 'TORCH_CUDA_ARCH_LIST=9.0 for H100/H200' in res.stderr


def test_plan_without_any_nvcc(planner, monkeypatch, tmp_path):
    monkeypatch.setattr(planner, 'DEFAULT_CUDA_HOME', str(tmp_path / 'no-cuda'))
    facts = planner.collect(plan_env(), torch_cuda='13.0', gpus='9.0')
    plan = planner.decide(facts)
    assert plan['ops'] == 'cpu' and plan['nvcc'] == ''
    assert plan['reason'].startswith(
        f'no nvcc found (CUDA_HOME/CUDA_PATH unset, none on PATH, none in '
        f'{tmp_path / "no-cuda"}); a GPU is visible (GPU 0 (9.0)): building CPU ops'
    )
    with pytest.raises(planner.PlanError, match='MMDET_LRPQ_CUDA=1, but no nvcc found'):
        planner.decide(planner.collect(plan_env(MMDET_LRPQ_CUDA='1'), torch_cuda='13.0', gpus='9.0'))


def test_plan_finds_the_toolkit_behind_a_wrapper_and_checks_it_is_complete(planner, tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-13.0', '13.0')
    (tmp_path / 'bin').mkdir()
    wrapper = tmp_path / 'bin' / 'nvcc'  # like /usr/local/bin/nvcc exec-ing the real one
    wrapper.write_text(f'#!/bin/sh\nexec {cuda}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    facts = planner.collect(plan_env(PATH=f'{tmp_path}/bin:/usr/bin:/bin'), torch_cuda='13.0', gpus='9.0')
    assert facts.nvcc == str(wrapper) and facts.cuda_home == str(cuda) and facts.toolkit_problem == ''
    assert planner.decide(facts)['ops'] == 'cuda'

    partial = fake_toolkit(tmp_path / 'pip-cuda', '13.0')
    (partial / 'lib64' / 'libcudart.so').unlink()
    (partial / 'lib64' / 'libcudart.so.13').write_text('')
    facts = planner.collect(plan_env(CUDA_HOME=str(partial)), torch_cuda='13.0', gpus='9.0')
    assert planner.decide(facts)['ops'] == 'cpu'
    with pytest.raises(
        planner.PlanError,
        match=r'has no lib64/libcudart.so to link against \(it has .*libcudart.so.13: '
        r'link libcudart.so to it\)',
    ):
        planner.decide(
            planner.collect(plan_env(CUDA_HOME=str(partial), MMDET_LRPQ_CUDA='1'), torch_cuda='13.0', gpus='9.0')
        )


def test_plan_refuses_architectures_nvcc_cannot_compile(tmp_path):
    cuda = fake_toolkit(tmp_path / 'cuda-13.0', '13.0', archs='compute_75\ncompute_80\ncompute_90\ncompute_100')
    env = plan_env(CUDA_HOME=str(cuda))
    plan = parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', 'Tesla V100=7.0').stdout)
    assert plan['ops'] == 'cpu'
    assert plan['reason'].startswith(
        'nvcc 13.0 cannot compile for 7.0 (from the visible GPUs; it supports 7.5 8.0 9.0 10.0): building CPU ops'
    )
    env['TORCH_CUDA_ARCH_LIST'] = '7.0;9.0'  # asked for explicitly: an error, not a silent CPU build
    res = run_plan(env, '--torch-cuda', '13.0', '--gpus', '9.0')
    assert res.returncode == 2 and 'set TORCH_CUDA_ARCH_LIST to supported architectures' in res.stderr
    env['TORCH_CUDA_ARCH_LIST'] = '9.0a;10.0+PTX'
    plan = parse_plan(run_plan(env, '--torch-cuda', '13.0', '--gpus', '9.0').stdout)
    assert plan['ops'] == 'cuda' and plan['cache_key'] == 'cu130-sm90a-sm100+ptx'


def test_plan_reads_the_installed_torch_without_importing_it():
    """Without overrides the plan reads this torch's CUDA version from torch/version.py: on a machine
    without an NVIDIA device torch is never imported, so `make install`'s up-to-date check stays fast."""
    res = run_plan(plan_env(MMDET_LRPQ_CUDA='0'))
    assert res.returncode == 0, res.stderr
    assert parse_plan(res.stdout)['torch_cuda'] == (torch.version.cuda or '')
    code = (
        'import runpy, sys; sys.argv = [sys.argv[0], "--gpus", "none"]\n'
        f'try:\n    runpy.run_path({str(PLANNER)!r}, run_name="__main__")\nexcept SystemExit as e:\n    assert not e.code, e.code\n'
        'assert "torch" not in sys.modules'
    )
    subprocess.run([sys.executable, '-c', code], env=plan_env(), check=True, capture_output=True, timeout=120)


def test_install_script_parses():
    subprocess.run(['bash', '-n', str(REPO / 'tools' / 'install.sh')], check=True)


# ------------------------------------------------------------------------- mmdet_lrpq/env.py
GOOD = dict(
    python='3.11.7',
    platform='linux-x86_64',
    torch='2.14.1+cu130',
    torch_cuda='13.0',
    cuda_available=False,
    cuda_devices=[],
    torchvision='0.29.1',
    timm='1.0.31',
    mmengine='0.10.7',
    mmcv='2.1.0',
    mmcv_dist='mmcv',
    mmcv_ops=True,
    mmcv_ops_backend='compiled',
    mmcv_ops_cuda=None,
    mmcv_ops_compiler='GCC 12.2',
    mmcv_ops_error=None,
    mmdet='3.3.0',
)
LITE = dict(
    GOOD,
    mmcv_dist='mmcv-lite',
    mmcv_ops_backend='torchvision',
    mmcv_ops_reason='mmcv has no compiled ops (mmcv-lite)',
    mmcv_ops_compiler=None,
)


def stack_error(**changes) -> str:
    with pytest.raises(stack_env.OpenMMLabStackError) as info:
        stack_env.check_openmmlab_stack({**GOOD, **changes})
    assert isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)
    return str(info.value)


def test_env_module_imports_without_openmmlab_or_torch():
    code = (
        'import sys, mmdet_lrpq.env; bad = [m for m in ("mmdet", "mmcv", "mmengine", "torch") '
        'if m in sys.modules]; assert not bad, bad'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


def test_installed_stack_passes_the_check():
    report = stack_env.check_openmmlab_stack()
    assert report['mmcv_ops'] and report['mmcv_dist'] in ('mmcv', 'mmcv-lite')
    # mmcv-lite always runs on the torchvision backend; a compiled mmcv on its own ops unless forced
    forced = os.environ.get('MMDET_LRPQ_MMCV_OPS') == 'torchvision'
    assert report['mmcv_ops_backend'] == ('torchvision' if report['mmcv_dist'] == 'mmcv-lite' or forced else 'compiled')
    assert report['mmcv_ops_cuda'] in (None, torch.version.cuda)
    assert report['torch'] == torch.__version__ and report['torch_cuda'] == torch.version.cuda
    assert report['mmdet'].startswith('3.') and report['mmcv'].startswith('2.')
    assert bool(report['mmcv_ops_compiler']) == (report['mmcv_ops_backend'] == 'compiled')
    assert stack_env.check_openmmlab_stack() is report  # computed once per process
    assert 'mmcv' in stack_env.format_report(report)


def test_good_report_passes():
    assert stack_env.check_openmmlab_stack(dict(GOOD)) == GOOD


def test_mmcv_lite_on_the_torchvision_backend_passes_also_next_to_a_gpu():
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 'CPU-only ops' warning: the backend runs on CUDA too
        assert stack_env.check_openmmlab_stack(dict(LITE, cuda_available=True)) is not None
    assert 'torchvision backend' in stack_env.format_report(LITE)


@pytest.mark.parametrize(
    'changes, expected',
    [
        (
            dict(
                mmcv_dist='mmcv-lite',
                mmcv_ops=False,
                mmcv_ops_backend=None,
                mmcv_ops_error="ModuleNotFoundError: No module named 'mmcv._ext'",
            ),
            [
                'mmcv-lite 2.1.0 is installed, but no mmcv._ext loads',
                'MMDET_LRPQ_MMCV_OPS=compiled',
                'python -m _mmdet_lrpq_mmcv --install',
                'MMCV_WITH_OPS=1',
            ],
        ),
        (
            dict(mmcv_ops=False, mmcv_ops_error='ImportError: _ext.so: undefined symbol: _ZN3c10'),
            ['its ops were compiled against another torch than the installed torch 2.14.1+cu130'],
        ),
        (
            dict(mmcv='2.2.0'),
            [
                'mmcv 2.2.0 is installed, mmdet-lrpq needs mmcv >=2.0.0rc4,<2.2.0',
                'mmdet 3.x refuses mmcv >= 2.2.0',
                'pip install mmcv-lite==2.1.0',
                'mmcv 2.1.0 with compiled ops',
            ],
        ),
        (dict(mmcv='1.7.2', mmcv_dist='mmcv-full'), ['mmcv-full 1.7.2 is installed: that is the MMCV 1.x line']),
        (dict(mmdet='2.28.2'), ['mmdet 2.28.2 is installed: that is MMDetection 2', 'mmdet>=3.1.0,<3.4.0']),
        (dict(mmdet=None), ['mmdet is not installed', '--no-deps']),
        (
            dict(mmengine='0.9.1'),
            [
                'mmengine 0.9.1 is installed, mmdet-lrpq needs mmengine >=0.10.0,<1.0.0',
                'pip install "mmengine>=0.10.0,<1.0.0"',
            ],
        ),
        (
            dict(torch='2.0.1+cu118', torch_cuda='11.8'),
            ['torch 2.0.1+cu118 is installed, mmdet-lrpq needs torch >= 2.6'],
        ),
        (dict(torch='2.5.1'), ['torch 2.5.1 is installed, mmdet-lrpq needs torch >= 2.6']),
        (dict(timm='0.9.16'), ['timm 0.9.16 is installed, mmdet-lrpq needs timm >= 1.0.8']),
        (dict(python='3.9.18'), ['Python 3.9.18 is running, mmdet-lrpq needs Python >= 3.10']),
        (dict(mmcv=None, mmcv_dist=None, mmcv_ops=False), ['mmcv is not installed']),
        (
            dict(mmcv_ops_cuda='11.8'),
            ["mmcv 2.1.0's ops were compiled with CUDA 11.8, torch 2.14.1+cu130 uses CUDA 13.0"],
        ),
    ],
)
def test_stack_problems_name_package_version_range_and_fix(changes, expected):
    message = stack_error(**changes)
    for part in expected:
        assert part in message, message
    assert 'installed:\n' in message and 'docs/install.md' in message


def test_all_problems_are_reported_at_once():
    message = stack_error(mmdet='2.28.2', mmcv='1.7.2', mmcv_dist='mmcv-full', mmengine=None)
    assert message.count('\n  - ') == 3, message


def test_cpu_only_ops_next_to_a_gpu():
    gpu = dict(GOOD, cuda_available=True, cuda_devices=['NVIDIA H200 (9.0)'])
    with pytest.warns(RuntimeWarning, match='CPU-only ops but a GPU is visible'):
        stack_env.check_openmmlab_stack(gpu)
    with pytest.raises(stack_env.OpenMMLabStackError, match='has CPU-only ops, and CUDA ops were asked for'):
        stack_env.check_openmmlab_stack(dict(GOOD), require_cuda_ops=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        stack_env.check_openmmlab_stack(dict(gpu, mmcv_ops_cuda='13.0'), require_cuda_ops=True)


def test_stack_report_reads_versions_from_metadata(monkeypatch):
    """stack_report() with faked distribution versions and mmcv ops: the check names each problem."""
    versions = {
        'torch': '2.14.1',
        'torchvision': '0.29.1',
        'timm': '1.0.31',
        'mmengine': '0.10.7',
        'mmcv-lite': '2.2.0',
        'mmdet': '3.3.0',
    }
    monkeypatch.setattr(stack_env, '_installed_version', versions.get)
    monkeypatch.setattr(
        stack_env,
        '_mmcv_ops_info',
        lambda: dict(
            mmcv_ops=True,
            mmcv_ops_backend='torchvision',
            mmcv_ops_cuda=None,
            mmcv_ops_compiler=None,
            mmcv_ops_error=None,
        ),
    )
    report = stack_env.stack_report()
    assert (report['mmcv'], report['mmcv_dist'], report['mmcv_ops']) == ('2.2.0', 'mmcv-lite', True)
    assert report['timm'] == '1.0.31' and report['mmdet'] == '3.3.0'
    with pytest.raises(ImportError, match='mmcv 2.2.0 is installed, mmdet-lrpq needs mmcv >=2.0.0rc4,<2.2.0'):
        stack_env.check_openmmlab_stack(report)


def test_mmcv_source_tree_without_compiled_ops(tmp_path):
    """A fake mmcv package (no _ext) shadowing the installed one: the torchvision backend serves it,
    and says why; with MMDET_LRPQ_MMCV_OPS=compiled nothing does, and the check says what to do."""
    (tmp_path / 'mmcv').mkdir()
    (tmp_path / 'mmcv' / '__init__.py').write_text("__version__ = '2.1.0'\n")
    (tmp_path / 'mmcv' / 'version.py').write_text("__version__ = '2.1.0'\n")
    code = (
        'from mmdet_lrpq.env import stack_report, check_openmmlab_stack\n'
        'r = stack_report()\n'
        'print(r["mmcv_ops"], r["mmcv_ops_backend"], r["mmcv_ops_reason"])\n'
        'try:\n    check_openmmlab_stack(r)\nexcept ImportError as e:\n    print(e)\n'
    )
    env = {k: v for k, v in os.environ.items() if k != 'MMDET_LRPQ_MMCV_OPS'}
    env['PYTHONPATH'] = f'{tmp_path}{os.pathsep}{REPO}'
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == 'True torchvision mmcv has no compiled ops (mmcv-lite)'
    res = subprocess.run(
        [sys.executable, '-c', code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, 'MMDET_LRPQ_MMCV_OPS': 'compiled'},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == 'False None None'
    assert (
        "2.1.0 is installed, but no mmcv._ext loads (ModuleNotFoundError: No module named 'mmcv._ext')" in res.stdout
        and 'unset MMDET_LRPQ_MMCV_OPS' in res.stdout
    )  # 'mmcv' or 'mmcv-lite' 2.1.0


def test_parse_version_orders_pre_releases():
    v = stack_env.parse_version
    assert v('2.0.0rc4') < v('2.0.0') < v('2.1.0') < v('2.2.0') and v('2.14.1+cu130') == (2, 14, 1, 1, 0)
    assert v('2.0.0rc3') < v('2.0.0rc4') and v('0.10.7') > v('0.9.1') and v('3.3') == v('3.3.0')
