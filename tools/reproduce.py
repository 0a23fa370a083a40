"""Reproduce the paper's COCO table in one command: our box / mask AP beside the published numbers.

    python tools/reproduce.py --coco-root data/coco --download --imagenet /data/imagenet/val --pretrained
    python tools/reproduce.py --coco-root data/coco --detectors mask_rcnn --backbones swin_t \\
        --checkpoint mask_rcnn_swin_t=mask_rcnn_swin_tiny_patch4_window7.pth \\
        --imagenet /data/imagenet/val --classifier swin_t=swin_tiny_patch4_window7_224.pth
    python tools/reproduce.py --miniworld      # the same code path, offline, on the bundled miniature world
    python tools/reproduce.py --print-paper    # only the expected numbers (configs/paper_results.json)

The grid is detectors {mask_rcnn, cascade_mask_rcnn} x backbones {swin_t, swin_s} x settings {FP, W4A4,
W6A6, MP4, MP6}. FP runs configs/_base_/<model>.py, the others configs/<model>_<setting>.py; MPk uses
the LRP plan that tools/lrp_plan.py makes here from the ImageNet classifier (the plans shipped in
configs/plans/ come from random weights: placeholders, see --reuse-plans). Official mmdet-2.x
checkpoints (Microsoft's Swin keys) are converted once by tools/convert_checkpoint.py, detected from
their keys. Every cell is one tools/test.py process with its own work dir; its result is kept in
<out-dir>/cells/<cell>.json with a digest of its inputs (resolved config, quantization options,
checkpoint, plan content, evaluation annotations), so a rerun skips finished cells and reruns exactly
those whose inputs changed (--force: all). Writes results.md, results.json and results.png to --out-dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import os.path as osp
import queue
import shlex
import subprocess
import sys
import time
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mmdet_lrpq.miniworld import experiments as mini  # the miniature world's data, detectors and classifier

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PAPER = osp.join(REPO, 'configs', 'paper_results.json')
SETTINGS = ('FP', 'W4A4', 'W6A6', 'MP4', 'MP6')
DETECTORS = ('mask_rcnn', 'cascade_mask_rcnn')
DETECTOR_ALIASES = {'cascade': 'cascade_mask_rcnn'}
COCO_BACKBONES = ('swin_t', 'swin_s')
MINI_BACKBONE = 'swin_mini'
LABELS = {
    'mask_rcnn': 'Mask R-CNN',
    'cascade_mask_rcnn': 'Cascade Mask R-CNN',
    'swin_t': 'Swin-T',
    'swin_s': 'Swin-S',
    'swin_mini': 'Swin-mini',
}


class UserError(Exception):
    """Bad or missing input: printed as one message that names the option/file and the fix."""


@dataclass(frozen=True)
class Cell:
    detector: str
    backbone: str
    setting: str

    @property
    def model(self) -> str:
        return f'{self.detector}_{self.backbone}'

    @property
    def name(self) -> str:
        return f'{self.model}_{self.setting.lower()}'

    @property
    def plan_k(self) -> int | None:
        return int(self.setting[2:]) if self.setting.startswith('MP') else None

    @property
    def label(self) -> str:
        return f'{LABELS[self.detector]} {LABELS[self.backbone]}'


@dataclass(frozen=True)
class Checkpoint:
    """The file tools/test.py loads, and the digest of the file the user gave (what a cell depends on)."""

    path: str
    sha256: str


# ----------------------------------------------------------------------------- small helpers
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


def run_tool(cmd: list[str], log_path: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """One project tool as its own process (their command lines are the stable interface)."""
    if log_path is None:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    os.makedirs(osp.dirname(log_path), exist_ok=True)
    with open(log_path, 'w') as log:
        return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def show(cmd: list[str]) -> str:
    """A command as the user would type it from the checkout (paths inside it made relative)."""
    return shlex.join(['python', *[c.replace(REPO + os.sep, '') for c in cmd[1:]]])


def coco_config(cell: Cell) -> str:
    """FP: the float base config; otherwise the config of that setting (its hook options inside)."""
    if cell.setting == 'FP':
        return osp.join(REPO, 'configs', '_base_', f'{cell.model}.py')
    return osp.join(REPO, 'configs', f'{cell.model}_{cell.setting.lower()}.py')


# ----------------------------------------------------------------------------- the two worlds
class World:
    """Where one grid's inputs come from; subclasses: COCO with the official detectors, the miniature world."""

    name: str
    data_root: str
    val_ann: str  # evaluation annotations, relative to data_root
    backbones: tuple[str, ...]
    paper: dict | None = None

    def config(self, cell: Cell) -> str:
        raise NotImplementedError

    def hook_options(self, cell: Cell) -> list[str]:
        """--cfg-options that make a cell's setting, beyond what its config says (no paths)."""
        return []

    def plan_inputs(self, backbone: str, classifiers: dict[str, str], args: argparse.Namespace) -> list[str]:
        """tools/lrp_plan.py's --model, weights and --images for a backbone's plans."""
        raise NotImplementedError

    def default_checkpoint(self, model: str) -> str | None:
        return None

    def check_data(self, cells: list[Cell]) -> None:
        pass


