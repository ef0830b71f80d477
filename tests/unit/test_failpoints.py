"""Failpoints are off unless named, refuse names that do not exist, and fire on the n-th reach."""

import os
import subprocess
import sys

import pytest

from deploy.failpoints import Failpoints


def test_nothing_is_armed_without_the_setting():
    points = Failpoints("")
    points.reach("flush.acknowledged")
    assert not points.armed("flush.acknowledged")


def test_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown failpoint 'flush.typo'"):
        Failpoints("flush.typo=2")


def test_the_process_dies_by_sigkill_at_the_nth_reach():
    code = ("from deploy.failpoints import Failpoints\n"
            "points = Failpoints('batch.folded=3')\n"
            "for n in range(5):\n    print(n, flush=True)\n    points.reach('batch.folded')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == -9
    assert done.stdout.split() == ["0", "1", "2"]
