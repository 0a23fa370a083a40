"""Reproducing the paper's COCO table (``tools/reproduce.py``), one module per concern.

- :mod:`.common`: the checkout's paths, :class:`~.common.UserError`, files written whole, the sha256 cache
- :mod:`.grid`: the cells (detector x backbone x setting) and the two worlds (COCO, the miniature world)
- :mod:`.checkpoints`: where each detector checkpoint comes from, its published hash, its conversion
- :mod:`.plans`: the LRP plans of the MP cells
- :mod:`.cells`: a cell's tools/test.py command and the digest of its inputs
- :mod:`.processes`: tools as processes, a cell's run and record, one GPU per running cell
- :mod:`.tables`: the markdown table, the plot and the results files
- :mod:`.driver`: one run, from parsed options to results

Importing this package imports none of them; none imports MMDetection (MMEngine reads a cell's config
inside :func:`.cells.config_digest`).
"""