class CocoWorld(World):
    name = 'coco'
    val_ann = 'annotations/instances_val2017.json'
    backbones = COCO_BACKBONES

    def __init__(self, root: str | None):
        if root is None:
            raise UserError(
                '--coco-root is required: a COCO 2017 root with annotations/, val2017/ and train2017/ '
                '(or run --miniworld for the offline miniature version)'
            )
        self.data_root = osp.abspath(root)
        self.paper = json.load(open(PAPER))

    def config(self, cell: Cell) -> str:
        return coco_config(cell)

    def plan_inputs(self, backbone, classifiers, args):
        weights = ['--pretrained'] if args.pretrained else ['--checkpoint', osp.abspath(classifiers[backbone])]
        timm_name = self.paper['classifiers'][backbone]['timm']
        return ['--model', timm_name, *weights, '--images', osp.abspath(args.imagenet)]

    def check_data(self, cells):
        if not osp.isdir(self.data_root):
            raise UserError(
                f'--coco-root {self.data_root} is not a directory; pass the root of COCO 2017 '
                f'(annotations/, val2017/, train2017/)'
            )
        need = [self.val_ann, 'val2017']
        if any(c.setting != 'FP' for c in cells):  # quantized cells calibrate on one train2017 image
            need += ['annotations/instances_train2017.json', 'train2017']
        missing = [p for p in need if not osp.exists(osp.join(self.data_root, p))]
        if missing:
            raise UserError(
                f'--coco-root {self.data_root}: missing {", ".join(missing)}. Pass the root of COCO 2017 '
                f'(annotations/instances_val2017.json, annotations/instances_train2017.json, val2017/, '
                f'train2017/; quantized cells calibrate on one train2017 image)'
            )


class MiniWorld(World):
    name = 'miniworld'
    data_root = mini.DATA
    val_ann = 'annotations/instances_val.json'
    backbones = (MINI_BACKBONE,)

    # What configs/<model>_<setting>.py set on COCO, given to the miniature world's *_quant.py configs.
    SETTING_OPTIONS = {
        'W4A4': ['w_bits=4', 'a_bits=4', 'method=repq'],
        'W6A6': ['w_bits=6', 'a_bits=6', 'method=repq'],
        'MP4': ['method=crl'],
        'MP6': ['method=crl'],
    }

    def config(self, cell):
        float_cfg, quant_cfg, _ = mini.DETECTORS[cell.detector]
        return osp.join(REPO, float_cfg if cell.setting == 'FP' else quant_cfg)

    def hook_options(self, cell):
        return [f'custom_hooks.0.{o}' for o in self.SETTING_OPTIONS.get(cell.setting, [])]

    def plan_inputs(self, backbone, classifiers, args):
        return ['--model', mini.CLASSIFIER, '--checkpoint', mini.CLASSIFIER, '--images', osp.join(mini.DATA, 'cls_val')]

    def default_checkpoint(self, model):
        detector = model[: -len('_' + MINI_BACKBONE)]
        return mini.DETECTORS[detector][2] if detector in mini.DETECTORS else None


