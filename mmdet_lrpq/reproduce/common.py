"""What every part of the reproduction shares: the checkout's paths, the error a user sees, paths and
commands as the user would type them, files written whole, the sha256 cache and ``NAME=PATH`` options."""

from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import shlex

from ..cli import REPO  # the checkout, one definition for every command-line module

PAPER = osp.join(REPO, 'configs', 'paper_results.json')


class UserError(Exception):
    """Bad or missing input: printed as one message that names the option/file and the fix."""


def rel(path: str) -> str:
    """Paths inside the checkout as the user would type them (commands and tables stay readable)."""
    path = osp.abspath(path)
    return osp.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def write_atomic(path: str, text: str) -> None:
    """Readers (a resumed run, an interrupted one) never see a half-written file."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Digests:
    """sha256 of files, remembered by (size, mtime) in <out-dir>/digests.json: checkpoints are hundreds of MB."""

    def __init__(self, path: str, remember: bool = True):
        self.path = path
        self.remember = remember  # False (a dry run): digests are computed, nothing is written
        try:
            self.known = json.load(open(path))
        except (OSError, ValueError):
            self.known = {}

    def __call__(self, path: str) -> str:
        st = os.stat(path)
        real = osp.realpath(path)
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.known.get(real)
        if hit and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                h.update(block)
        self.known[real] = [*stamp, h.hexdigest()]
        if self.remember:
            write_atomic(self.path, json.dumps(self.known, indent=1))
        return h.hexdigest()


def show(cmd: list[str]) -> str:
    """A command as the user would type it from the checkout (paths inside it made relative)."""
    return shlex.join(['python', *[c.replace(REPO + os.sep, '') for c in cmd[1:]]])


def parse_pairs(values: list[str] | None, option: str, valid: tuple[str, ...]) -> dict[str, str]:
    """``NAME=PATH`` options: names checked against ``valid``, files against the disk."""
    out = {}
    for value in values or []:
        name, sep, path = value.partition('=')
        if not sep or not path:
            raise UserError(f'{option} {value!r}: expected NAME=PATH, e.g. {option} {valid[0]}=/path/to/file.pth')
        if name not in valid:
            raise UserError(f'{option} {value!r}: unknown name {name!r}; one of {", ".join(valid)}')
        if not osp.isfile(path):
            raise UserError(f'{option} {name}={path}: file not found; pass the path of a local .pth file')
        out[name] = path
    return out
