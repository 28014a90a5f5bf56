"""Ctrl-C or SIGTERM at any instant of a command, the seconds of imports before any command
code runs included, gives one line and exit code 130, never a traceback or 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import elbolab

SRC = Path(elbolab.__file__).resolve().parents[1]

#: what pip writes as the ``elbolab`` console script ([project.scripts] elbolab = "elbolab.cli:main")
CONSOLE_SCRIPT = """\
import re
import sys
from elbolab.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch loading")


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    # a shell's background job inherits SIGINT ignored, and Python then installs no handler of its
    # own: start each child as a terminal would, so the tests see elbolab's doing alone
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def wait_until_torch_is_loading(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until torch's shared libraries are mapped: the package is importing, no command code has run
    (torch's import then goes on for seconds)."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{proc.pid}/maps")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError("torch never started loading")


@pytest.mark.parametrize("how", ["script", "module"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_imports_is_one_line_and_exit_130(tmp_path, sig, how):
    script = tmp_path / "elbolab"
    script.write_text(CONSOLE_SCRIPT)
    argv = [str(script)] if how == "script" else ["-m", "elbolab.cli"]
    proc = start([sys.executable, *argv, "data", "list"])
    wait_until_torch_is_loading(proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1 and "interrupted" in err, err
    assert out == ""


def test_importing_elbolab_as_a_library_leaves_ctrl_c_to_the_program(tmp_path):
    """Only the command is guarded: a program that imports elbolab still gets KeyboardInterrupt."""
    code = ("import signal, elbolab\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n")
    proc = start([sys.executable, "-c", code])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