# ----------------------------------------------------------------------------- command line
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        epilog=__doc__.split('\n', 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    world = p.add_mutually_exclusive_group()
    world.add_argument('--coco-root', help='COCO 2017 root: annotations/, val2017/, train2017/')
    world.add_argument('--miniworld', action='store_true', help='the offline miniature world (no paper column)')
    world.add_argument('--print-paper', action='store_true', help='print the expected numbers per config and exit')
    p.add_argument(
        '--detectors',
        nargs='+',
        default=list(DETECTORS),
        metavar='D',
        help=f'subset of {", ".join(DETECTORS)} ("cascade" for short)',
    )
    p.add_argument(
        '--backbones',
        nargs='+',
        default=None,
        metavar='B',
        help=f'subset of {", ".join(COCO_BACKBONES)} (the miniature world has {MINI_BACKBONE})',
    )
    p.add_argument(
        '--settings',
        nargs='+',
        default=list(SETTINGS),
        choices=SETTINGS,
        metavar='S',
        help=f'subset of {" ".join(SETTINGS)}',
    )
    p.add_argument(
        '--checkpoint',
        action='append',
        metavar='MODEL=PATH',
        help='detector checkpoint, e.g. mask_rcnn_swin_t=PATH (official mmdet-2.x files are converted)',
    )
    p.add_argument(
        '--download',
        nargs='?',
        const='official',
        choices=('official', 'mmdet'),
        help='fetch the checkpoints not given with --checkpoint into --cache-dir and verify them: '
        'official (Swin-Transformer-Object-Detection, the default) or mmdet (the OpenMMLab zoo, '
        'Mask R-CNN only)',
    )
    p.add_argument(
        '--cache-dir',
        default=osp.expanduser('~/.cache/mmdet-lrpq/checkpoints'),
        help='downloaded and converted checkpoints (default: %(default)s)',
    )
    p.add_argument(
        '--trust-checkpoints',
        action='store_true',
        help='let tools/convert_checkpoint.py load with weights_only=False (trusted files only)',
    )
    p.add_argument('--imagenet', help='ImageNet images for the LRP plans (class folders or a flat folder)')
    p.add_argument(
        '--classifier',
        action='append',
        metavar='BACKBONE=PATH',
        help='ImageNet classifier weights for a plan, a timm state dict: swin_t=PATH, swin_s=PATH',
    )
    p.add_argument('--pretrained', action='store_true', help="timm's pretrained classifier weights (downloads)")
    p.add_argument('--lrp-images', type=int, default=64, help='classifier images for the LRP scores (default 64)')
    p.add_argument('--plans-dir', help='where the MP plans are made (default: <out-dir>/plans)')
    p.add_argument(
        '--reuse-plans',
        action='store_true',
        help='use the plans already in --plans-dir (<backbone>_mp<k>.json) instead of making them; '
        'random-weight plans (e.g. --plans-dir configs/plans) run marked as placeholders',
    )
    p.add_argument(
        '--val-images',
        type=int,
        metavar='N',
        help='evaluate on the first N val images only (a quick check; not comparable with the paper)',
    )
    p.add_argument(
        '--out-dir',
        help='results, per-cell records and work dirs (default: work_dirs/reproduce or work_dirs/reproduce_miniworld)',
    )
    p.add_argument(
        '--jobs',
        type=int,
        default=None,
        help='tools/test.py processes side by side (default: one per visible GPU, else 1)',
    )
    p.add_argument(
        '--gpus',
        metavar='IDS',
        help='comma-separated GPUs to spread the cells over, one GPU per process (default: '
        'CUDA_VISIBLE_DEVICES, else every GPU torch sees; "none" keeps every process on the CPU '
        'or its own default)',
    )
    p.add_argument('--force', action='store_true', help='rerun finished cells too')
    p.add_argument('--dry-run', action='store_true', help='print the commands a run would execute, run nothing')
    args = p.parse_args(argv)
    args.detectors = list(dict.fromkeys(DETECTOR_ALIASES.get(d, d) for d in args.detectors))
    bad = [d for d in args.detectors if d not in DETECTORS]
    if bad:
        p.error(f'--detectors: unknown {bad}; choose from {", ".join(DETECTORS)} (or "cascade")')
    if args.val_images is not None and args.val_images < 1:
        p.error('--val-images must be a positive integer')
    args.gpus = (
        ([] if args.gpus.strip().lower() == 'none' else [g.strip() for g in args.gpus.split(',') if g.strip()])
        if args.gpus is not None
        else visible_gpus()
    )
    if args.jobs is None:
        args.jobs = max(1, len(args.gpus))
    if args.lrp_images < 1 or args.jobs < 1:
        p.error('--lrp-images and --jobs must be positive integers')
    if args.pretrained and args.classifier:
        p.error('give either --pretrained or --classifier, not both')
    if args.miniworld and (args.download or args.classifier or args.pretrained or args.imagenet):
        p.error(
            '--miniworld brings its own detectors, classifier and images: drop --download, --classifier, '
            '--pretrained and --imagenet'
        )
    args.out_dir = osp.abspath(
        args.out_dir or osp.join(REPO, 'work_dirs', 'reproduce_miniworld' if args.miniworld else 'reproduce')
    )
    args.plans_dir = osp.abspath(args.plans_dir or osp.join(args.out_dir, 'plans'))
    return args


def grid(args: argparse.Namespace, world: World) -> list[Cell]:
    backbones = args.backbones or list(world.backbones)
    bad = [b for b in backbones if b not in world.backbones]
    if bad:
        raise UserError(f'--backbones {" ".join(bad)}: the {world.name} grid has {", ".join(world.backbones)}')
    return [Cell(d, b, s) for d in args.detectors for b in backbones for s in SETTINGS if s in args.settings]


# ----------------------------------------------------------------------------- checkpoints
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


# ----------------------------------------------------------------------------- plans
def plan_path(args: argparse.Namespace, backbone: str, k: int) -> str:
    return osp.join(args.plans_dir, f'{backbone}_mp{k}.json')


def plan_commands(args: argparse.Namespace, world: World, cells: list[Cell]) -> dict[tuple[str, int], list[str]]:
    """tools/lrp_plan.py for every plan the MP cells need (checked for classifier weights and images first).

    Always run (not skipped when the plan exists): lrp_plan.py's own score cache, keyed by model,
    weights and image list, makes an unchanged plan cheap and a changed input a new plan.
    """
    needed = sorted({(c.backbone, c.plan_k) for c in cells if c.plan_k})
    if args.reuse_plans:
        missing = [plan_path(args, b, k) for b, k in needed if not osp.isfile(plan_path(args, b, k))]
        if missing:
            raise UserError(
                f'--reuse-plans: {", ".join(missing)} not found; make them (drop --reuse-plans and give '
                f'the classifier) or point --plans-dir at the folder that holds <backbone>_mp<k>.json'
            )
        return {}
    classifiers = parse_pairs(args.classifier, '--classifier', COCO_BACKBONES)
    if isinstance(world, CocoWorld) and needed:
        lacking = sorted({b for b, _ in needed if not args.pretrained and b not in classifiers})
        if lacking:
            names = ', '.join(
                f'--classifier {b}=PATH ({world.paper["classifiers"][b]["timm"]} weights)' for b in lacking
            )
            raise UserError(
                f'MP4/MP6 need LRP plans made from the ImageNet classifier, and no weights were given for '
                f'{", ".join(lacking)}: pass {names}, or --pretrained (timm downloads them), with '
                f'--imagenet DIR. Without them: leave MP4/MP6 out of --settings, or run the random-weight '
                f'placeholder plans, marked as such, with --plans-dir configs/plans --reuse-plans'
            )
        if not args.imagenet or not osp.isdir(args.imagenet):
            raise UserError(
                f'--imagenet {args.imagenet or "(not given)"}: the LRP plans need a folder of ImageNet '
                f'images (e.g. the val split, class folders or flat); pass --imagenet DIR'
            )
    commands = {}
    for backbone, k in needed:
        out = plan_path(args, backbone, k)
        commands[(backbone, k)] = [
            sys.executable,
            osp.join(REPO, 'tools', 'lrp_plan.py'),
            *world.plan_inputs(backbone, classifiers, args),
            '--num-images',
            str(args.lrp_images),
            '--target',
            f'mp{k}',
            '--out',
            out,
            '--plot',
            osp.splitext(out)[0] + '.png',
            '--scores-cache',
            osp.join(args.plans_dir, f'{backbone}.scores.json'),
            '--no-progress',
        ]
    return commands


def plan_info(path: str, digests: Digests) -> dict:
    """What a cell records about its plan; ``placeholder``: made from random weights, not a reproduction."""
    plan = json.load(open(path))
    weights = (plan.get('source') or {}).get('weights') or {}
    return {
        'file': rel(path),
        'sha256': digests(path),
        'weights': weights.get('kind', 'unknown'),
        'placeholder': weights.get('kind') == 'random-init',
        'command': plan.get('command'),
        'budget': {k: (plan.get('budget') or {}).get(k) for k in ('used_bits', 'limit_bits', 'holds')},
    }


# ----------------------------------------------------------------------------- cells
def config_digest(path: str) -> str:
    """Digest of the config as tools/test.py resolves it (its _base_ chain and mmdet:: bases included)."""
    try:
        with warnings.catch_warnings():  # mmengine's pkg_resources deprecation notice, once per config
            warnings.simplefilter('ignore', UserWarning)
            from mmengine.config import Config

            cfg = Config.fromfile(path, import_custom_modules=False)
    except ImportError:
        raise
    except Exception as err:  # a config that does not parse is reported with its name, not a trace
        raise UserError(f'config {rel(path)} cannot be read: {type(err).__name__}: {err}') from None
    return sha256_text(json.dumps(cfg.to_dict(), sort_keys=True, default=str).replace(REPO, '<repo>'))


def evaluation_subset(world: World, n: int, out_dir: str, write: bool = True) -> str:
    """Annotations of the first ``n`` val images: dataset *and* CocoMetric see only those.

    ``test_dataloader.dataset.indices`` alone would leave CocoMetric scoring the unseen images as
    misses (it evaluates every image id of its annotation file), so both read this file instead.
    """
    src = osp.join(world.data_root, world.val_ann)
    path = osp.join(out_dir, 'annotations', f'{osp.splitext(osp.basename(src))[0]}.first{n}.json')
    if not osp.isfile(src) or not write:  # a dry run (perhaps before the miniature world's data exists)
        return path
    data = json.load(open(src))
    images = data['images'][:n]
    ids = {im['id'] for im in images}
    subset = {**data, 'images': images, 'annotations': [a for a in data['annotations'] if a['image_id'] in ids]}
    text = json.dumps(subset)
    if not osp.isfile(path) or open(path).read() != text:
        write_atomic(path, text)
    return path


@dataclass
class Job:
    cell: Cell
    command: list[str]
    key: dict
    record: str  # <out-dir>/cells/<cell>.json
    work_dir: str
    plan: dict | None


def prepare(
    cell: Cell,
    args: argparse.Namespace,
    world: World,
    ckpt: Checkpoint,
    plans: dict,
    val_ann: str,
    digests: Digests,
    configs: dict,
) -> Job:
    """The cell's test.py command and the digest of everything its result depends on."""
    config = world.config(cell)
    if config not in configs:
        configs[config] = config_digest(config)
    work_dir = osp.join(args.out_dir, 'work', cell.name)
    hook = world.hook_options(cell)
    options = list(hook)
    plan = None
    if cell.plan_k:
        path = plans[(cell.backbone, cell.plan_k)]
        plan = plan_info(path, digests) if osp.isfile(path) else None
        options.append(f'custom_hooks.0.plan={path}')
    if args.val_images:
        options += [f'test_dataloader.dataset.ann_file={val_ann}', f'test_evaluator.ann_file={val_ann}']
    command = [
        sys.executable,
        osp.join(REPO, 'tools', 'test.py'),
        config,
        ckpt.path,
        '--work-dir',
        work_dir,
        '--data-root',
        world.data_root,
        *(['--cfg-options', *options] if options else []),
    ]
    key = {
        'config': configs[config],
        'options': hook,
        'checkpoint': ckpt.sha256,
        'plan': plan and plan['sha256'],
        'annotations': digests(val_ann) if osp.isfile(val_ann) else None,
        'val_images': args.val_images,
    }
    return Job(cell, command, key, osp.join(args.out_dir, 'cells', f'{cell.name}.json'), work_dir, plan)


def finished(job: Job) -> tuple[dict | None, str]:
    """The cell's earlier record if its inputs are unchanged, else (None, why it runs)."""
    try:
        record = json.load(open(job.record))
    except FileNotFoundError:
        return None, 'not run yet'
    except (OSError, ValueError):
        return None, 'its record is unreadable'
    changed = [k for k in job.key if record.get('key', {}).get(k) != job.key[k]]
    return (record, '') if not changed else (None, f'changed: {", ".join(changed)}')


def execute(job: Job, threads: int | None, gpu: str | None = None) -> dict:
    """Run the cell's tools/test.py; its record (numbers, quantization report, command, inputs' digest).

    ``gpu``: the one GPU the cell's process may see (CUDA_VISIBLE_DEVICES), None to leave it as is."""
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
    t0 = time.time()
    log = osp.join(job.work_dir, 'log.txt')
    metrics_file = osp.join(job.work_dir, 'metrics.json')
    if osp.isfile(metrics_file):
        os.remove(metrics_file)  # an old run's numbers must not be read as this one's
    proc = run_tool(job.command, log_path=log, env=env)
    if proc.returncode != 0 or not osp.isfile(metrics_file):
        tail = ''.join(open(log).readlines()[-15:])
        raise RuntimeError(f'exit {proc.returncode}; log: {rel(log)}\n{tail}')
    result = json.load(open(metrics_file))
    m, q = result['metrics'], result.get('quantization') or {}
    if 'coco/bbox_mAP' not in m or 'coco/segm_mAP' not in m:
        raise RuntimeError(
            f'{rel(metrics_file)} has no coco/bbox_mAP and coco/segm_mAP (got {sorted(m)}); log: {rel(log)}'
        )
    totals = q.get('totals') or {}
    record = {
        'cell': job.cell.name,
        'model': job.cell.model,
        'detector': job.cell.detector,
        'backbone': job.cell.backbone,
        'setting': job.cell.setting,
        'box_ap': 100 * m['coco/bbox_mAP'],
        'mask_ap': 100 * m['coco/segm_mAP'],
        'avg_w_bits': totals.get('avg_weight_bits', 32.0 if not q else None),
        'avg_a_bits': totals.get('avg_act_bits', 32.0 if not q else None),
        'weight_mb': totals.get('weight_mb'),
        'gbops': totals['bops'] / 1e9 if 'bops' in totals else None,
        'scope': (q.get('settings') or {}).get('scope'),
        'calibration_ids': q.get('calibration_ids'),
        'plan': job.plan,
        'val_images': job.key['val_images'],
        'seconds': round(time.time() - t0, 1),
        'gpu': gpu,
        'command': show(job.command),
        'metrics': m,
        'key': job.key,
        'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    write_atomic(job.record, json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- tables
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


# ----------------------------------------------------------------------------- main
def make_plans(makers: dict[tuple[str, int], list[str]], log) -> None:
    """Run tools/lrp_plan.py for each plan; a failure stops the run (its MP cells could not mean anything)."""
    for (backbone, k), cmd in makers.items():
        log(f'plan {backbone} MP{k}: {show(cmd)}')
        proc = run_tool(cmd)
        if proc.returncode != 0:
            raise UserError(
                f'tools/lrp_plan.py failed for {backbone} MP{k}: {(proc.stderr or proc.stdout).strip()[-1500:]}'
            )
        log(f'  {proc.stdout.strip().splitlines()[-2] if proc.stdout.strip() else "done"}')


def warn_placeholders(plans: dict[tuple[str, int], str], digests: Digests, log) -> None:
    """Random-weight plans may run, but never silently: they are no reproduction of the paper."""
    placeholders = [p for p in dict.fromkeys(plans.values()) if osp.isfile(p) and plan_info(p, digests)['placeholder']]
    if placeholders:
        bar = '!' * 100
        log(
            f'{bar}\nWARNING: {", ".join(rel(p) for p in placeholders)} come from RANDOM classifier weights '
            f'(placeholders).\nTheir MP cells run, but are marked † and are NOT a reproduction of the paper; make '
            f'real plans with --classifier/--pretrained and --imagenet.\n{bar}'
        )


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs)."""
    listed = os.environ.get('CUDA_VISIBLE_DEVICES')
    if listed is not None:
        return [g.strip() for g in listed.split(',') if g.strip() and not g.strip().startswith('-')]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch or no driver: no GPU to spread over
        return []


def gpu_slots(gpus: list[str], jobs: int) -> list[str | None]:
    """One GPU per job slot, round-robin (more jobs than GPUs share them evenly); [None]*jobs without GPUs."""
    if not gpus:
        return [None] * jobs
    return [gpus[i % len(gpus)] for i in range(jobs)]


def run_cells(todo: list[tuple[Job, str]], jobs: int, rows: dict, log, gpus: list[str] | None = None) -> None:
    """Each cell in its own tools/test.py process, ``jobs`` at a time; a failed cell is reported, not fatal.

    With GPUs, each running process sees exactly one (CUDA_VISIBLE_DEVICES), taken from a pool of
    ``jobs`` slots spread round-robin over ``gpus``, and gives it back when its cell ends."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    slots: queue.Queue = queue.Queue()
    for slot in gpu_slots(gpus or [], jobs):
        slots.put(slot)

    def run_one(item: tuple[Job, str]) -> None:
        job, why = item
        gpu = slots.get()
        log(f'run {job.cell.name} ({why}){"" if gpu is None else f" on GPU {gpu}"}: {show(job.command)}')
        try:
            row = rows[job.cell] = dict(execute(job, threads, gpu), reused=False)
            log(f'done {job.cell.name}: box {row["box_ap"]:.1f} mask {row["mask_ap"]:.1f} ({row["seconds"]:.0f}s)')
        except RuntimeError as err:
            rows[job.cell] = {
                'cell': job.cell.name,
                'model': job.cell.model,
                'detector': job.cell.detector,
                'backbone': job.cell.backbone,
                'setting': job.cell.setting,
                'failed': str(err),
                'plan': job.plan,
                'reused': False,
            }
            log(f'FAILED {job.cell.name}: {err}')
        finally:
            slots.put(gpu)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run_one, todo))


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


