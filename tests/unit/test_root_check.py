"""A run as a user who is not root that selects tests needing root fails loudly instead of skipping them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.root  # it switches to the user nobody


def pytest_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest of this repo as the user nobody (no cache: nobody cannot write the checkout)."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_tests_needing_root_fail_the_run_of_another_user() -> None:
    # A pure unit test and a flowwatch test: before, flowwatch's hook skipped both (every test of the session).
    run = pytest_as_nobody("tests/unit/test_protocol.py", "tests/flowwatch/test_ctparse.py")
    output = run.stdout + run.stderr
    assert run.returncode not in (0, 5), output
    assert "need root" in output and "this run is uid 65534" in output, output
    assert "tests/flowwatch/test_ctparse.py::" in output, output
    assert " passed" not in output and " skipped" not in output, output


def test_leaving_them_out_on_purpose_runs_the_rest() -> None:
    run = pytest_as_nobody("--collect-only", "-m", "not root", "tests/unit/test_protocol.py",
                           "tests/flowwatch/test_ctparse.py")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "tests/unit/test_protocol.py" in output and "deselected" in output, output
