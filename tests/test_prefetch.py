"""The prefetching data path: the same batches as the synchronous one, errors in their place, no stray threads.

Every loader (teacher views, cached and online student targets, the cache's dump) makes its batches in a
background thread a few batches ahead (``store.prefetch.prefetched``). These tests run each loader with
``prefetch=0`` (made in the caller's thread, as before) and with prefetching, on real data: Fashion-MNIST-LT
in memory and an ImageNet-LT tree of JPEGs decoded by DALI.
"""
from __future__ import annotations

import threading
import time
from itertools import zip_longest

import numpy as np
import pytest
import torch

from pipeline.data.dali import ImageError
from pipeline.data.loaders import ViewLoader, make_executor
from pipeline.data.sources import load_source
from pipeline.data.targets import CachedTargets, OnlineTargets, row_order
from pipeline.models import build_model
from pipeline.settings import cache_settings, teacher_settings
from pipeline.train.distributed import Dist
from pipeline.train.loop import make_optimizer, train_one_epoch
from stages.artifacts import load_teacher
from stages.cache import dump
from store.prefetch import THREAD_PREFIX, prefetched
from store.reader import LogitStore
from store.writer import StoreWriter

from .conftest import needs_fmnist
from .test_file_datasets import write_imagenet_lt

CPU = torch.device("cpu")


def loader_threads() -> list[str]:
    """Names of the live threads that the data path starts: prefetchers and the store's readers."""
    return [t.name for t in threading.enumerate() if t.name.startswith((THREAD_PREFIX, "store-read"))]


def wait_for_no_loader_threads(seconds: float = 5.0) -> list[str]:
    deadline = time.time() + seconds
    while loader_threads() and time.time() < deadline:
        time.sleep(0.01)
    return loader_threads()


def fmnist_views():
    """The default recipe's settings, Fashion-MNIST-LT, its training views and their in-memory executor."""
    settings = teacher_settings("fmnist-lt")
    source = load_source("fmnist-lt")
    spec = settings.view_spec()
    return settings, source, spec, make_executor(source.train, spec, source.mean, source.std, 128)


def assert_same_batches(sync, ahead) -> int:
    """Every batch of two iterables equal, in order, images bit for bit; returns how many there were."""
    count = 0
    for a, b in zip_longest(sync, ahead):
        assert a is not None and b is not None, "the two paths yield different numbers of batches"
        assert np.array_equal(a.index, b.index) and np.array_equal(a.params, b.params)
        assert torch.equal(a.labels, b.labels)
        assert a.images.dtype == b.images.dtype and a.images.stride() == b.images.stride()
        assert torch.equal(a.images, b.images)
        if a.teacher_logits is None:
            assert b.teacher_logits is None
        else:
            assert torch.equal(a.teacher_logits, b.teacher_logits)
        count += 1
    return count


# --- the mechanism --------------------------------------------------------------------------------------


def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    def produce():
        for i in range(5):
            if i == 3:
                raise ValueError("item 3 is bad")
            yield i

    for depth in (0, 1, 4):
        got = []
        with pytest.raises(ValueError, match="item 3 is bad"):
            for item in prefetched(produce, depth):
                got.append(item)
        assert got == [0, 1, 2], depth  # everything before the failure reached the consumer
    assert wait_for_no_loader_threads() == []


def test_prefetched_works_ahead_while_the_consumer_is_busy():
    made = []

    def produce():
        for i in range(6):
            made.append(i)
            yield i

    items = prefetched(produce, 2)
    assert next(items) == 0
    deadline = time.time() + 5
    while len(made) < 3 and time.time() < deadline:  # item 0 taken, items 1 and 2 queued ahead
        time.sleep(0.01)
    assert made == [0, 1, 2]
    assert list(items) == [1, 2, 3, 4, 5]


# --- same batches ---------------------------------------------------------------------------------------


@needs_fmnist
def test_teacher_views_prefetched_equal_synchronous_across_epochs_and_ranks():
    _, source, spec, executor = fmnist_views()
    for world in (1, 2):
        for rank in range(world):
            sync, ahead = (ViewLoader(source.train, spec, executor, 256, seed=3, train=True, rank=rank, world=world,
                                      prefetch=depth) for depth in (0, 2))
            for epoch in (0, 1, 2):
                assert assert_same_batches(sync.batches(epoch), ahead.batches(epoch)) == len(sync)


