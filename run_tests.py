"""Run the test suite, setting up the project's environment first if needed.

    python3 run_tests.py            # the whole suite, as CI runs it
    python3 run_tests.py -k ledger  # any pytest arguments

Without torch or ComfyUI at hand it creates ``.venv`` (headless/bootstrap.py, the same
setup as the README's first command and CI) and runs pytest inside it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(
        "dp_adapt_bootstrap", ROOT / "headless" / "bootstrap.py"
    )
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    try:
        python = bootstrap.ensure_environment()
    except bootstrap.SetupFailed as error:
        print(f"run_tests.py: FAILED: {error}", file=sys.stderr)
        return 1
    return subprocess.call([str(python), "-m", "pytest", *argv], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
