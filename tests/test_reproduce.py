"""tools/reproduce.py and mmdet_lrpq.reproduce: the paper's reference data, the offline miniature-world
run, resume, and the errors.

The grid runs through the real tools (tools/lrp_plan.py, tools/test.py) on a few miniature-world val
images; COCO paths are exercised up to the point where real checkpoints would be needed.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmdet_lrpq.reproduce import checkpoints, processes, tables
from mmdet_lrpq.reproduce.common import UserError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'reproduce.py'
PAPER = REPO / 'configs' / 'paper_results.json'

# The paper's reference table: configs/paper_results.json must carry every one of these cells.
DESIGN_TABLE = """
| model | FP32 | RepQ-ViT W4A4 | LRP-QViT MP4 | best uniform W4A4 (APHQ-ViT) | RepQ-ViT W6A6 | LRP-QViT MP6 |
|---|---|---|---|---|---|---|
| Mask R-CNN Swin-T | 46.0 / 41.6 | 36.1 / 36.0 | 37.9 / 38.2 | 38.9 / 38.1 | 45.1 / 41.2 | 45.6 / 41.3 |
| Mask R-CNN Swin-S | 48.5 / 43.3 | 44.2 / 40.2 (re-runs: 42.7 / 40.0) | 46.4 / 41.4 | 44.1 / 41.0 | 47.8 / 43.0 | 48.1 / 43.0 |
| Cascade Swin-T | 50.4 / 43.7 | 47.0 / 41.4 | 47.7 / 41.6 | 48.9 / 42.7 | 50.0 / 43.5 | 49.9 / 43.5 |
| Cascade Swin-S | 51.9 / 45.0 | 49.3 / 43.1 | 50.1 / 43.6 | 50.3 / 43.7 | 51.4 / 44.6 | 51.4 / 44.6 |
"""


def reproduce(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def coco_cell(coco_root, out_dir, setting, checkpoint, *more):
    """tools/reproduce.py on ``coco_root`` for the one cell Mask R-CNN Swin-T ``setting``."""
    return reproduce(
        '--coco-root',
        coco_root,
        '--detectors',
        'mask_rcnn',
        '--backbones',
        'swin_t',
        '--settings',
        setting,
        '--checkpoint',
        f'mask_rcnn_swin_t={checkpoint}',
        '--out-dir',
        out_dir,
        *more,
    )


def mmdet_checkpoint(path):
    """A file with mmdet-3.x Swin backbone keys: all that is read of a checkpoint before its cell runs."""
    import torch

    torch.save({'state_dict': {'backbone.stages.0.x': torch.zeros(1)}}, path)
    return path


# ----------------------------------------------------------------------------- the paper's numbers as data
def test_paper_results_hold_every_design_cell():
    paper = json.loads(PAPER.read_text())
    lines = [ln for ln in DESIGN_TABLE.strip().splitlines() if not ln.startswith('|---')]
    header = [c.strip() for c in lines[0].strip('|').split('|')][1:]
    by_label = {c['label']: c['key'] for c in paper['columns']}
    assert sorted(by_label) == sorted(header)
    labels = {m['label'].replace('Cascade Mask R-CNN', 'Cascade'): m for m in paper['models'].values()}
    seen = 0
    for line in lines[1:]:
        model, *cells = [c.strip() for c in line.strip('|').split('|')]
        for column, text in zip(header, cells):
            numbers = [float(x) for x in re.findall(r'\d+\.\d', text)]
            ref = labels[model]['results'][by_label[column]]
            assert [ref['box'], ref['mask']] == numbers[:2], (model, column)
            if len(numbers) > 2:  # the RepQ-ViT Swin-S re-run note
                assert [ref['reruns']['box'], ref['reruns']['mask']] == numbers[2:] and ref['reruns']['note']
            seen += 1
    assert seen == 24
    arxiv = {k: s.get('arxiv') for k, s in paper['sources'].items()}
    assert arxiv['lrp_qvit'] == '2401.11243' and arxiv['repq_vit'] == '2212.08254'
    assert 'CVPR 2025' in paper['sources']['aphq_vit']['venue'] and 'ICCV 2023' in paper['sources']['repq_vit']['venue']
    assert {c['timm'] for c in paper['classifiers'].values()} == {
        'swin_tiny_patch4_window7_224',
        'swin_small_patch4_window7_224',
    }


def test_paper_checkpoints_are_recorded_honestly():
    """Every model has an official URL; a hash is a full sha256, OpenMMLab's 8-digit file-name prefix, or null."""
    paper = json.loads(PAPER.read_text())
    assert set(paper['checkpoints']) == set(paper['models'])
    for model, entries in paper['checkpoints'].items():
        assert sum(e['default'] for e in entries) == 1 and entries[0]['source'] == 'official', model
        for e in entries:
            assert e['url'].startswith('https://') and e['url'].endswith('/' + e['file'])
            assert e['sha256'] is None or re.fullmatch(r'[0-9a-f]{64}', e['sha256'])
            if e['sha256_prefix'] is not None:  # OpenMMLab's publish_model: <name>-<sha256[:8]>.pth
                assert e['file'].endswith(f'-{e["sha256_prefix"]}.pth')
            assert e['layout'] in ('original', 'mmdet')


