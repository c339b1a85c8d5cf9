"""Policy registry: a name -> factory map that raises on duplicates, and what factories may be given.

    make_policy("tempo", PolicyContext(job_profile=profile), p=1.5)

Policies register themselves when their module is imported; ``policy_names()`` imports the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tempo.scheduler.interface import Policy
from tempo.scheduler.jobs import JobOutlookSource, JobProfile, OracleTruth

PolicyFactory = Callable[..., Policy]  # factory(context, **params) -> Policy

_REGISTRY: dict[str, tuple[PolicyFactory, str]] = {}
_BUILTINS = ("tempo.scheduler.baselines", "tempo.scheduler.tempo_policy")


@dataclass(frozen=True)
class PolicyContext:
    """What the engine side hands a policy factory besides its parameters."""

    job_profile: JobProfile = field(default_factory=JobProfile)  # per-app outlook of compound jobs
    job_graphs: JobOutlookSource | None = None  # pattern-graph matcher over past jobs (None: the per-app outlook)
    truth: OracleTruth | None = None  # true lengths and job graphs: only oracle policies accept it


def register_policy(name: str, help: str = "") -> Callable[[PolicyFactory], PolicyFactory]:
    """Decorator registering ``factory`` under ``name``; ValueError if the name is taken."""

    def add(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is already registered")
        _REGISTRY[name] = (factory, help)
        return factory

    return add


def _load_builtins() -> None:
    import importlib

    for module in _BUILTINS:
        importlib.import_module(module)


def policy_names() -> list[str]:
    _load_builtins()
    return list(_REGISTRY)


def policy_help() -> dict[str, str]:
    _load_builtins()
    return {name: text for name, (_, text) in _REGISTRY.items()}


def make_policy(name: str, context: PolicyContext | None = None, **params: Any) -> Policy:
    """A fresh policy; KeyError listing the known names when ``name`` is unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r} (known: {', '.join(_REGISTRY)})")
    factory, _ = _REGISTRY[name]
    return factory(context or PolicyContext(), **params)


def needs_truth(name: str) -> bool:
    """Whether the policy is an oracle (gets true lengths); by convention its name starts with 'oracle'."""
    return name.startswith("oracle")
