"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples for a problem of which c pass, the chance that at least one of k samples drawn
without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomials overflow floats for n in the hundreds, so (as in the paper's numpy code) the
ratio is taken as a running product: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """The estimate for one problem: n samples, c of them correct, budget k (1 <= k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of samples n={n}, got {k}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """The benchmark's figure: the mean over problems of pass@k, from (n, c) per problem."""
    estimates = [pass_at_k(n, c, k) for n, c in counts]
    if not estimates:
        raise ValueError("pass@k needs at least one problem")
    return math.fsum(estimates) / len(estimates)
