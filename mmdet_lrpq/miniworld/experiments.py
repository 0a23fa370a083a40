"""Quantization experiments on the miniature world, shared by ``make demo``, ``tools/reproduce.py``
and the benchmarks in ``bench/``.

It drives a checkout (the package installed editable from it): the data, checkpoints and configs
are the repository's, every evaluation is a real ``tools/test.py`` run in its own process (float
config, or the quant config with ``--cfg-options`` for bits/plan/method), read back from its
``metrics.json``, and every LRP plan a real ``tools/lrp_plan.py`` run on the miniature world's
classifier.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..cli import REPO  # the checkout, one definition for every command-line module

DATA = osp.join(REPO, 'data', 'miniworld')
CKPT = osp.join(REPO, 'checkpoints', 'miniworld')
CLASSIFIER = osp.join(CKPT, 'swin_mini_cls.pth')
DETECTORS = {
    'mask_rcnn': (
        'configs/miniworld/mask_rcnn_swin_mini.py',
        'configs/miniworld/mask_rcnn_swin_mini_quant.py',
        osp.join(CKPT, 'mask_rcnn_swin_mini.pth'),
    ),
    'cascade_mask_rcnn': (
        'configs/miniworld/cascade_mask_rcnn_swin_mini.py',
        'configs/miniworld/cascade_mask_rcnn_swin_mini_quant.py',
        osp.join(CKPT, 'cascade_mask_rcnn_swin_mini.pth'),
    ),
}


@dataclass
class Setting:
    """One row: float, uniform bits, or an LRP plan; with a reparameterization method."""

    name: str
    bits: int | None = None  # uniform W=A bits (None: float, or plan)
    plan_k: int | None = None  # MPk: the LRP plan at average k bits
    method: str = 'crl'
    allocator: str = 'lrp_qvit'
    extra: dict = field(default_factory=dict)  # further hook options (e.g. crl_k)

    @property
    def is_float(self) -> bool:
        return self.bits is None and self.plan_k is None

    @property
    def tag(self) -> str:
        """Unique name of the run (its work directory)."""
        if self.is_float:
            return self.name
        parts = [self.name, self.method] + ([self.allocator] if self.plan_k is not None else [])
        extra = [''.join(c for c in f'{k}{v}' if c.isalnum() or c in '._-') for k, v in sorted(self.extra.items())]
        return '_'.join(parts + extra).replace('.', 'p')


def calib_image_ids() -> list[int]:
    """COCO ids of the generated calib split's images (the hook's ``calib.image_ids`` choices)."""
    with open(osp.join(DATA, 'annotations', 'instances_calib.json')) as f:
        return [image['id'] for image in json.load(f)['images']]


def require_checkpoints(detectors=tuple(DETECTORS)) -> None:
    """Exit with a clear message if the classifier or a detector checkpoint is missing."""
    for path in (CLASSIFIER, *(DETECTORS[d][2] for d in detectors)):
        if not osp.isfile(path):
            sys.exit(
                f'{path} is missing; it is committed to the repository (or retrain with '
                f'python tools/miniworld/train_all.py)'
            )


def ensure_data(log=print) -> None:
    """Generate the evaluation, calibration and classification-val splits if they are missing."""
    needed = [osp.join(DATA, 'annotations', f'instances_{s}.json') for s in ('val', 'calib')] + [
        osp.join(DATA, 'cls_val')
    ]
    if all(osp.exists(p) for p in needed):
        log(f'data: {DATA} present')
        return
    log('data: generating the miniature world val / calib / cls_val splits (seeded, about a minute)')
    cmd = [
        sys.executable,
        osp.join(REPO, 'tools', 'miniworld', 'generate.py'),
        '--out',
        DATA,
        '--num-train',
        '0',
        '--num-cls-train',
        '0',
    ]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def make_plan(k: int, out_dir: str, allocator: str = 'lrp_qvit', num_images: int = 64, log=print) -> str:
    """The LRP plan at average k bits for the tiny Swin, computed on the miniature world's classifier."""
    out = osp.join(out_dir, f'swin_mini_mp{k}_{allocator}.json')
    cmd = [
        sys.executable,
        osp.join(REPO, 'tools', 'lrp_plan.py'),
        '--model',
        CLASSIFIER,
        '--checkpoint',
        CLASSIFIER,
        '--images',
        osp.join(DATA, 'cls_val'),
        '--num-images',
        str(num_images),
        '--target',
        f'mp{k}',
        '--allocator',
        allocator,
        '--out',
        out,
        '--scores-cache',
        osp.join(out_dir, 'swin_mini.scores.json'),
        '--no-progress',
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f'lrp_plan failed:\n{proc.stderr[-2000:]}')
    log(f'plan MP{k} ({allocator}): {proc.stdout.strip().splitlines()[-2]} [{time.time() - t0:.0f}s]')
    return out


