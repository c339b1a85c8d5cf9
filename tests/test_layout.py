"""Package layout: one namespace, and the scheduler's SLO / goodput model depends on the standard library only."""

import subprocess
import sys


def test_namespaced_imports() -> None:
    import tempo.data
    import tempo.estimator
    import tempo.models
    import tempo.scheduler
    import tempo.serving

    assert tempo.data.data_path("castillo", "castillo_lengths.csv.gz").is_file()
    assert tempo.scheduler.SLOClass("latency") is tempo.scheduler.SLOClass.LATENCY
    assert tempo.estimator.__name__ == "tempo.estimator" and tempo.models.__name__ == "tempo.models"
    assert tempo.serving.__name__ == "tempo.serving"


def test_scheduler_imports_without_heavy_dependencies() -> None:
    code = (
        "import sys\n"
        "for name in ('vllm', 'torch', 'redis', 'numpy', 'pydantic', 'fastapi'):\n"
        "    sys.modules[name] = None\n"
        "import tempo.scheduler, tempo.scheduler.goodput, tempo.scheduler.slo\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
