"""The Python examples in README.md and docs/api.md run as written.

Every ```python block preceded by the marker below is executed, in the order it appears,
in one namespace per page (later blocks use earlier ones' variables), in a fresh working
folder. A block that imports pythae or pyro is skipped when that extra is missing
(the test extra installs both, so CI runs them all). The blocks assert their own claims
(e.g. that a reloaded run scores the same as the run in memory).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- tested: tests/test_docs_examples.py -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*```python\n(.*?)```", re.DOTALL)
OPTIONAL = ("pythae", "pyro")


def blocks(page: str) -> list[str]:
    return BLOCK.findall((REPO / page).read_text())


@pytest.mark.usefixtures("restore_threads")
# docs/api.md trains pythae and Pyro models too (about 16 CPU seconds): the slow tier
@pytest.mark.parametrize("page", ["README.md", pytest.param("docs/api.md", marks=pytest.mark.slow)])
def test_examples_run(page, tmp_path, monkeypatch) -> None:
    found = blocks(page)
    assert found, f"{page}: no example marked {MARKER}"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(found):
        missing = [m for m in OPTIONAL if re.search(rf"^\s*(from|import) {m}\b", code, re.M)
                   and importlib.util.find_spec(m) is None]
        if missing:
            continue
        exec(compile(code, f"{page} example {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "mine" / "diagnostics.md").exists()
