"""``.ci/run``: both passes run whatever the first gives, and the script fails at the end.

The script is run for real, in a copy of its folder layout where ``scripts/install.sh`` does
nothing and ``python3`` is a stand-in that records each pass and fails the ones it is told
to, so no package is installed and no test suite runs.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/sh
pass=native
[ "${DXA_NO_EXTENSIONS:-}" = 1 ] && pass=pure
echo "$pass $*" >> "$CI_LOG"
case " $CI_FAIL " in *" $pass "*) exit 3 ;; esac
exit 0
"""


def _run(tmp_path: Path, fail: str) -> tuple[int, str, list[str]]:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install.sh").write_text("exit 0\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "passes.log"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CI_LOG": str(log), "CI_FAIL": fail}
    env.pop("DXA_NO_EXTENSIONS", None)
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run"), "tests/x.py"], env=env,
                          capture_output=True, text=True, timeout=60)
    passes = [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []
    return done.returncode, done.stdout, passes


@pytest.mark.parametrize("fail", ["", "native", "pure", "native pure"])
def test_both_passes_run_and_the_script_fails_if_either_did(tmp_path, fail):
    rc, out, passes = _run(tmp_path, fail)
    assert passes == ["native", "pure"], out  # the second pass runs after a failed first
    if fail:
        assert rc != 0, out
        summary = out.strip().splitlines()[-1]
        assert summary.startswith("=== FAILED"), out
        assert ("native modules" in summary) == ("native" in fail.split())
        assert ("pure-Python" in summary) == ("pure" in fail.split())
    else:
        assert rc == 0, out
