"""What the study scripts share: one table cell of accuracies over seeds."""
from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> str:
    """'–' for no run, the value for one, 'mean ± sample std' for several."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
