"""Work ahead of a consumer: run a generator in a background thread, a bounded number of items ahead.

This is the one overlap mechanism of the data path (store reads, view replay, image decoding, the dump).
A thread suits it because the work it hides releases the GIL: zarr and file reads, DALI's pipeline (which
decodes in its own C++ threads), torch's tensor operations. Because the producer is the very generator a
synchronous loop would run, the items, their order and their errors are those of the synchronous path by
construction; only the timing changes. An error is raised in the consumer at the item where it happened,
after every item before it was consumed, so work finished before a bad input is kept.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

THREAD_PREFIX = "dive-prefetch"  # every prefetching thread's name starts with this (tests look for them)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(produce: Callable[[], Iterable[T]], depth: int, name: str = "data",
               on_start: Callable[[], None] | None = None) -> Iterator[T]:
    """The items of ``produce()``, made by a background thread up to ``depth`` items ahead of the consumer
    (``depth`` 0: made in the consumer's thread, synchronously). ``on_start`` runs first in that thread (to
    set thread-local state, such as torch's intra-op threads). Leaving the loop early, by ``break``, an
    error or ``close()``, stops the thread and closes the producer before this generator returns."""
    if depth <= 0:
        yield from produce()
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            if on_start is not None:
                on_start()
            items = iter(produce())
        except BaseException as error:
            put(_Failure(error))
            return
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            put(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a producer's own threads and files end here, not at garbage collection

    thread = threading.Thread(target=run, name=f"{THREAD_PREFIX}-{name}", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
