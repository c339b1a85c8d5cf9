"""Tempo: SLO-aware LLM serving.

Sub-packages (each a top-level folder of the repository): ``tempo.scheduler`` (pure policies and the
SLO/goodput model), ``tempo.models`` (length estimators), ``tempo.estimator`` (the estimator
service), ``tempo.serving`` (workloads, simulator, vLLM hosting), ``tempo.data`` (vendored data).
"""

__version__ = "0.1.0"
