"""The results: the markdown table (ours beside the paper's on COCO), the plot, the paper's expected
numbers per config, and results.md / .json / .png."""

from __future__ import annotations

import argparse
import json
import os.path as osp
import shlex

from .common import PAPER, rel, write_atomic
from .grid import SETTINGS, Cell, World, coco_config


def paper_reference(paper: dict | None, cell: Cell) -> dict | None:
    """The published number this cell is compared with, and the source it comes from."""
    if paper is None or cell.model not in paper['models']:
        return None
    column = next(c for c in paper['columns'] if c['setting'] == cell.setting)
    ref = paper['models'][cell.model]['results'][column['key']]
    source = paper['sources'][column['source']]
    return {
        'label': column['label'],
        'arxiv': source.get('arxiv'),
        'box': ref['box'],
        'mask': ref['mask'],
        'reruns': ref.get('reruns'),
    }


def fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return '—'
    return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def markdown(rows: list[dict], paper: dict | None, val_images: int | None) -> str:
    """Our numbers (and, on COCO, the paper's beside them, with the differences) as one markdown table."""
    notes = []
    if paper is not None:
        head = ['model', 'setting', 'box AP', 'paper', 'Δ', 'mask AP', 'paper', 'Δ', 'avg W / A bits', 'reference']
    else:
        head = ['model', 'setting', 'box AP', 'mask AP', 'avg W / A bits', 'weight MB', 'time (s)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cell = Cell(r['detector'], r['backbone'], r['setting'])
        setting = cell.setting
        if r.get('failed'):
            setting += ' (failed)'
        if (r.get('plan') or {}).get('placeholder'):
            setting += ' †'
        bits = f'{fmt(r.get("avg_w_bits"), 2)} / {fmt(r.get("avg_a_bits"), 2)}'
        if paper is None:
            cols = [
                fmt(r.get('box_ap')),
                fmt(r.get('mask_ap')),
                bits,
                fmt(r.get('weight_mb'), 2),
                fmt(r.get('seconds'), 0),
            ]
        else:
            ref = paper_reference(paper, cell)
            comparable = ref is not None and r.get('box_ap') is not None and '†' not in setting
            delta = {k: r[f'{k}_ap'] - ref[k] if comparable else None for k in ('box', 'mask')}
            cols = [
                fmt(r.get('box_ap')),
                fmt(ref and ref['box']),
                fmt(delta['box'], signed=True),
                fmt(r.get('mask_ap')),
                fmt(ref and ref['mask']),
                fmt(delta['mask'], signed=True),
                bits,
                f'{ref["label"]} (arXiv {ref["arxiv"]})' if ref else '—',
            ]
            if ref and ref['reruns']:
                notes.append(
                    f'{cell.label} {cell.setting}: {ref["label"]} published {ref["box"]} / {ref["mask"]}; '
                    f'{ref["reruns"]["note"]}'
                )
            if cell.setting == 'W4A4' and ref:
                best = paper['models'][cell.model]['results']['APHQ-ViT W4A4']
                notes.append(
                    f'{cell.label} W4A4: best uniform W4A4 in the literature (APHQ-ViT, CVPR 2025): '
                    f'{best["box"]} / {best["mask"]}'
                )
        lines.append(f'| {cell.label} | {setting} | ' + ' | '.join(cols) + ' |')
    if any((r.get('plan') or {}).get('placeholder') for r in rows):
        notes.append(
            '† MP plan made from random classifier weights (a placeholder, e.g. configs/plans/): '
            'not a reproduction of the paper; no difference is shown'
        )
    scopes = sorted({r['scope'] for r in rows if r.get('scope')})
    if scopes:
        notes.append(f'quantization scope: {", ".join(scopes)}')
    if val_images:
        notes.append(
            f'evaluated on the first {val_images} val images only'
            + (": not comparable with the paper's full val2017" if paper is not None else '')
        )
    return '\n'.join(lines + [''] + [f'- {n}' for n in notes])


def plot(rows: list[dict], paper: dict | None, path: str) -> None:
    """Box and mask AP per cell, ours beside the paper's (Agg canvas: no pyplot global state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.55 * len(rows) + 2), 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    x, width = np.arange(len(rows)), 0.4 if paper is not None else 0.7
    refs = [paper_reference(paper, Cell(r['detector'], r['backbone'], r['setting'])) for r in rows]
    for ax, kind in zip(axes, ('box', 'mask')):
        ours = [r.get(f'{kind}_ap') if r.get(f'{kind}_ap') is not None else np.nan for r in rows]
        ax.bar_label(
            ax.bar(x - (width / 2 if paper is not None else 0), ours, width, label='ours'), fmt='%.1f', fontsize=6
        )
        if paper is not None:
            ax.bar_label(
                ax.bar(
                    x + width / 2, [ref[kind] if ref else np.nan for ref in refs], width, label='paper', color='0.6'
                ),
                fmt='%.1f',
                fontsize=6,
            )
            ax.legend(loc='lower left', fontsize=8)
        ax.set_ylabel(f'{kind} AP')
        ax.grid(axis='y', alpha=0.3)
    axes[-1].set_xticks(x, [f'{r["model"]} {r["setting"]}' for r in rows], rotation=45, ha='right', fontsize=7)
    fig.suptitle('COCO val2017: ours vs paper' if paper is not None else 'miniature world', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def paper_table(paper: dict) -> str:
    """The expected number of every config, from configs/paper_results.json."""
    lines = ['| config | paper box AP / mask AP | reference |', '|---|---|---|']
    for model in paper['models'].values():
        for setting in SETTINGS:
            cell = Cell(model['detector'], model['backbone'], setting)
            ref = paper_reference(paper, cell)
            config = rel(coco_config(cell))
            rerun = f' (re-runs: {ref["reruns"]["box"]} / {ref["reruns"]["mask"]})' if ref['reruns'] else ''
            lines.append(
                f'| `{config}` | {ref["box"]} / {ref["mask"]}{rerun} | {ref["label"]} (arXiv {ref["arxiv"]}) |'
            )
    return '\n'.join(lines)


def write_results(args: argparse.Namespace, world: World, rows: list[dict], seconds: float) -> str:
    """results.md / .json / .png under --out-dir; returns the markdown table."""
    table = markdown(rows, world.paper, args.val_images)
    write_atomic(
        osp.join(args.out_dir, 'results.md'), f'<!-- generated by tools/reproduce.py ({world.name}) -->\n\n{table}\n'
    )
    report = {
        'world': world.name,
        'command': shlex.join(['python', 'tools/reproduce.py', *args.argv]),
        'paper': rel(PAPER) if world.paper else None,
        'seconds': round(seconds, 1),
        'rows': [
            dict(r, paper=paper_reference(world.paper, Cell(r['detector'], r['backbone'], r['setting']))) for r in rows
        ],
    }
    write_atomic(osp.join(args.out_dir, 'results.json'), json.dumps(report, indent=1))
    plot(rows, world.paper, osp.join(args.out_dir, 'results.png'))
    return table
