"""``dive cache --plan`` (``make cache PLAN=1``): a store's size, layout and per-epoch reads for any dataset, V
and codec, without a teacher, the data, or a dump.

The training-set sizes are the datasets' definitions: the long-tail formula for fmnist-lt, cifar100-lt and
glyph-lt, and the published splits of ImageNet-LT (Liu et al. 2019) and iNaturalist 2018, so the plan needs
none of their files.
"""
from __future__ import annotations

from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import longtail_counts
from pipeline.settings import CacheSettings, ConfigError
from store import codecs
from store.plan import StorePlan, plan_store

PUBLISHED = {"imagenet-lt": (115_846, 1_000), "inat2018": (437_513, 8_142)}  # train images, classes
LONG_TAIL = {"fmnist-lt": (10, 500), "cifar100-lt": (100, 500)}  # classes, n_max


def train_shape(dataset: str, imbalance: float = 100, classes: int = 0) -> tuple[int, int]:
    """(training images, classes) of ``dataset`` by its definition."""
    if dataset in PUBLISHED:
        return PUBLISHED[dataset]
    if dataset in LONG_TAIL:
        c, n_max = LONG_TAIL[dataset]
        return int(longtail_counts(c, n_max, imbalance).sum()), c
    if dataset == "glyph-lt":
        from pipeline.data.sources import glyph

        c = classes or glyph.DEFAULT_CLASSES
        glyph.check_settings(c, imbalance)
        return int(glyph.train_counts(c, imbalance).sum()), c
    raise ConfigError(f"no training-set size for dataset {dataset!r}; known: {', '.join(SOURCES)}")


def plan_for(dataset: str, cache: CacheSettings, imbalance: float = 100, classes: int = 0) -> StorePlan:
    n, c = train_shape(dataset, imbalance, classes)
    try:
        return plan_store(n, cache.views, c, cache.codec, cache.k)
    except ValueError as error:
        raise ConfigError(f"{dataset}: {error}") from None


def human(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:,.1f} {unit}" if unit != "B" else f"{size:,.0f} B"
        size /= 1024
    return f"{size:,.1f} TiB"


def describe(dataset: str, plan: StorePlan) -> list[str]:
    """The plan as lines for the terminal."""
    lay = plan.layout
    codec = codecs.name(lay.codec, lay.k)
    views = plan.array_bytes["logits"] / (lay.n * lay.v)
    side = plan.chunk_bytes / (lay.n * lay.v) - views
    return [
        f"plan: {dataset}, {lay.n:,} training images x {lay.v} views, {lay.c:,} classes, codec {codec}",
        f"  store   {human(plan.total_bytes)}: {plan.bytes_per_view():,.1f} bytes a view (logits {views:,.1f}, "
        f"view parameters and the rest {side:,.1f}), {views / lay.c:.3f} bytes a logit",
        f"  layout  {lay.n_shards:,} shards of {lay.shard} samples x {lay.v} views; logits in inner chunks of "
        f"{lay.chunk} samples x 1 view; view parameters " + ("likewise" if lay.side_per_view else "one chunk a shard"),
        f"  epoch   a student epoch reads {human(plan.epoch_read_bytes)} (one view of the logits"
        + ("" if lay.side_per_view else f", the view parameters of all {lay.v} views") + ")",
        "  arrays  " + ", ".join(f"{name} {human(size)}" for name, size in plan.array_bytes.items()),
    ]
