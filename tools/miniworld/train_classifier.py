"""Train the miniature world's "ImageNet classifier": a tiny timm Swin on the classification split.

Besides the image-level cross-entropy, every final-stage token whose 32x32 cell lies mostly on the
labelled shape is trained to predict the label through the same head (token labeling, as in
LV-ViT). The network, and how it classifies (pooled tokens -> head), are unchanged. On this data a
tiny Swin from scratch stays near chance for a few hundred iterations with or without the token
loss (docs/miniworld.md, *Why the classifier needs a teacher*); ``--teacher`` adds FitNets feature hints from a
ConvNet trained by this same tool (``--arch cnn``), which also serves as the baseline showing what
the data asks of a network.

    python tools/miniworld/train_classifier.py [--data-root data/miniworld] [--epochs 4]
        [--out checkpoints/miniworld/swin_mini_cls.pth]
    python tools/miniworld/train_classifier.py --arch cnn --out work_dirs/miniworld/cnn_baseline.pth
    python tools/miniworld/train_classifier.py --teacher work_dirs/miniworld/cnn_baseline.pth ...

The checkpoint holds the ``state_dict`` and a ``meta`` dict (architecture and model kwargs, class
names, normalization, validation accuracy per epoch, the command; for a guided Swin also the
teacher and hint pairs), so that LRP and the timm -> mmdet conversion can rebuild the exact model.
Plain PyTorch loop, CPU by default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdet_lrpq.cli import add_threads_arg
from mmdet_lrpq.miniworld import command_line

# Same layout as the mmdet backbone in configs/miniworld/ (embed_dims, depths, num_heads, window_size);
# always_partition makes timm's windows identical to mmdet's, 224 px makes every stage 7-divisible.
MODEL_KWARGS: dict = dict(
    img_size=224,
    patch_size=4,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    window_size=7,
    mlp_ratio=4.0,
    always_partition=True,
    strict_img_size=False,
)
# mmdet's DetDataPreprocessor normalization (ImageNet statistics, RGB), so detector and classifier see
# the same input distribution.
MEAN_RGB = (123.675, 116.28, 103.53)
TOKEN_CELL = 32  # pixels per final-stage token (patch 4, three 2x patch mergings)
IGNORE = -100
# Training defaults per --arch (explicit flags override them).
ARCH_DEFAULTS = dict(
    swin=dict(epochs=4, batch_size=64, weight_decay=0.05, warmup_iters=100),
    cnn=dict(epochs=3, batch_size=32, weight_decay=0.0, warmup_iters=0),
)
STD_RGB = (58.395, 57.12, 57.375)


def build_classifier(num_classes: int, drop_path_rate: float = 0.0) -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(num_classes=num_classes, drop_path_rate=drop_path_rate, **MODEL_KWARGS)


class ConvNet(torch.nn.Module):
    """A plain 5-block BatchNorm CNN (conv3x3 - BN - ReLU - max-pool 2, widths 16-32-64-64-128), the
    baseline that shows what the classification split asks of a network, and the feature teacher
    of the Swin (``--teacher``). ``stages(x)`` returns the five block outputs (strides 2 ... 32)."""

    WIDTHS = (16, 32, 64, 64, 128)

    def __init__(self, num_classes: int):
        super().__init__()
        nn, blocks, c_in = torch.nn, [], 3
        for c in self.WIDTHS:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x)[-1].mean((2, 3)))


def swin_stages(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm Swin's four stage outputs (N, h, w, C) for normalized images, the last one before the final norm."""
    x = model.patch_embed(x)
    out = []
    for layer in model.layers:
        x = layer(x)
        out.append(x)
    return out


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a classification split as uint8 (N, 3, H, W) and their labels (the set is small)."""
    lines = (root / 'annotations' / f'{split}.txt').read_text().split('\n')
    entries = [line.rsplit(' ', 1) for line in lines if line]
    images = np.stack([np.asarray(Image.open(root / name).convert('RGB')) for name, _ in entries])
    labels = torch.tensor([int(label) for _, label in entries])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load_token_targets(root: Path, split: str, labels: torch.Tensor, cell: int = TOKEN_CELL) -> torch.Tensor:
    """(N, H/cell, W/cell) token labels: the image label where the labelled shape (the largest
    instance) covers at least half of the cell, else ``IGNORE``."""
    from pycocotools import mask as mask_utils

    coco = json.loads((root / 'annotations' / f'instances_{split}.json').read_text())
    largest: dict[int, dict] = {}
    for ann in coco['annotations']:
        if ann['image_id'] not in largest or ann['area'] > largest[ann['image_id']]['area']:
            largest[ann['image_id']] = ann
    targets = []
    for image, label in zip(coco['images'], labels.tolist()):
        mask = mask_utils.decode(largest[image['id']]['segmentation']).astype(np.float32)
        h, w = mask.shape
        cover = mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))
        targets.append(np.where(cover >= 0.5, label, IGNORE))
    return torch.from_numpy(np.stack(targets)).long()


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
    return (images.float() - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> float:
    model.eval()
    correct = sum(
        int((model(normalize(images[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def augment(
    images: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal/vertical flips and transposition (every class is invariant to them), applied
    alike to the (N, 3, H, W) images and their (N, h, w) token labels."""
    flip_h = torch.rand(len(images), generator=generator) < 0.5
    flip_v = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip_h.view(-1, 1, 1, 1), images.flip(3), images)
    tokens = torch.where(flip_h.view(-1, 1, 1), tokens.flip(2), tokens)
    images = torch.where(flip_v.view(-1, 1, 1, 1), images.flip(2), images)
    tokens = torch.where(flip_v.view(-1, 1, 1), tokens.flip(1), tokens)
    if torch.rand(1, generator=generator) < 0.5:
        images, tokens = images.transpose(2, 3), tokens.transpose(1, 2)
    return images, tokens