def hook_options(setting: Setting, plans: dict) -> list[str]:
    opts = [f'custom_hooks.0.method={setting.method}']
    if setting.plan_k is not None:
        opts.append(f'custom_hooks.0.plan={plans[(setting.plan_k, setting.allocator)]}')
    else:
        opts += [f'custom_hooks.0.w_bits={setting.bits}', f'custom_hooks.0.a_bits={setting.bits}']
    opts += [f'custom_hooks.0.{k}={v}' for k, v in setting.extra.items()]
    return opts


def evaluate(detector: str, setting: Setting, plans: dict, work_root: str, threads: int | None = None) -> dict:
    """Run tools/test.py for one detector and setting; return its metrics and quantization totals.

    ``threads``: torch threads of that process (``OMP_NUM_THREADS``; default: torch's own)."""
    float_cfg, quant_cfg, ckpt = DETECTORS[detector]
    work_dir = osp.join(work_root, detector, setting.tag)
    cmd = [
        sys.executable,
        osp.join(REPO, 'tools', 'test.py'),
        float_cfg if setting.is_float else quant_cfg,
        ckpt,
        '--work-dir',
        work_dir,
        '--data-root',
        DATA,
    ]
    if not setting.is_float:
        cmd += ['--cfg-options', *hook_options(setting, plans)]
    t0 = time.time()
    os.makedirs(work_dir, exist_ok=True)
    with open(osp.join(work_dir, 'log.txt'), 'w') as log:
        env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = open(osp.join(work_dir, 'log.txt')).read()[-2500:]
        raise RuntimeError(f'{detector} {setting.name} failed (log: {work_dir}/log.txt):\n{tail}')
    record = json.load(open(osp.join(work_dir, 'metrics.json')))
    m, q = record['metrics'], record['quantization']
    row = {
        'detector': detector,
        'setting': setting.name,
        'tag': setting.tag,
        'method': None if setting.is_float else setting.method,
        'allocator': setting.allocator if setting.plan_k else None,
        **setting.extra,
        'box_ap': 100 * m['coco/bbox_mAP'],
        'mask_ap': 100 * m['coco/segm_mAP'],
        'seconds': seconds,
        'command': ' '.join(cmd[1:]).replace(REPO + '/', ''),
    }
    if q is not None:
        t = q['totals']
        row.update(
            avg_w_bits=t['avg_weight_bits'],
            avg_a_bits=t['avg_act_bits'],
            weight_mb=t['weight_mb'],
            gbops=t['bops'] / 1e9,
            macs=t['macs'],
            params=t['params'],
            calibration_ids=q['calibration_ids'],
        )
    return row


def fill_float_costs(rows: list[dict]) -> None:
    """Float rows: 32-bit weights and activations over the same sites as the quantized rows."""
    by_det = {r['detector']: r for r in rows if 'params' in r}
    for r in rows:
        if 'params' not in r and r['detector'] in by_det:
            q = by_det[r['detector']]
            r.update(
                avg_w_bits=32.0,
                avg_a_bits=32.0,
                weight_mb=q['params'] * 32 / 8 / 2**20,
                gbops=q['macs'] * 32 * 32 / 1e9,
                params=q['params'],
            )


def markdown_table(
    rows: list[dict],
    columns=('detector', 'setting', 'method', 'box_ap', 'mask_ap', 'avg_w_bits', 'avg_a_bits', 'weight_mb', 'seconds'),
) -> str:
    heads = {
        'box_ap': 'box AP',
        'mask_ap': 'mask AP',
        'avg_w_bits': 'avg W bits',
        'avg_a_bits': 'avg A bits',
        'weight_mb': 'weight MB',
        'seconds': 'time (s)',
        'gbops': 'GBOPs',
    }

    def fmt(k, v):
        if v is None:
            return '—'
        if isinstance(v, float):
            return f'{v:.1f}' if k in ('box_ap', 'mask_ap', 'seconds') else f'{v:.2f}'
        return str(v)

    lines = ['| ' + ' | '.join(heads.get(c, c) for c in columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(c, r.get(c)) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)
