"""Detector checkpoints: where each comes from (given, bundled or downloaded), its sha256 against the
published one, and the one-time conversion of Microsoft's mmdet-2.x Swin keys."""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import urllib.request
import zipfile
from dataclasses import dataclass

from .common import REPO, Digests, UserError, parse_pairs, rel, show
from .grid import DETECTORS, World
from .processes import run_tool


@dataclass(frozen=True)
class Checkpoint:
    """The file tools/test.py loads, and the digest of the file the user gave (what a cell depends on)."""

    path: str
    sha256: str


def checkpoint_layout(path: str) -> str:
    """'original' (Microsoft's Swin keys: convert first) or 'mmdet', read off the pickled key strings.

    The keys are plain UTF-8 in the pickle (``data.pkl`` of torch's zip format, or the start of a
    legacy file), so nothing is unpickled and a large file is not read whole.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pickled = [n for n in z.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')]
            blob = z.read(pickled[0]) if pickled else b''
    else:
        with open(path, 'rb') as f:
            blob = f.read(64 << 20)
    if b'backbone.layers.' in blob:
        return 'original'
    if b'backbone.stages.' in blob:
        return 'mmdet'
    raise UserError(
        f'{path} has no Swin backbone keys (backbone.layers.* or backbone.stages.*): '
        f'is it a Swin Mask R-CNN / Cascade Mask R-CNN checkpoint?'
    )


def recorded_entries(paper: dict | None) -> dict[str, dict]:
    """Every checkpoint file paper_results.json knows, by file name (to verify user-given copies too)."""
    if paper is None:
        return {}
    return {e['file']: e for entries in paper['checkpoints'].values() for e in entries}


def verify(path: str, digest: str, entry: dict | None) -> str:
    """Check ``path`` against the recorded sha256 (full or OpenMMLab's 8-digit prefix); a verdict line."""
    if entry is None:
        return f'sha256 {digest[:16]}… (no published hash for this file; recorded with each cell)'
    expected = entry.get('sha256') or entry.get('sha256_prefix')
    if not expected:
        return f'sha256 {digest} (no hash is published for {entry["file"]}: not verifiable, recorded in the cell)'
    if not digest.startswith(expected):
        raise UserError(
            f'{path}: sha256 {digest} does not match the published {expected} of {entry["file"]} '
            f'({entry["url"]}); the file is damaged or different: download it again (or rename it if '
            f'it is intentionally another file)'
        )
    return f'sha256 verified ({"full digest" if entry.get("sha256") else "prefix " + expected} of {entry["url"]})'


def download(url: str, dest: str, log) -> None:
    """Fetch ``url`` into ``dest`` with progress; a failure says how to do it by hand."""
    tmp = dest + '.part'
    os.makedirs(osp.dirname(dest), exist_ok=True)
    log(f'downloading {url}')
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as f:
            total, done, step = int(response.headers.get('Content-Length') or 0), 0, 0
            for block in iter(lambda: response.read(1 << 22), b''):
                f.write(block)
                done += len(block)
                if total and done * 10 >= total * step:
                    log(f'  {done >> 20} / {total >> 20} MiB')
                    step += 1
        if total and done != total:
            raise OSError(f'got {done} of {total} bytes')
    except OSError as err:
        raise UserError(
            f'downloading {url} failed ({err}); download it yourself and pass --checkpoint MODEL={osp.basename(dest)}'
        ) from None
    os.replace(tmp, dest)  # only a complete file gets the final name


def checkpoint_sources(args: argparse.Namespace, world: World, models: list[str]) -> dict[str, tuple[str, dict | None]]:
    """Each model's file (given, bundled, or where --download puts it) and its recorded entry, or the error."""
    given = parse_pairs(args.checkpoint, '--checkpoint', tuple(f'{d}_{b}' for d in DETECTORS for b in world.backbones))
    entries = recorded_entries(world.paper)
    out = {}
    for model in models:
        path = given.get(model) or world.default_checkpoint(model)
        if path is not None:
            out[model] = (path, entries.get(osp.basename(path)))
            if not osp.isfile(path):
                raise UserError(f'checkpoint for {model} not found: {path}; pass --checkpoint {model}=PATH')
        elif args.download and world.paper is not None:
            choices = world.paper['checkpoints'][model]
            entry = next((e for e in choices if e['source'] == args.download), None) or next(
                e for e in choices if e['default']
            )  # Cascade Swin exists only as the official files
            out[model] = (osp.join(args.cache_dir, entry['file']), entry)
        else:
            urls = ', '.join(e['url'] for e in world.paper['checkpoints'][model]) if world.paper else ''
            raise UserError(
                f'no checkpoint for {model}: pass --checkpoint {model}=PATH'
                + (f' (official files: {urls}) or --download' if urls else '')
            )
    return out


def resolve_checkpoints(
    args: argparse.Namespace, world: World, models: list[str], digests: Digests, log
) -> tuple[dict[str, Checkpoint], list[list[str]]]:
    """Each model's checkpoint, downloaded, verified and converted as needed; and the commands (dry run)."""
    sources = checkpoint_sources(args, world, models)  # all of them known before the first download
    out, commands = {}, []
    for model, (path, entry) in sources.items():
        if not osp.isfile(path):
            if args.dry_run:
                commands.append(['download', entry['url'], path])
                continue
            download(entry['url'], path, log)
        digest = digests(path)
        try:
            log(f'{model}: {rel(path)}: {verify(path, digest, entry)}')
        except UserError:
            if osp.dirname(osp.abspath(path)) == osp.abspath(args.cache_dir):
                os.remove(path)  # a damaged download must not be found again next time
            raise
        if checkpoint_layout(path) == 'original':
            stem = osp.splitext(osp.basename(path))[0]
            converted = osp.join(args.cache_dir, 'converted', f'{stem}.mmdet3-{digest[:12]}.pth')  # per content
            if not osp.isfile(converted):
                cmd = [
                    sys.executable,
                    osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                    path,
                    converted + '.part',
                    *(['--trust'] if args.trust_checkpoints else []),
                ]
                if args.dry_run:
                    commands.append(cmd)
                else:
                    log(f'{model}: converting the mmdet-2.x Swin keys once: {show(cmd)}')
                    proc = run_tool(cmd)
                    if proc.returncode != 0:
                        raise UserError(
                            f'converting {path} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}'
                            + ('' if args.trust_checkpoints else ' (if you trust the file, add --trust-checkpoints)')
                        )
                    os.replace(converted + '.part', converted)
            path = converted
        out[model] = Checkpoint(path=path, sha256=digest)
    return out, commands
