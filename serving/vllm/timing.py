"""The engine's cost model for the policy: an engine profile as the prior, refined by the measured steps.

A policy reads ``EngineTiming`` (a linear step-time model) to turn tokens into seconds. A profile fitted
offline (``tempo profile``) is right for the engine and model it was measured on; the served model may be
another, and the machine may be shared. So the engine fits the same linear model to its own steps:
ridge regression towards the profile's coefficients (the prior counts as ``prior_weight`` steps) with
exponential forgetting, so the model follows drift. Features are scaled to similar magnitudes before
the solve; the solve runs every ``solve_every`` steps (a 4 x 4 system).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
from tempo.scheduler.interface import EngineTiming

RECENT_STEPS = 16  # steps in the measured step-time average (as the simulator)
_SCALE = np.array([1.0, 256.0, 100_000.0, 2048.0])  # typical size of each feature


def _features(decodes: int, kv_tokens: int, prefill_tokens: int) -> np.ndarray:
    return np.array([1.0, max(0, decodes + prefill_tokens - 1), kv_tokens, prefill_tokens]) / _SCALE


class StepTimer:
    """``observe`` each step's shape and seconds; ``timing()`` is the current ``EngineTiming``."""

    def __init__(self, prior: EngineTiming, token_budget: int, forget: float = 0.998, prior_weight: float = 50.0,
                 solve_every: int = 16) -> None:
        self.prior = prior
        self.token_budget = token_budget
        self.forget = forget
        self.solve_every = solve_every
        self._theta0 = np.array([prior.base_s, prior.per_seq_s, prior.per_kv_token_s, prior.per_prefill_token_s])
        self._phi0 = self._theta0 * _SCALE
        self._prior = prior_weight * np.eye(4)
        self._a = np.zeros((4, 4))
        self._b = np.zeros(4)
        self._since_solve = 0
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self.steps = 0
        self._timing = prior

    def observe(self, decodes: int, kv_tokens: int, prefill_tokens: int, seconds: float) -> None:
        if not seconds > 0 or decodes + prefill_tokens <= 0:
            return
        z = _features(decodes, kv_tokens, prefill_tokens)
        self._a *= self.forget
        self._b *= self.forget
        self._a += np.outer(z, z)
        self._b += z * seconds
        self._recent.append(seconds)
        self.steps += 1
        self._since_solve += 1
        if self._since_solve >= self.solve_every:
            self._solve()

    def _solve(self) -> None:
        self._since_solve = 0
        phi = np.linalg.solve(self._a + self._prior, self._b + self._prior @ self._phi0)
        theta = np.maximum(phi / _SCALE, 0.0)
        base = max(float(theta[0]), 1e-5)
        per_seq, per_kv, per_prefill = float(theta[1]), float(theta[2]), float(theta[3])
        budget = self.token_budget
        recompute = (base + (per_seq + per_prefill) * budget) / budget
        self._timing = replace(self.prior, base_s=base, per_seq_s=per_seq, per_kv_token_s=per_kv,
                               per_prefill_token_s=per_prefill, recompute_s_per_token=recompute)

    def timing(self) -> EngineTiming:
        recent = sum(self._recent) / len(self._recent) if self._recent else None
        return replace(self._timing, recent_step_s=recent) if recent is not None else self._timing
