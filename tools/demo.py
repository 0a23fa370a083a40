"""``make demo``: the whole pipeline on the miniature world, offline, in a few minutes.

1. the miniature world's evaluation, calibration and classification-val splits (seeded);
2. LRP bit plans (MP6, MP4) computed on the miniature world's Swin classifier (tools/lrp_plan.py);
3. the tiny Swin Mask R-CNN evaluated in float and quantized at W8A8, W6A6, MP6, W4A4, MP4 through
   QuantizationHook and tools/test.py (CRL reparameterization, one calibration image);
4. one table: box AP, mask AP, average W/A bits, weight MB, wall time of each run.

Results go to work_dirs/demo/ (logs, metrics, plans, results.md). No network is used.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import time

from mmdet_lrpq.miniworld import experiments as ex

SETTINGS = [
    ex.Setting('FP'),
    ex.Setting('W8A8', bits=8),
    ex.Setting('W6A6', bits=6),
    ex.Setting('MP6', plan_k=6),
    ex.Setting('W4A4', bits=4),
    ex.Setting('MP4', plan_k=4),
]


def main() -> None:
    start = time.time()
    log = lambda msg: print(f'[{time.time() - start:5.0f}s] {msg}', flush=True)  # noqa: E731
    work = osp.join(ex.REPO, 'work_dirs', 'demo')
    ex.require_checkpoints()
    log('[1/4] miniature-world data')
    ex.ensure_data(log)
    log('[2/4] LRP bit plans on the tiny Swin classifier')
    os.makedirs(osp.join(work, 'plans'), exist_ok=True)
    plans = {(k, 'lrp_qvit'): ex.make_plan(k, osp.join(work, 'plans'), log=log) for k in (6, 4)}
    log('[3/4] tiny Mask R-CNN: float and quantized (tools/test.py + QuantizationHook)')
    rows = []
    for i, setting in enumerate(SETTINGS, 1):
        row = ex.evaluate('mask_rcnn', setting, plans, work)
        rows.append(row)
        log(
            f'  {i}/{len(SETTINGS)} {setting.name:5s} box AP {row["box_ap"]:5.1f}  mask AP {row["mask_ap"]:5.1f}'
            f'  ({row["seconds"]:.0f}s)'
        )
    ex.fill_float_costs(rows)
    table = ex.markdown_table(
        rows, columns=('setting', 'box_ap', 'mask_ap', 'avg_w_bits', 'avg_a_bits', 'weight_mb', 'seconds')
    )
    with open(osp.join(work, 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(osp.join(work, 'results.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    log('[4/4] results (tiny Swin Mask R-CNN, miniature-world val, CRL, 1 calibration image):')
    print(table)
    print(f'\ndemo finished in {time.time() - start:.0f}s; details in {work}/')


if __name__ == '__main__':
    main()
