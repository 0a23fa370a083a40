"""Rasterizing the miniature world: shape masks and procedural backgrounds (NumPy + PIL only).

Every function takes an explicit ``numpy.random.Generator`` so that an image is a pure function
of its seed; nothing here loops over pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Order defines the COCO category ids (1-based) and the classifier's label indices (0-based).
CLASSES: tuple[str, ...] = ('circle', 'square', 'triangle', 'pentagon', 'hexagon', 'star', 'cross', 'ring')
# Each class has a characteristic surface pattern (as real categories have typical textures), in a
# random colour, scale, phase and orientation. Outline-only classes proved too slow to learn for a
# small Swin trained from scratch within a CPU budget (it memorizes backgrounds and stays at chance
# for tens of thousands of images). With the patterns a small ConvNet learns the classification split
# in minutes (README, `train_classifier.py --arch cnn`); the tiny Swin is still slow on it. Outlines
# still decide boxes and masks.
PATTERNS: dict[str, str] = dict(
    circle='rings',
    square='checker',
    triangle='stripes',
    pentagon='dots',
    hexagon='grid',
    star='speckle',
    cross='zigzag',
    ring='plain',
)

_RING_INNER = 0.55  # inner/outer radius: a thick ring, so that its hole survives 224-px rendering
_STAR_INNER = 0.45
_CROSS_ARM = 0.36  # half arm width relative to the radius


def _polygon_at(angles: np.ndarray, radii: np.ndarray | float) -> np.ndarray:
    """Vertices at ``angles`` (counter-clockwise on screen, 0 = right) and ``radii``; y points down."""
    return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)


def _regular_polygon(n: int, radius: float) -> np.ndarray:
    # a vertex on top, so that a pentagon is not mistaken for a rotated hexagon
    return _polygon_at(np.pi / 2 + 2 * np.pi * np.arange(n) / n, radius)


def _star(radius: float) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(10) / 5  # outer and inner vertices alternate
    return _polygon_at(angles, np.where(np.arange(10) % 2 == 0, radius, radius * _STAR_INNER))


def _cross(radius: float) -> np.ndarray:
    a, r = _CROSS_ARM * radius, radius
    return np.array(
        [[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]]
    )


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _outline(name: str, radius: float) -> np.ndarray:
    """Polygon vertices (centred at 0) of the polygonal classes."""
    if name == 'square':
        return _regular_polygon(4, radius) @ _rotation(np.pi / 4).T
    if name in ('triangle', 'pentagon', 'hexagon'):
        return _regular_polygon({'triangle': 3, 'pentagon': 5, 'hexagon': 6}[name], radius)
    if name == 'star':
        return _star(radius)
    if name == 'cross':
        return _cross(radius)
    raise KeyError(name)


def shape_mask(
    name: str, center: tuple[float, float], radius: float, angle: float, size: tuple[int, int]
) -> np.ndarray:
    """Boolean (H, W) mask of one shape with circumradius ``radius`` rotated by ``angle`` radians."""
    height, width = size
    cx, cy = center
    if name in ('circle', 'ring'):
        yy, xx = np.ogrid[:height, :width]
        d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
        mask = d2 <= radius**2
        if name == 'ring':
            mask &= d2 > (_RING_INNER * radius) ** 2
        return mask
    vertices = _outline(name, radius) @ _rotation(angle).T + np.array([cx, cy])
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(v) for v in vertices.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    height, width = size
    coarse = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    planes = [
        np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.BICUBIC), dtype=np.float32)
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1) / 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(60, 190)
    return np.clip(grey + rng.normal(0, 30, 3), 0, 255).astype(np.float32)


def background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A float32 (H, W, 3) texture in [0, 255]: noise, stripes, gradient or checkerboard, plus grain.

    Textures with edges (stripes, checkerboard) are kept low-contrast: at full contrast their edges and
    corners compete with the shapes' outlines and a small Swin trained from scratch stays at chance.
    """
    height, width = size
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    c0 = _muted_colour(rng)
    kind = rng.integers(4)
    if kind == 2:  # linear gradient: no edges, any two colours
        c1 = _muted_colour(rng)
    else:
        c1 = np.clip(c0 + rng.normal(0, 25, 3), 0, 255).astype(np.float32)
    if kind == 0:  # blotchy value noise
        t = _smooth_noise(rng, size, int(rng.integers(3, 12)), 3)
        image = c0 + (t - 0.5) * rng.uniform(25, 70)
    else:
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        if kind == 1:  # soft stripes
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(8, 40) + rng.uniform(0, 2 * np.pi))
        elif kind == 2:  # linear gradient
            t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        else:  # rotated checkerboard
            cell = rng.uniform(10, 40)
            t = ((np.floor(u / cell) + np.floor(v / cell)) % 2) * 0.8 + 0.1
        image = c0 + t[..., None] * (c1 - c0)
    image = image + rng.normal(0, rng.uniform(2, 10), (height, width, 3))
    return np.clip(image, 0, 255).astype(np.float32)


