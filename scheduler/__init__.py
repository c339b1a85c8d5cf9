"""Engine-agnostic scheduling policies and the SLO / goodput model.

The SLO / goodput model and the policy interface depend on the standard library only; the policies add numpy
(which vLLM ships), so the same objects run in the simulator and inside vLLM.
"""

from tempo.scheduler.goodput import ClassReport, GoodputReport, RequestOutcome, account
from tempo.scheduler.slo import SLO, SLOClass

__all__ = ["SLO", "ClassReport", "GoodputReport", "RequestOutcome", "SLOClass", "account"]
