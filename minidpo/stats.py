"""
Summary statistics shared by evaluation (one run's prompts) and the frontier (several seeds' points).
"""

import torch
from torch import Tensor


def mean_and_se(x: Tensor) -> tuple[float, float | None]:
    """Mean and its standard error std(ddof=1) / sqrt(n); the error is None below two values (JSON has no NaN).

    Naive equivalent: statistics.mean(x), statistics.stdev(x) / math.sqrt(len(x)).
    """
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    se = float(x.std() / len(x) ** 0.5) if len(x) >= 2 else None
    return float(x.mean()), se