class FeatureHints(torch.nn.Module):
    """FitNets hints (Romero et al., 2015): each chosen Swin stage regresses, through a learned linear
    map, the teacher CNN's block output of the same resolution, RMS-normalized per channel.

    Only the Swin's training is guided; the regressors are dropped afterwards and the classifier's
    network is unchanged. ``pairs`` are ``(swin stage, teacher block)`` indices, e.g. ``(1, 2)``:
    Swin stage 2 (stride 8, 28x28 at 224 px) learns from CNN block 3 (stride 8).
    """

    def __init__(self, pairs: tuple[tuple[int, int], ...], swin_widths: list[int], teacher_widths: tuple[int, ...]):
        super().__init__()
        self.pairs = tuple(pairs)
        self.regressors = torch.nn.ModuleList(torch.nn.Linear(swin_widths[s], teacher_widths[t]) for s, t in self.pairs)

    def forward(self, swin: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        losses = []
        for (s, t), regressor in zip(self.pairs, self.regressors):
            target = teacher[t].permute(0, 2, 3, 1)  # NCHW -> NHWC like timm's stages
            if target.shape[1:3] != swin[s].shape[1:3]:
                raise ValueError(
                    f'hint pair {s}:{t}: Swin stage {s} is {tuple(swin[s].shape[1:3])} but teacher '
                    f'block {t} is {tuple(target.shape[1:3])}; pair stages of equal stride'
                )
            target = target / target.pow(2).mean((0, 1, 2), keepdim=True).add(1e-6).sqrt()
            losses.append(F.mse_loss(regressor(swin[s]), target))
        return torch.stack(losses).sum()


def classification_losses(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    teacher: torch.nn.Module | None = None,
    hints: FeatureHints | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-level and token-level cross-entropy (tokens go through the same head as the pooled
    feature) and, with a teacher, the feature-hint loss."""
    x = normalize(images)
    stages = swin_stages(model, x)
    features = model.norm(stages[-1])  # (N, h, w, C), timm Swin is NHWC
    image_loss = F.cross_entropy(model.forward_head(features), labels)
    token_logits = model.head.fc(features)  # (N, h, w, classes)
    token_loss = F.cross_entropy(token_logits.permute(0, 3, 1, 2), tokens, ignore_index=IGNORE)
    hint_loss = image_loss.new_zeros(())
    if hints is not None:
        with torch.no_grad():
            teacher_stages = teacher.stages(x)
        hint_loss = hints(stages, teacher_stages)
    return image_loss, token_loss, hint_loss


def load_teacher(path: str, num_classes: int) -> torch.nn.Module:
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'--teacher {path} does not exist; train it with '
            f'`python tools/miniworld/train_classifier.py --arch cnn --out {path}`'
        )
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    arch = ckpt.get('meta', {}).get('arch')
    if arch != 'ConvNet':
        raise ValueError(f"--teacher {path} is not a ConvNet checkpoint of this tool (meta['arch'] is {arch!r})")
    teacher = ConvNet(num_classes)
    teacher.load_state_dict(ckpt['state_dict'])
    return teacher.eval().requires_grad_(False)


def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(v) for v in item.split(':')) for item in text.split(',') if item)
    except ValueError:
        pairs = ((),)
    if not pairs or any(len(p) != 2 or not 0 <= p[0] < 4 or not 0 <= p[1] < 5 for p in pairs):
        raise argparse.ArgumentTypeError(
            f'--hint-pairs wants SWIN_STAGE:CNN_BLOCK[,...] with stages 0..3 and blocks 0..4, e.g. 1:2; got {text!r}'
        )
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-root', default='data/miniworld')
    parser.add_argument(
        '--arch',
        choices=('swin', 'cnn'),
        default='swin',
        help='swin: the tiny timm Swin (the classifier the detectors start from); cnn: the '
        'ConvNet baseline / feature teacher (image loss only)',
    )
    parser.add_argument(
        '--teacher', help='ConvNet checkpoint (--arch cnn) whose features guide the Swin (FitNets hints)'
    )
    parser.add_argument('--hint-weight', type=float, default=1.0)
    parser.add_argument(
        '--hint-pairs',
        type=parse_pairs,
        default=((0, 1), (1, 2), (2, 3)),
        help='SWIN_STAGE:CNN_BLOCK pairs of equal stride (default 0:1,1:2,2:3: Swin stages '
        '1-3 learn from ConvNet blocks 2-4, strides 4, 8, 16)',
    )
    parser.add_argument('--out', default='checkpoints/miniworld/swin_mini_cls.pth')

    def per_arch(key: str) -> str:
        return 'default: ' + ', '.join(f'{d[key]} ({arch})' for arch, d in ARCH_DEFAULTS.items())

    parser.add_argument('--epochs', type=int, help=per_arch('epochs'))
    parser.add_argument('--batch-size', type=int, help=per_arch('batch_size'))
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, help=per_arch('weight_decay'))
    parser.add_argument('--warmup-iters', type=int, help=per_arch('warmup_iters'))
    parser.add_argument('--drop-path-rate', type=float, default=0.1)
    parser.add_argument('--token-loss-weight', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    add_threads_arg(parser)
    parser.add_argument('--max-iters', type=int, default=None, help='stop early (smoke tests)')
    args = parser.parse_args(argv)
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(args.data_root)
    classes = (root / 'annotations' / 'classes.txt').read_text().split()
    start = time.time()
    train_x, train_y = load_split(root, 'cls_train')
    train_tokens = load_token_targets(root, 'cls_train', train_y)
    val_x, val_y = load_split(root, 'cls_val')
    print(f'loaded {len(train_x)} train / {len(val_x)} val images in {time.time() - start:.1f}s', flush=True)

    teacher = hints = None
    if args.arch == 'cnn':
        if args.teacher:
            parser.error('--teacher guides the Swin; it does not apply to --arch cnn')
        model = ConvNet(len(classes))
    else:
        model = build_classifier(len(classes), args.drop_path_rate)
        if args.teacher:
            teacher = load_teacher(args.teacher, len(classes))
            hints = FeatureHints(args.hint_pairs, [model.embed_dim * 2**i for i in range(4)], ConvNet.WIDTHS)
    trained = list(model.named_parameters()) + (list(hints.named_parameters()) if hints is not None else [])
    decayed = {True: [], False: []}  # weight decay on matrices only, not on norms, biases, position tables
    for name, param in trained:
        decayed[param.ndim > 1 and 'relative_position_bias_table' not in name].append(param)
    optimizer = torch.optim.AdamW(
        [dict(params=decayed[True], weight_decay=args.weight_decay), dict(params=decayed[False], weight_decay=0.0)],
        lr=args.lr,
    )
    iters_per_epoch = len(train_x) // args.batch_size
    total = (
        iters_per_epoch * args.epochs if args.max_iters is None else min(args.max_iters, iters_per_epoch * args.epochs)
    )

    def schedule(it: int) -> float:
        return min(1.0, (it + 1) / max(args.warmup_iters, 1)) * 0.5 * (1 + math.cos(math.pi * it / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    it, train_start = 0, time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for b in range(iters_per_epoch):
            if it >= total:
                break
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            images, tokens = augment(train_x[idx], train_tokens[idx], generator)
            if args.arch == 'cnn':
                image_loss = F.cross_entropy(model(normalize(images)), train_y[idx])
                token_loss = hint_loss = image_loss.new_zeros(())
            else:
                image_loss, token_loss, hint_loss = classification_losses(
                    model, images, train_y[idx], tokens, teacher, hints
                )
            loss = image_loss + args.token_loss_weight * token_loss + args.hint_weight * hint_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            it += 1
            if it % 20 == 0 or it == total:
                elapsed = time.time() - train_start
                print(
                    f'epoch {epoch + 1}/{args.epochs} iter {it}/{total} loss {image_loss.item():.4f} '
                    f'token loss {token_loss.item():.4f} hint loss {hint_loss.item():.4f} '
                    f'lr {scheduler.get_last_lr()[0]:.2e} {elapsed / it:.2f}s/iter '
                    f'eta {elapsed / it * (total - it) / 60:.1f}min',
                    flush=True,
                )
        val_acc = accuracy(model, val_x, val_y)
        history.append(dict(epoch=epoch + 1, iter=it, val_acc=val_acc))
        print(f'epoch {epoch + 1}: val accuracy {val_acc:.4f}', flush=True)
        if it >= total:
            break
    train_seconds = time.time() - train_start
    arch = dict(
        swin=dict(
            arch='timm.models.swin_transformer.SwinTransformer',
            model_kwargs=dict(MODEL_KWARGS, num_classes=len(classes)),
        ),
        cnn=dict(arch='ConvNet', model_kwargs=dict(num_classes=len(classes))),
    )[args.arch]
    guidance = (
        dict(teacher=args.teacher, hint_weight=args.hint_weight, hint_pairs=[list(p) for p in args.hint_pairs])
        if args.teacher
        else {}
    )
    meta = dict(
        **arch,
        classes=classes,
        **guidance,
        mean_rgb=MEAN_RGB,
        std_rgb=STD_RGB,
        val_accuracy=history[-1]['val_acc'],
        history=history,
        iters=it,
        batch_size=args.batch_size,
        lr=args.lr,
        token_loss_weight=args.token_loss_weight,
        seed=args.seed,
        train_seconds=round(train_seconds, 1),
        command=command_line(__file__, argv),
    )
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    torch.save(dict(state_dict=model.state_dict(), meta=meta), args.out)
    print(json.dumps(dict(out=args.out, val_accuracy=meta['val_accuracy'], train_seconds=meta['train_seconds'])))


if __name__ == '__main__':
    main()
