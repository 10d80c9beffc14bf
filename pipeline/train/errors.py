"""Why a training run stops early, with a message that says what to do (no torch here: the CLI catches these
before any stage has loaded it)."""
from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or the test logits left what the cache can store."""


class MemoryPlanError(RuntimeError):
    """The training step does not fit in the memory this rank has."""


RUN_ERRORS = (TrainingDiverged, MemoryPlanError)
