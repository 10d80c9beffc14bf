"""The registry of dataset sources, selected by name (``DATASET=`` in make, ``--dataset`` in the CLI)."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from .base import GROUPS, DataError, Source, Split, class_groups, longtail_counts

# name -> module with a ``load(root, imbalance) -> Source`` function. Modules are imported on use so a
# missing optional reader never breaks the others.
SOURCES = {
    "fmnist-lt": "pipeline.data.sources.fmnist",
    "cifar100-lt": "pipeline.data.sources.cifar",
    "imagenet-lt": "pipeline.data.sources.imagenet_lt",
    "inat2018": "pipeline.data.sources.inat",
    "glyph-lt": "pipeline.data.sources.glyph",
}
TAKES_CLASSES = ("glyph-lt",)  # sources whose class count is a setting (``classes=``)
IMBALANCE_FACTORS = (10, 50, 100)


def load_source(name: str, root: str | Path | None = None, imbalance: float = 100, classes: int = 0) -> Source:
    """Load dataset ``name`` from ``root`` (or its default place), with ``classes`` classes where the source
    takes a class count (0: its own). Unknown names list the known ones."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(SOURCES)}")
    module = import_module(SOURCES[name])
    if name in TAKES_CLASSES:
        return module.load(Path(root) if root else None, imbalance=imbalance, classes=classes)
    if classes:
        raise DataError(f"classes={classes}: {name} has a fixed class count; classes= applies to "
                        f"{', '.join(TAKES_CLASSES)} only")
    return module.load(Path(root) if root else None, imbalance=imbalance)


__all__ = ["GROUPS", "DataError", "Source", "Split", "SOURCES", "class_groups", "load_source",
           "longtail_counts", "IMBALANCE_FACTORS"]
