"""The corpora data.prepare knows by name, and the share of documents held out for validation by default.

Below the preparation code, so that shards.py can name a folder's preset in its hints."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_VAL_FRACTION = 0.01


@dataclass(frozen=True)
class Preset:
    dataset: str | None  # None: the bundled corpus
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    val_fraction: float = DEFAULT_VAL_FRACTION
    about: str = ""


PRESETS: dict[str, Preset] = {
    "fineweb-edu": Preset(
        "HuggingFaceFW/fineweb-edu", "sample-10BT", about="FineWeb-Edu, 10B-token sample (~100 shards)"
    ),
    "fineweb": Preset("HuggingFaceFW/fineweb", "sample-10BT", about="FineWeb, 10B-token sample (~100 shards)"),
    "openwebtext": Preset(
        "Skylion007/openwebtext", None, val_fraction=0.0005, about="OpenWebText, ~9B tokens, nanoGPT's val fraction"
    ),
    "shakespeare": Preset(None, about="Shakespeare's 38 plays, bundled with the project (no download)"),
}
