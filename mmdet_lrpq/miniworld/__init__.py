"""The miniature world: a seeded, procedural COCO-format dataset of shapes (plus a classification
variant) on which the whole classifier -> detector -> PTQ pipeline runs offline.

Pure NumPy/PIL/pycocotools: importing it never imports MMDetection.
"""

from .dataset import (
    CLASSIFICATION_SPLITS,
    DEFAULT_SIZES,
    DETECTION_SPLITS,
    generate,
    render_classification_image,
    render_detection_image,
    write_classification_split,
    write_detection_split,
)
from .provenance import command_line
from .render import CLASSES
from .scenes import IMAGE_SIZE, Instance, classification_scene, detection_scene

__all__ = [
    'CLASSES',
    'command_line',
    'IMAGE_SIZE',
    'Instance',
    'DETECTION_SPLITS',
    'CLASSIFICATION_SPLITS',
    'DEFAULT_SIZES',
    'generate',
    'detection_scene',
    'classification_scene',
    'render_detection_image',
    'render_classification_image',
    'write_detection_split',
    'write_classification_split',
]
