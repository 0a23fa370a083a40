"""How a miniature-world training script records the command that made a checkpoint."""

from __future__ import annotations

import os.path as osp
import shlex
import sys

from ..cli import REPO  # the checkout, one definition for every command-line module


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python <script relative to the repo> <arguments>``, shell-quoted: the arguments are ``argv``
    when ``main(argv)`` was called from Python (a test, ``train_all``), else the process's own."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(['python', osp.relpath(osp.abspath(script), REPO), *arguments])
