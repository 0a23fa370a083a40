"""The grid of cells (detector x backbone x setting) and the two worlds its inputs come from: COCO 2017
with the official detectors and the paper's numbers, or the offline miniature world."""

from __future__ import annotations

import argparse
import json
import os.path as osp
from dataclasses import dataclass

from mmdet_lrpq.miniworld import experiments as mini  # the miniature world's data, detectors and classifier

from .common import PAPER, REPO, UserError

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


def coco_config(cell: Cell) -> str:
    """FP: the float base config; otherwise the config of that setting (its hook options inside)."""
    if cell.setting == 'FP':
        return osp.join(REPO, 'configs', '_base_', f'{cell.model}.py')
    return osp.join(REPO, 'configs', f'{cell.model}_{cell.setting.lower()}.py')


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


def grid(args: argparse.Namespace, world: World) -> list[Cell]:
    backbones = args.backbones or list(world.backbones)
    bad = [b for b in backbones if b not in world.backbones]
    if bad:
        raise UserError(f'--backbones {" ".join(bad)}: the {world.name} grid has {", ".join(world.backbones)}')
    return [Cell(d, b, s) for d in args.detectors for b in backbones for s in SETTINGS if s in args.settings]
