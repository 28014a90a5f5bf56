"""The compiled fused step: fused_step.cpp, built on first use with torch.utils.cpp_extension.

Why: at batch 20 the torch-op fused step (elbolab.fused) still spends much of a step dispatching its
100-190 ATen operations from Python; the compiled step makes one call for the forward and backward,
its elementwise work in fused loops, the matrix products ATen's. It is the same computation on the
same noise (tests/test_fused_cpp.py checks it against the torch-op step and autograd).

The build lands in torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``)
and is reused while the source is unchanged; a first build (about a minute) says so in one line.
A build that fails (no compiler, no ninja, a compile error) prints one line and the torch-op fused
step runs instead: training never fails for it.

``train.fused_backend``: ``torch`` never builds it; ``cpp`` always uses it where it builds; ``auto``
uses it too, unless the environment sets ``ELBOLAB_FUSED_CPP=0`` (the test suite does, so its fast tier
never compiles; tests/conftest.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

#: ``train.fused_backend`` values
BACKENDS = ("auto", "torch", "cpp")
#: set to 0 to keep ``auto`` on the torch-op step (no build)
ENV = "ELBOLAB_FUSED_CPP"
SOURCE = Path(__file__).with_name("fused_step.cpp")
NAME = "elbolab_fused_step"
#: the line before a first build
BUILDING = "elbolab: building the compiled fused step (about a minute, once per machine)"

_loaded: dict[str, ModuleType | None] = {}
#: the line of a failed build that says why (the compiler's error, a missing program or file)
_WHY = re.compile(r"error:|not found|No such file|[Pp]ermission denied|Ninja is required|[Nn]o space")


def wanted(backend: str) -> bool:
    """Whether ``train.fused_backend=backend`` asks for the compiled step."""
    if backend == "torch":
        return False
    if backend == "cpp":
        return True
    return os.environ.get(ENV, "1") != "0"


def load() -> ModuleType | None:
    """The compiled module, built once per process (and cached on disk); None, after one line on
    stderr, where it cannot be built."""
    if "mod" not in _loaded:
        # torch's own warnings about the compiler would add lines: a failure is reported in one
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension

            if _compiler() and not _built(cpp_extension):  # a minute of silence would look like a hang
                print(BUILDING, file=sys.stderr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _loaded["mod"] = cpp_extension.load(name=NAME, sources=[str(SOURCE)],
                                                    extra_cflags=["-O3", "-fno-math-errno"], verbose=False)
        except Exception as err:  # any build failure falls back, it never fails a training
            print(f"elbolab: compiled fused step unavailable ({_why(err)}); using the torch-op fused step",
                  file=sys.stderr)
            _loaded["mod"] = None
        finally:
            log.setLevel(level)
    return _loaded["mod"]


def _compiler() -> bool:
    """Whether the C++ compiler torch will call exists (without one the build fails at once)."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _built(cpp_extension: ModuleType) -> bool:
    """Whether torch's extension cache already holds a build (of this or an older source)."""
    try:
        folder = Path(cpp_extension._get_build_directory(NAME, verbose=False))
    except Exception:  # a private helper: if it moves, the only loss is the line above
        return True
    return any(folder.glob(f"{NAME}*.so"))


def _why(err: Exception) -> str:
    """The line of a build error that says why, shortened."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = next((ln for ln in lines if _WHY.search(ln)), lines[0] if lines else "")
    return f"{type(err).__name__}: {line}"[:200]