def test_print_paper_names_every_config_with_its_expected_numbers():
    proc = reproduce('--print-paper')
    assert proc.returncode == 0, proc.stderr
    configs = re.findall(r'`(configs/[^`]+\.py)`', proc.stdout)
    assert len(configs) == 20 and all((REPO / c).is_file() for c in configs)
    assert '| `configs/mask_rcnn_swin_s_w4a4.py` | 44.2 / 40.2 (re-runs: 42.7 / 40.0) |' in proc.stdout
    assert '| `configs/cascade_mask_rcnn_swin_t_mp4.py` | 47.7 / 41.6 |' in proc.stdout


# ----------------------------------------------------------------------------- checkpoint checks
def test_checkpoint_layout_and_verification(tmp_path):
    import torch

    original, mmdet = tmp_path / 'a.pth', tmp_path / 'b.pth'
    torch.save({'state_dict': {'backbone.layers.0.blocks.0.attn.qkv.weight': torch.zeros(2)}}, original)
    torch.save({'state_dict': {'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight': torch.zeros(2)}}, mmdet)
    torch.save(
        {'backbone.layers.0.downsample.reduction.weight': torch.zeros(2)},
        tmp_path / 'legacy.pth',
        _use_new_zipfile_serialization=False,
    )
    assert checkpoints.checkpoint_layout(str(original)) == 'original'
    assert checkpoints.checkpoint_layout(str(mmdet)) == 'mmdet'
    assert checkpoints.checkpoint_layout(str(tmp_path / 'legacy.pth')) == 'original'
    entry = {'file': 'x.pth', 'url': 'https://example/x.pth', 'sha256': None, 'sha256_prefix': 'abcdef12'}
    assert 'verified' in checkpoints.verify('x.pth', 'abcdef12' + '0' * 56, entry)
    with pytest.raises(UserError, match='does not match the published abcdef12'):
        checkpoints.verify('x.pth', '0' * 64, entry)
    assert 'not verifiable' in checkpoints.verify('x.pth', '0' * 64, dict(entry, sha256_prefix=None))
    fetched = tmp_path / 'cache' / 'b.pth'  # the download path, offline: a file:// URL
    checkpoints.download(mmdet.as_uri(), str(fetched), log=lambda msg: None)
    assert fetched.read_bytes() == mmdet.read_bytes() and not (tmp_path / 'cache' / 'b.pth.part').exists()
    with pytest.raises(UserError, match='download it yourself and pass --checkpoint'):
        checkpoints.download(
            (tmp_path / 'missing.pth').as_uri(), str(tmp_path / 'cache' / 'c.pth'), log=lambda msg: None
        )


