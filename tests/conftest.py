"""Shared fixtures: the real data copies beside the project, and small exact models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# train.fused_backend=auto stays on the torch-op fused step here: the fast tier never compiles the
# C++ step (tests/test_fused_cpp.py, in the slow tier, asks for it with fused_backend=cpp)
os.environ["ELBOLAB_FUSED_CPP"] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ELBOLAB_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` or ``$ELBOLAB_TEST_DATA`` (the real dataset files); tests that need it are in
    the slow tier and skip, saying so, without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set ELBOLAB_TEST_DATA)")
    return SHARED_DATA


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads the real data (the ``shared_data`` fixture, directly or through another
    fixture) belongs to the slow tier: README's `pytest` must not depend on what lies beside the clone."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny GEMMs: one thread is fastest, and it does not fight other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_threads():
    """Tests whose config sets train.threads change torch's global thread count: give it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
