"""Fixtures for the WAN lab's own tests: `bench` importable, a lab-or-skip guard, and a
check that no test leaves a namespace or a relay behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lab.lab import lab_available, our_namespaces


@pytest.fixture
def need_lab() -> None:
    """Skip unless this process may build namespaces and TUN devices."""
    reason = lab_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every lab test must leave none of this process's namespaces behind."""
    yield
    left = our_namespaces(os.getpid())
    assert not left, f"namespaces left behind: {left}"