def test_official_layout_is_converted_once(tmp_path, fake_coco):
    """A checkpoint with Microsoft's Swin keys goes through tools/convert_checkpoint.py first (dry run)."""
    import torch

    ckpt = tmp_path / 'mask_rcnn_swin_tiny_patch4_window7.pth'
    torch.save({'state_dict': {'backbone.layers.0.blocks.0.attn.qkv.weight': torch.zeros(2)}}, ckpt)
    proc = coco_cell(fake_coco, tmp_path / 'o', 'FP', ckpt, '--cache-dir', tmp_path / 'cache', '--dry-run')
    assert proc.returncode == 0, proc.stderr
    assert 'no hash is published for mask_rcnn_swin_tiny_patch4_window7.pth: not verifiable' in proc.stdout
    converted = re.search(r'tools/convert_checkpoint.py \S+ (\S+)\.part', proc.stdout).group(1)
    assert converted.startswith(str(tmp_path / 'cache' / 'converted' / 'mask_rcnn_swin_tiny_patch4_window7.mmdet3-'))
    assert f'tools/test.py configs/_base_/mask_rcnn_swin_t.py {converted} ' in proc.stdout


# ----------------------------------------------------------------------------- clear errors, no tracebacks
@pytest.fixture
def fake_coco(tmp_path):
    """A COCO-shaped folder (no images): enough for the checks that run before any evaluation."""
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    for split in ('val2017', 'train2017'):
        (root / split).mkdir()
        (root / 'annotations' / f'instances_{split}.json').write_text('{"images": [], "annotations": []}')
    return root


def _error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert 'Traceback' not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_errors_name_the_option_and_the_fix(tmp_path, fake_coco):
    _error(reproduce('--settings', 'FP'), '--coco-root is required', '--miniworld')
    _error(reproduce('--coco-root', tmp_path / 'nowhere', '--settings', 'FP'), f'--coco-root {tmp_path / "nowhere"}')
    (fake_coco / 'train2017').rmdir()
    _error(reproduce('--coco-root', fake_coco, '--settings', 'W4A4'), 'missing train2017', 'calibrate')
    (fake_coco / 'train2017').mkdir()
    _error(
        reproduce('--coco-root', fake_coco, '--detectors', 'mask_rcnn', '--backbones', 'swin_t', '--settings', 'FP'),
        'no checkpoint for mask_rcnn_swin_t',
        '--checkpoint mask_rcnn_swin_t=PATH',
        '--download',
        'https://github.com/SwinTransformer/storage/releases/download/v1.0.2/mask_rcnn_swin_tiny_patch4_window7.pth',
    )
    gone = tmp_path / 'gone.pth'
    _error(
        reproduce('--miniworld', '--out-dir', tmp_path / 'o', '--checkpoint', f'mask_rcnn_swin_mini={gone}'),
        f'--checkpoint mask_rcnn_swin_mini={gone}: file not found',
    )
    _error(reproduce('--miniworld', '--checkpoint', 'mask_rcnn_swin_t=x.pth'), 'unknown name', 'mask_rcnn_swin_mini')
    # a copy named like a recorded OpenMMLab file is checked against the hash in its name
    fake = mmdet_checkpoint(tmp_path / 'mask_rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_20210906_131725-bacf6f7b.pth')
    _error(coco_cell(fake_coco, tmp_path / 'o', 'FP', fake), 'does not match the published bacf6f7b')
    _error(
        coco_cell(fake_coco, tmp_path / 'o', 'MP4', mmdet_checkpoint(tmp_path / 'mine.pth')),
        'no weights were given for swin_t',
        '--classifier swin_t=PATH (swin_tiny_patch4_window7_224 weights)',
        '--pretrained',
        '--imagenet DIR',
        '--plans-dir configs/plans --reuse-plans',
    )


def test_placeholder_plans_run_only_marked(tmp_path, fake_coco):
    """The shipped random-weight plans may be used, with a loud warning; --dry-run shows the command."""
    ckpt = mmdet_checkpoint(tmp_path / 'mine.pth')
    proc = coco_cell(
        fake_coco, tmp_path / 'o', 'MP4', ckpt, '--plans-dir', REPO / 'configs' / 'plans', '--reuse-plans', '--dry-run'
    )
    assert proc.returncode == 0, proc.stderr
    assert 'RANDOM classifier weights' in proc.stdout and 'NOT a reproduction' in proc.stdout
    assert 'tools/test.py configs/mask_rcnn_swin_t_mp4.py' in proc.stdout
    assert 'custom_hooks.0.plan=configs/plans/swin_t_mp4.json' in proc.stdout
    assert 'dry run: 1 cells would run' in proc.stdout


