"""Weighted destinations: which of a rule's destinations the next call goes to.

Smooth weighted round robin (nginx's): every pick adds each weight to its running
score and takes the highest, which then gives back the total. Over any run of
`sum(weights)` calls each destination gets exactly its weight, spread out rather than
in bursts (a 90/10 canary sees its 10 calls among the 90, not after them), with no
random numbers, so a split is exact from the first hundred calls.
"""

from __future__ import annotations


class WeightedPick:
    __slots__ = ("_scores", "_total", "_weights")

    def __init__(self, weights: tuple[int, ...]) -> None:
        if not weights or sum(weights) <= 0 or min(weights) < 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        self._weights = weights
        self._total = sum(weights)
        self._scores = [0] * len(weights)

    def pick(self) -> int:
        scores = self._scores
        best = 0
        for i, weight in enumerate(self._weights):
            scores[i] += weight
            if scores[i] > scores[best]:
                best = i
        scores[best] -= self._total
        return best
