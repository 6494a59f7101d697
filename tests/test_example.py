"""examples/pipeline: three agents in three languages pass work by mail and report on a topic."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, fuse_unavailable
from fs9.drivers import confine

pytestmark = [
    pytest.mark.skipif(bool(fuse_unavailable()), reason=f"cannot mount FUSE: {fuse_unavailable()}"),
    pytest.mark.skipif(not shutil.which("perl"), reason="perl is not installed (stage 2 is Perl)"),
]


def test_the_pipeline_example_runs_with_one_command():
    fs9 = os.path.join(os.path.dirname(sys.executable), "fs9")
    r = subprocess.run(["sh", str(REPO / "examples/pipeline/run.sh"), "a rather small example"],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "FS9": fs9})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["intake: received 22 bytes", "tally: 4 words",
                         "report: 4 words, longest 'example'"]
    trace = lines[3].removeprefix("trace: ").split()
    # one correlation id follows the work through all three agents, in order
    done = sorted(step for step in trace if step.startswith("task_done,"))
    assert done == ["task_done,intake", "task_done,report", "task_done,tally"]
    assert trace.index("task_started,intake") < trace.index("task_started,tally") < \
        trace.index("task_started,report")
    assert "mail_sent,tally" in trace and "mail_sent,report" in trace


@pytest.mark.skipif(bool(confine.unavailable()), reason=f"LLM agents are confined: "
                                                       f"{confine.unavailable()}")
def test_the_support_scenario_runs_offline_with_one_command():
    """examples/support: support -> coder -> knowledge, support closes the case."""
    fs9 = os.path.join(os.path.dirname(sys.executable), "fs9")
    r = subprocess.run(["sh", str(REPO / "examples/support/run.sh")], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "FS9": fs9})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "not a language model" in out.splitlines()[0]  # the scripted model says what it is
    assert "Case closed: the crash on an empty search is fixed in vault/code/search.py" in out
    assert "if not words:\n        return []" in out  # the coder's fix
    assert "An empty query (or one of spaces only) returns no documents." in out  # the docs
    assert "mail_sent coder handoff" in out and "mail_sent support handoff" in out