def object_colour(rng: np.random.Generator, backdrop: np.ndarray) -> np.ndarray:
    """A saturated RGB colour that stands out from ``backdrop`` (the mean colour under the shape)."""
    best, best_dist = None, -1.0
    for _ in range(8):
        hue, sat, val = rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)
        k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6  # HSV -> RGB, piecewise-linear form
        colour = 255 * val * (1 - sat * np.clip(np.minimum(k, 4 - k), 0, 1))
        dist = float(np.linalg.norm(colour - backdrop))
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist > 90:
            break
    return best.astype(np.float32)


def surface_pattern(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness modulation in [-1, 1] at object-frame coordinates ``(u, v)`` (pixels, rotated)."""
    period = rng.uniform(5.0, 8.0)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 'plain':
        return np.zeros_like(u)
    if kind == 'stripes':
        return np.sign(np.sin(2 * np.pi * u / period + phase))
    if kind == 'checker':
        return np.sign(np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period))
    if kind == 'dots':
        return np.where(np.cos(2 * np.pi * u / period + phase) * np.cos(2 * np.pi * v / period) > 0.5, 1.0, -0.3)
    if kind == 'grid':
        lines = np.maximum(np.abs(np.cos(np.pi * u / period + phase)), np.abs(np.cos(np.pi * v / period)))
        return np.where(lines > 0.9, -1.0, 0.3)
    if kind == 'rings':
        return np.sign(np.sin(2 * np.pi * np.hypot(u, v) / period + phase))
    if kind == 'zigzag':
        tri = np.abs((v / period) % 2 - 1)  # triangle wave across v
        return np.sign(np.sin(2 * np.pi * (u + 0.8 * period * tri) / period + phase))
    if kind == 'speckle':
        return np.clip(rng.normal(0, 0.8, u.shape), -1, 1)
    raise KeyError(kind)


def paint(
    image: np.ndarray,
    mask: np.ndarray,
    colour: np.ndarray,
    rng: np.random.Generator,
    pattern: str = 'plain',
    center: tuple[float, float] = (0.0, 0.0),
) -> None:
    """Fill ``mask`` in place with ``colour`` under a gentle linear shading and the class' surface
    ``pattern`` (in the object's frame, centred at ``center``, randomly oriented)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-8
    proj = xs * direction[0] + ys * direction[1]
    span = max(float(proj.max() - proj.min()), 1.0)
    shade = 1.0 + rng.uniform(0.1, 0.3) * ((proj - proj.min()) / span - 0.5)
    theta = rng.uniform(0, np.pi)
    dx, dy = xs + 0.5 - center[0], ys + 0.5 - center[1]
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    shade = shade * (1.0 + rng.uniform(0.2, 0.35) * surface_pattern(pattern, u, v, rng))
    image[ys, xs] = np.clip(colour[None, :] * shade[:, None], 0, 255)
