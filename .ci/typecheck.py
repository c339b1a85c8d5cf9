"""mypy --strict on the packages held to it (tempo.scheduler). The repo maps folders to ``tempo.<folder>``
(pyproject's package-dir), which mypy cannot follow through the editable install's import hook, so it
checks a temporary tree of links laid out as the installed package."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("scheduler", "models", "estimator", "serving", "data")
STRICT = ("tempo.scheduler",)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "tempo"
        package.mkdir()
        for name in FOLDERS:
            (package / name).symlink_to(ROOT / name, target_is_directory=True)
        for module in (ROOT / "tempo").glob("*.py"):
            (package / module.name).symlink_to(module)
        command = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml")]
        for name in STRICT:
            command += ["-p", name]
        return subprocess.run(command, cwd=tmp, env={"MYPYPATH": tmp, "PATH": "/usr/bin:/bin"}).returncode


if __name__ == "__main__":
    sys.exit(main())
