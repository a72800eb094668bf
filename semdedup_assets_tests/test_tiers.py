"""The test tiers (conftest.py, docs/testing.md): every test has one, and the fast tier starts no process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from semdedup_assets_tests.conftest import TIERS, FastTierGuard, StartedAProcess, tier_of

pytestmark = pytest.mark.pure


def test_a_fast_tier_test_that_starts_a_process_fails_naming_itself(request: pytest.FixtureRequest) -> None:
    with pytest.raises(StartedAProcess, match=r"test_tiers\.py::.* is in the fast tier but started a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    # The guard also fails the test after it ran (a start whose error the code swallowed); this one was expected.
    assert FastTierGuard.started and "subprocess.Popen" in FastTierGuard.started[0]
    FastTierGuard.started.clear()


def test_every_test_gets_exactly_its_closest_tier(request: pytest.FixtureRequest) -> None:
    assert tier_of(request.node) == "pure"
    assert [m.name for m in request.node.iter_markers() if m.name in TIERS] == ["pure"]
