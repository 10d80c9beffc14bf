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
}
IMBALANCE_FACTORS = (10, 50, 100)


def load_source(name: str, root: str | Path | None = None, imbalance: float = 100) -> Source:
    """Load dataset ``name`` from ``root`` (or its default place). Unknown names list the known ones."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(SOURCES)}")
    module = import_module(SOURCES[name])
    return module.load(Path(root) if root else None, imbalance=imbalance)


__all__ = ["GROUPS", "DataError", "Source", "Split", "SOURCES", "class_groups", "load_source",
           "longtail_counts", "IMBALANCE_FACTORS"]