# ----------------------------------------------------------------------------- the miniature world, end to end
def _summary(stdout: str) -> tuple[int, int, int]:
    ran, reused, failed = re.search(r'cells: (\d+) ran, (\d+) reused, (\d+) failed', stdout).groups()
    return int(ran), int(reused), int(failed)


def test_miniworld_grid_table_and_resume(tmp_path):
    """FP and MP4 of the tiny Mask R-CNN on 4 val images: a real table, then resume and a plan change."""
    out = tmp_path / 'run'
    args = (
        '--miniworld',
        '--detectors',
        'mask_rcnn',
        '--settings',
        'FP',
        'MP4',
        '--val-images',
        '4',
        '--lrp-images',
        '8',
        '--out-dir',
        out,
    )
    first = reproduce(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _summary(first.stdout) == (2, 0, 0)
    rows = {r['setting']: r for r in json.loads((out / 'results.json').read_text())['rows']}
    assert list(rows) == ['FP', 'MP4']
    assert rows['FP']['box_ap'] > 0 and rows['FP']['mask_ap'] > 0 and rows['MP4']['box_ap'] > 0
    assert rows['FP']['avg_w_bits'] == 32.0 and rows['MP4']['avg_w_bits'] <= 4.0  # the plan's budget
    assert rows['MP4']['plan']['weights'] == 'checkpoint' and not rows['MP4']['plan']['placeholder']
    assert all(r['paper'] is None for r in rows.values())  # no paper column for the miniature world
    for setting, r in rows.items():  # the printed table carries the recorded numbers
        assert re.search(
            rf'\| Mask R-CNN Swin-mini \| {setting} \| {r["box_ap"]:.1f} \| {r["mask_ap"]:.1f} \|', first.stdout
        ), setting
    assert 'evaluated on the first 4 val images only' in first.stdout
    assert (out / 'results.md').read_text().count('| Mask R-CNN Swin-mini |') == 2
    assert (out / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    records = {p.name: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')}
    assert len(records) == 2

    second = reproduce(*args)  # the plan is made again (from lrp_plan.py's score cache): same content
    assert second.returncode == 0, second.stderr[-3000:]
    assert _summary(second.stdout) == (0, 2, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'cells').glob('*.json')} == records

    plan_file = out / 'plans' / 'swin_mini_mp4.json'
    plan = json.loads(plan_file.read_text())
    site = next(k for k, v in plan['bits'].items() if not k.startswith('re:') and v[0] > 3)
    plan['bits'][site] = [v - 1 for v in plan['bits'][site]]  # fewer bits: still within the budget
    plan_file.write_text(json.dumps(plan, indent=1))
    third = reproduce(*args, '--reuse-plans')
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert _summary(third.stdout) == (1, 1, 0)
    assert 'run mask_rcnn_swin_mini_mp4 (changed: plan)' in third.stdout
    rerun = json.loads((out / 'cells' / 'mask_rcnn_swin_mini_mp4.json').read_text())
    assert rerun['plan']['sha256'] != rows['MP4']['plan']['sha256']

    # the uniform settings go through the quant config with RepQ's options, as configs/*_w4a4.py say
    dry = reproduce(*args[:4], 'W4A4', *args[6:], '--dry-run')
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert (
        'tools/test.py configs/miniworld/mask_rcnn_swin_mini_quant.py checkpoints/miniworld/mask_rcnn_swin_mini.pth'
        in dry.stdout
    )
    assert 'custom_hooks.0.w_bits=4 custom_hooks.0.a_bits=4 custom_hooks.0.method=repq' in dry.stdout
    assert 'dry run: 1 cells would run, 0 are finished' in dry.stdout


def test_coco_table_sets_ours_beside_the_paper(tmp_path):
    """Differences to the published cell, the re-run and APHQ-ViT notes, and † placeholder rows without one."""
    paper = json.loads(PAPER.read_text())
    model = dict(detector='mask_rcnn', backbone='swin_s', model='mask_rcnn_swin_s', scope='detector')
    rows = [
        dict(model, setting='W4A4', box_ap=42.0, mask_ap=40.1, avg_w_bits=4.0, avg_a_bits=4.0, plan=None),
        dict(
            model,
            setting='MP4',
            box_ap=40.0,
            mask_ap=39.0,
            avg_w_bits=3.99,
            avg_a_bits=4.07,
            plan={'placeholder': True},
        ),
    ]
    table = tables.markdown(rows, paper, val_images=None)
    assert (
        '| Mask R-CNN Swin-S | W4A4 | 42.0 | 44.2 | -2.2 | 40.1 | 40.2 | -0.1 | 4.00 / 4.00 | '
        'RepQ-ViT W4A4 (arXiv 2212.08254) |'
    ) in table
    assert '| Mask R-CNN Swin-S | MP4 † | 40.0 | 46.4 | — | 39.0 | 41.4 | — |' in table
    assert '42.7 / 40.0' in table and 'APHQ-ViT, CVPR 2025): 44.1 / 41.0' in table
    assert 'not a reproduction of the paper' in table and 'quantization scope: detector' in table
    tables.plot(rows, paper, str(tmp_path / 'p.png'))
    assert (tmp_path / 'p.png').read_bytes()[:4] == b'\x89PNG'


# ----------------------------------------------------------------------------- many GPUs
def test_cells_spread_over_gpus_one_gpu_per_process(monkeypatch):
    """20 cells, 8 fake GPUs, 8 jobs: every process sees exactly one GPU, no GPU runs two cells at
    once, and every GPU is used; more jobs than GPUs share them round-robin."""
    import threading
    import time as _time

    running: dict[str, int] = {}
    seen: list[str] = []
    overlap: list[str] = []
    lock = threading.Lock()

    def fake_execute(job, threads, gpu):
        with lock:
            seen.append(gpu)
            running[gpu] = running.get(gpu, 0) + 1
            if running[gpu] > 1:
                overlap.append(gpu)
        _time.sleep(0.02)
        with lock:
            running[gpu] -= 1
        return {'box_ap': 1.0, 'mask_ap': 1.0, 'seconds': 0.0, 'gpu': gpu}

    class Cell:
        def __init__(self, i):
            self.name = f'cell{i}'

    class Job:
        def __init__(self, i):
            self.cell, self.command = Cell(i), ['true']

    monkeypatch.setattr(processes, 'execute', fake_execute)
    rows: dict = {}
    gpus = [str(i) for i in range(8)]
    processes.run_cells([(Job(i), 'not run yet') for i in range(20)], 8, rows, lambda msg: None, gpus)
    assert len(rows) == 20 and not overlap
    assert sorted(set(seen)) == gpus and all(g is not None and ',' not in g for g in seen)
    assert processes.gpu_slots(['0', '1'], 5) == ['0', '1', '0', '1', '0']
    assert processes.gpu_slots([], 3) == [None, None, None]
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,5')
    assert processes.visible_gpus() == ['3', '5']
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    assert processes.visible_gpus() == []


def test_execute_pins_the_cell_process_to_its_gpu(monkeypatch, tmp_path):
    seen = {}

    def fake_run_tool(cmd, log_path=None, env=None):
        seen['env'] = env
        open(log_path, 'w').close()
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(processes, 'run_tool', fake_run_tool)

    class Job:
        work_dir, command = str(tmp_path), ['true']

    with pytest.raises(RuntimeError):
        processes.execute(Job(), None, '6')
    assert seen['env']['CUDA_VISIBLE_DEVICES'] == '6'


def test_a_dry_run_writes_nothing(tmp_path, fake_coco):
    """--dry-run prints what a run would do, and writes nothing: no <out-dir>/digests.json, no evaluation subset."""
    ckpt = mmdet_checkpoint(tmp_path / 'mine.pth')
    out = tmp_path / 'o'
    proc = coco_cell(
        fake_coco,
        out,
        'MP4',
        ckpt,
        '--plans-dir',
        REPO / 'configs' / 'plans',
        '--reuse-plans',
        '--val-images',
        '2',
        '--dry-run',
    )
    assert proc.returncode == 0, proc.stderr
    assert 'dry run: 1 cells would run' in proc.stdout
    assert not out.exists(), sorted(str(p.relative_to(out)) for p in out.rglob('*'))
