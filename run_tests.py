"""Run the test suite, setting up the project's environment first if needed.

    python3 run_tests.py            # the whole suite, as CI runs it
    python3 run_tests.py -k ledger  # any pytest arguments

Without torch or ComfyUI at hand it creates ``.venv`` (headless/bootstrap.py, the same
setup as the README's first command and CI) and runs pytest inside it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "headless"))
    import bootstrap  # standard library only

    python = bootstrap.python_or_exit("run_tests.py")
    return subprocess.call([str(python), "-m", "pytest", *argv], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