def test_dali_decoded_batches_prefetched_equal_synchronous(tmp_path):
    """The DALI executor run from the prefetching thread gives the pixels it gives in the caller's."""
    write_imagenet_lt(tmp_path)
    source = load_source("imagenet-lt", tmp_path)
    spec = teacher_settings("imagenet-lt", ["crop_size=32", "resize=36", "jitter=0.4"]).view_spec()
    for world, rank in ((1, 0), (2, 1)):
        executors = [make_executor(source.train, spec, source.mean, source.std, 64 // world, workers=1)
                     for _ in range(2)]
        sync, ahead = (ViewLoader(source.train, spec, ex, 64, seed=0, train=True, rank=rank, world=world,
                                  prefetch=depth) for ex, depth in zip(executors, (0, 3)))
        for epoch in (0, 1):
            assert assert_same_batches(sync.batches(epoch), ahead.batches(epoch)) == len(sync)


@needs_fmnist
def test_student_targets_prefetched_equal_synchronous(small_cache):
    teacher_dir, cache = small_cache
    store = LogitStore.open(cache / "logits.zarr")
    settings, source, spec, executor = fmnist_views()
    teacher = load_teacher(teacher_dir, CPU, settings.channels_last)
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        cached = [CachedTargets(store, source.train.ids, executor, 256, 5, rank, world, prefetch=d) for d in (0, 2)]
        for epoch in (0, 1, 3):
            assert assert_same_batches(cached[0].batches(epoch), cached[1].batches(epoch)) == len(cached[0])
    online = [OnlineTargets.like(store, source.train, teacher, spec, executor, 512, 5, CPU, settings.bf16,
                                 settings.channels_last, prefetch=d) for d in (0, 2)]
    assert assert_same_batches(online[0].batches(1), online[1].batches(1)) == len(online[0])


# --- errors and early exits -------------------------------------------------------------------------------


class RecordingExecutor:
    """The real DALI executor, noting the thread in which a bad image was met (reading its header or
    decoding it)."""

    def __init__(self, executor):
        self.executor, self.failed_in = executor, None

    def _noted(self, method, *args):
        try:
            return method(*args)
        except ImageError:
            self.failed_in = threading.current_thread().name
            raise

    def sizes(self, index):
        return self._noted(self.executor.sizes, index)

    def run(self, index, params):
        return self._noted(self.executor.run, index, params)


def test_a_bad_file_met_while_prefetching_is_named_and_the_finished_shards_kept(tmp_path):
    data = tmp_path / "imagenet"
    lines = write_imagenet_lt(data)
    source = load_source("imagenet-lt", data)
    n = len(source.train)
    rows = row_order(n, 1)
    cache = cache_settings("imagenet-lt", ["views=2", "batch_size=64", "prefetch=2"])
    writer = StoreWriter.create_or_resume(tmp_path / "logits.zarr", n, cache.views, source.num_classes, cache.codec,
                                          source.train.labels[rows], source.train.ids[rows], source.class_counts,
                                          {"recipe": {}, "view_spec": {}, "fingerprints": {}}, chunk=64, shard=128)
    bad = data / lines["train"][int(rows[200])].split()[0]  # in the second shard (rows 128..255)
    bad.write_bytes(bad.read_bytes()[:300])
    spec = teacher_settings("imagenet-lt", ["crop_size=32", "resize=36"]).view_spec()
    executor = RecordingExecutor(make_executor(source.train, spec, source.mean, source.std, 64, workers=1))
    torch.manual_seed(0)
    model = build_model("resnet32", source.num_classes, 3).eval()
    with pytest.raises(ImageError, match=str(bad)):
        dump(spec, cache, model, executor, writer, rows, Dist(device=CPU), log=lambda *a, **k: None)
    assert executor.failed_in.startswith(THREAD_PREFIX)  # met by the prefetching thread, not the caller
    assert (tmp_path / "logits.zarr" / "done" / "0.json").is_file()  # the shard before it was written
    assert not (tmp_path / "logits.zarr" / "done" / "1.json").exists()
    assert [s.index for s in writer.missing_shards()] == [1, 2]
    assert wait_for_no_loader_threads() == []


@needs_fmnist
def test_leaving_an_epoch_early_stops_the_loader_threads(small_cache):
    _, cache = small_cache
    store = LogitStore.open(cache / "logits.zarr")
    settings, source, spec, executor = fmnist_views()
    loaders = [ViewLoader(source.train, spec, executor, 128, seed=0, train=True),
               CachedTargets(store, source.train.ids, executor, 128, 0)]
    assert wait_for_no_loader_threads() == []
    for loader in loaders:
        batches = loader.batches(0)
        next(batches), next(batches)
        assert loader_threads(), "a prefetching thread should be running mid-epoch"
        batches.close()  # as a `break` out of the loop does
        assert loader_threads() == [], type(loader).__name__
    # an error in the training step ends the epoch: the loop stops the loader at once, traceback or not
    model = build_model("resnet32", source.num_classes, source.in_channels)
    calls = []

    def failing_loss(outputs, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the step failed")
        return {"loss": outputs["logits"].float().logsumexp(1).mean()}

    with pytest.raises(RuntimeError, match="the step failed") as caught:
        train_one_epoch(model, failing_loss, loaders[0].batches(0), make_optimizer(model, settings), 0.01, CPU,
                        False, False, Dist(device=CPU))
    assert caught.value is not None and loader_threads() == []