def reproduce(args: argparse.Namespace) -> int:
    start = time.time()

    def log(msg: str) -> None:
        print(f'[{time.time() - start:6.0f}s] {msg}', flush=True)

    world: World = MiniWorld() if args.miniworld else CocoWorld(args.coco_root)
    cells = grid(args, world)
    digests = Digests(osp.join(args.out_dir, 'digests.json'), remember=not args.dry_run)  # a dry run writes nothing
    # every input is checked before anything slow happens (a download, the data generation, a plan)
    world.check_data(cells)
    makers = plan_commands(args, world, cells)
    checkpoints, prep_commands = resolve_checkpoints(
        args, world, list(dict.fromkeys(c.model for c in cells)), digests, log
    )
    if args.dry_run:
        if args.miniworld and not osp.isdir(mini.DATA):
            print(f'# {rel(mini.DATA)} is missing: a run generates it first (tools/miniworld/generate.py)')
        for cmd in prep_commands:
            print(f'download {cmd[1]} -> {cmd[2]}' if cmd[0] == 'download' else show(cmd))
        for cmd in makers.values():
            print(show(cmd))
    else:
        if args.miniworld:
            mini.ensure_data(log)
        make_plans(makers, log)
    plans = {(c.backbone, c.plan_k): plan_path(args, c.backbone, c.plan_k) for c in cells if c.plan_k}
    warn_placeholders(plans, digests, log)
    val_ann = osp.join(world.data_root, world.val_ann)
    if args.val_images:
        val_ann = evaluation_subset(world, args.val_images, args.out_dir, write=not args.dry_run)
    configs: dict[str, str] = {}
    jobs = [
        prepare(c, args, world, checkpoints[c.model], plans, val_ann, digests, configs)
        for c in cells
        if c.model in checkpoints
    ]
    todo, rows = [], {}
    for job in jobs:
        record, why = (None, 'forced') if args.force else finished(job)
        if record is not None:
            rows[job.cell] = dict(record, reused=True)
            log(f'reuse {job.cell.name}: box {record["box_ap"]:.1f} mask {record["mask_ap"]:.1f} (inputs unchanged)')
        else:
            todo.append((job, why))
    if args.dry_run:
        for job, why in todo:
            print(f'# {job.cell.name}: {why}\n{show(job.command)}')
        pending = [c.name for c in cells if c.model not in checkpoints]
        if pending:
            print(f'# after the downloads: {", ".join(pending)}')
        print(
            f'dry run: {len(todo) + len(pending)} cells would run, {len(rows)} are finished; {args.jobs} at a time'
            + (f', one GPU each from {",".join(args.gpus)}' if args.gpus else '')
        )
        return 0
    run_cells(todo, args.jobs, rows, log, args.gpus)
    ordered = [rows[j.cell] for j in jobs]
    table = write_results(args, world, ordered, time.time() - start)
    failed = [r['cell'] for r in ordered if r.get('failed')]
    ran = sum(not r['reused'] for r in ordered) - len(failed)
    print(
        f'\n{table}\n\ncells: {ran} ran, {sum(r["reused"] for r in ordered)} reused, {len(failed)} failed; '
        f'results.md, results.json and results.png in {rel(args.out_dir)}/ ({time.time() - start:.0f}s)'
    )
    if failed:
        print(f'failed cells (rerun to retry them): {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        if args.print_paper:
            print(paper_table(json.load(open(PAPER))))
            return 0
        return reproduce(args)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except ImportError as err:  # mmengine/matplotlib live in the project's environment
        print(
            f'error: {err}; run with the project environment: .venv/bin/python tools/reproduce.py (make install)',
            file=sys.stderr,
        )
        return 2


if __name__ == '__main__':
    sys.exit(main())
