"""Task families for meta-training, by the ``kind`` a family's config names.

    base.py    what PES needs from a task (``Task``), the data windows fused families share,
               and the inner optimizer every task trains with (the harness's)
    image.py   ``image_mlp``: MLPs on 8x8 image sets (recipes/metatrain/image_datasets.py)
    lm.py      ``lm``: small GPTs on a token corpus

The families import only ``base``; this registry imports the families.
"""
from __future__ import annotations

from recipes.metatrain.config import FamilyConfig
from recipes.metatrain.tasks.base import Task
from recipes.metatrain.tasks.image import ImageMLP
from recipes.metatrain.tasks.lm import TinyLM

# Keyed by FamilyConfig.kind (config.FAMILY_KINDS), the name configs and checkpoints record.
FAMILIES: dict[str, type[Task]] = {"image_mlp": ImageMLP, "lm": TinyLM}


def build_task(family: FamilyConfig) -> Task:
    """The task of ``family``, on its train split."""
    if family.kind not in FAMILIES:
        raise ValueError(f"unknown task family kind {family.kind!r}")
    return FAMILIES[family.kind](family)
