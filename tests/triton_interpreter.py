"""Running a test module again under Triton's interpreter, in a child pytest.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then),
so a module whose tests run Triton kernels on the CPU calls `run_under_interpreter(__file__)`
from one launcher test, and its other tests skip unless INTERPRETED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_under_interpreter(test_file: str, timeout: int = 1200) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    # Every test ran in the child; only its copy of the launcher skips.
    assert re.search(r"\b\d+ passed", summary) and re.search(r"\b1 skipped", summary), summary
