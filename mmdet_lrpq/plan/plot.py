"""Picture of a bit plan: importance and assigned bits per layer type and block (a PNG for reports)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..bits import MAX_BITS, MIN_BITS
from .bitplan import BitPlan
from .sites import Site

ROWS = ('qkv', 'matmul1', 'matmul2', 'proj', 'fc1', 'fc2', 'reduction')


def _columns(sites: Sequence[Site]) -> tuple[list[tuple], dict[str, int]]:
    """Columns in forward order: one per block, one per patch merging where it occurs.

    A reduction has no block, so its place is taken from the site order (adapters list sites in
    forward order); this is right whichever stage convention (end of i / start of i+1) names it.
    """
    columns: list[tuple] = []
    index: dict[tuple, int] = {}
    col_of: dict[str, int] = {}
    for s in sites:
        if s.layer_type not in ROWS:
            continue
        key = ('merge', s.name) if s.block is None else ('block', s.block)
        if key not in index:
            index[key] = len(columns)
            columns.append((key[0], s.block if s.block is not None else s.stage, s.stage))
        col_of[s.name] = index[key]
    return columns, col_of


def plot_plan(plan: BitPlan, sites: Sequence[Site], path: str | Path) -> Path:
    """Save a two-panel heatmap (relative importance | assigned bits) of ``plan`` on ``sites``.

    Rows are the Swin layer types, columns the blocks in forward order with patch merging at the
    boundary where it occurs; weighted sites show ``w_bits``, matmuls their operand ``a_bits``.
    Sites of other layer types (patch embedding, neck, heads) are not drawn. No pyplot: the
    figure is rendered with Agg without touching the process-wide backend.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    shown = [s for s in sites if s.layer_type in ROWS]
    if not shown:
        raise ValueError(f'no Swin block or patch-merging sites to plot (layer types {ROWS})')
    columns, col_of = _columns(shown)
    bits = plan.resolve(shown)
    importance = np.full((len(ROWS), len(columns)), np.nan)
    assigned = np.full((len(ROWS), len(columns)), np.nan)
    for s in shown:
        r, c = ROWS.index(s.layer_type), col_of[s.name]
        importance[r, c] = plan.scores.get(s.name, np.nan)
        assigned[r, c] = bits[s.name][0 if s.has_weights else 1]

    labels = [f'b{blk}' if kind == 'block' else f'M{blk}' for kind, blk, _ in columns]
    boundaries = [c - 0.5 for c in range(1, len(columns)) if columns[c][2] != columns[c - 1][2]]
    fig = Figure(figsize=(max(6.0, 0.45 * len(columns) + 2.5), 6.5), layout='constrained')
    panels = fig.subplots(2, 1, sharex=True)
    for ax, data, title, cmap, limits in (
        (panels[0], importance, 'relative importance', 'viridis', (None, None)),
        (panels[1], assigned, 'assigned bits (W; A for matmuls)', 'RdYlGn', (MIN_BITS, MAX_BITS)),
    ):
        image = ax.imshow(
            np.ma.masked_invalid(data),
            cmap=colormaps[cmap].with_extremes(bad='#dddddd'),
            vmin=limits[0],
            vmax=limits[1],
            aspect='auto',
        )
        fig.colorbar(image, ax=ax, fraction=0.03)
        ax.set_title(title)
        ax.set_yticks(range(len(ROWS)), ROWS)
        for x in boundaries:
            ax.axvline(x, color='black', linewidth=1.5)
    for r, c in zip(*np.nonzero(~np.isnan(assigned))):
        panels[1].text(c, r, str(int(assigned[r, c])), ha='center', va='center', fontsize=7)
    panels[1].set_xticks(range(len(columns)), labels, rotation=90, fontsize=7)
    acc = plan.budget.get('accounting', {})
    summary = f', avg W bits {acc["avg_weight_bits"]:.3f}' if acc.get('avg_weight_bits') is not None else ''
    fig.suptitle(f'bit plan ({plan.allocator or "unnamed"} allocator{summary}); M = patch merging')
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
