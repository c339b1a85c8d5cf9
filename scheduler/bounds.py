"""Length bounds as the scheduler sees them: a ladder of conditional upper bounds, and who supplies it.

The estimator answers once per request with a ladder ``[(k, bound_k), ...]``: the q-quantile of the
response length given that k tokens are already generated. The scheduler tightens (or loosens) its
view locally as decoding proceeds, with no call in the decode loop. Policies never see true lengths.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tempo.scheduler.slo import SLOClass


@dataclass(frozen=True, slots=True)
class BoundLadder:
    """Conditional upper bounds on the response length; ``steps`` sorted by k, starting at k = 0.

    Invariants (checked): k strictly increasing from 0, bound_k > k, bounds non-decreasing (the
    q-quantile of L given L > k cannot fall as k grows).
    """

    steps: tuple[tuple[int, int], ...]
    quantile: float = 0.9
    fallback: bool = False  # True when the bound came from a fallback, not a model

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0][0] != 0:
            raise ValueError("a ladder starts at k = 0")
        for (k0, b0), (k1, b1) in zip(self.steps, self.steps[1:], strict=False):
            if k1 <= k0 or b1 < b0:
                raise ValueError(f"ladder steps must have increasing k and non-decreasing bounds: {self.steps}")
        if any(b <= k for k, b in self.steps):
            raise ValueError(f"every bound must exceed its k: {self.steps}")

    @classmethod
    def fixed(cls, bound: int, quantile: float = 0.9, fallback: bool = False) -> BoundLadder:
        """A single bound that never tightens (the 'no estimator' ablation, or a fallback)."""
        return cls(((0, max(1, bound)),), quantile, fallback)

    @property
    def initial(self) -> int:
        """B0: the bound before any token is generated."""
        return self.steps[0][1]

    def bound_at(self, generated: int, max_tokens: int | None = None) -> int:
        """Upper bound on the total length once ``generated`` tokens are out; always > generated.

        Past the ladder (a runaway generation beyond every step's bound) the bound is the request's
        ``max_tokens`` when known, else the last step's remaining length added to ``generated``.
        """
        index = bisect_right(self.steps, (generated, 1 << 62)) - 1
        _, bound = self.steps[max(index, 0)]
        if bound > generated:
            return bound
        if max_tokens is not None and max_tokens > generated:
            return max_tokens
        last_k, last_bound = self.steps[-1]
        return generated + max(1, last_bound - last_k)

    def remaining_at(self, generated: int, max_tokens: int | None = None) -> int:
        """Upper bound on the tokens still to come."""
        return self.bound_at(generated, max_tokens) - generated


@dataclass(frozen=True, slots=True)
class BoundQuery:
    """What a bound provider may know about a request before it runs (never its true length)."""

    request_id: str
    prompt_tokens: int
    slo_class: SLOClass
    app: str = "default"
    model: str | None = None
    prompt: str | None = None  # text, when the provider uses it and the deployment keeps it


def prompt_tokens_of_text(text: str | None) -> int:
    """A query's ``prompt_tokens`` when only the text is known (~4 characters per token): what serving and
    the estimator guess before the engine tokenizes, and what serving records for the learner to use too."""
    return max(1, -(-len(text or "") // 4))


@runtime_checkable
class BoundProvider(Protocol):
    """Anything that turns queries into ladders: an in-process estimator, the service client, a constant."""

    def ladders(self, queries: Sequence[BoundQuery]) -> list[BoundLadder]:
        """One ladder per query, in order. Must not block for long: serving never waits on it."""
        ...
