"""examples/federation (issue 13): three fs9 mounts (Support, Coding, Knowledge) on one
nats-server, run end to end with one command, its output checked."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, fuse_unavailable
from natsserver import binary


def test_the_three_os_example_runs_with_one_command():
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"cannot mount FUSE here: {reason}")
    if binary() is None:
        pytest.skip("no nats-server: `make deps` installs the pinned one")
    fs9 = os.path.join(os.path.dirname(sys.executable), "fs9")
    r = subprocess.run(["sh", str(REPO / "examples/federation/run.sh")], capture_output=True,
                       text=True, timeout=300,
                       env={**os.environ, "FS9": fs9, "NATS_SERVER": binary()})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # what crossed to Coding is redacted: no e-mail address, no phone number
    crossed = out.split("--- what crossed to Coding")[1].split("---")[0]
    assert "From [redacted] ([redacted]): the CSV export corrupts my files." in crossed
    assert "jane.doe" not in crossed and "7946" not in crossed
    # Coding's status updates and result reached Support's case mailbox, in order
    assert ("status_update from fixer@coding: under investigation: reproduced with a quoted"
            " field holding a comma\nstatus_update from fixer@coding: fix deployed: export.py"
            " quotes every field (release 1.2.3)\nresult from fixer@coding: fixed in release"
            " 1.2.3") in out
    assert "Support's record of the request: to=fixer@coding state=done updates=3" in out
    assert "the Knowledge OS: known-issues.md updated: the CSV export corrupted fields " \
           "holding commas; fixed in release 1.2.3" in out
    assert "Case case-4521 closed." in out
    # event-driven: Coding's release, published on its exported topic, heard on Support
    assert "--- Coding's release, on its topic releases, heard by Support's news agent: " \
           "release 1.2.3: the CSV export quotes every field" in out
    # one correlation id through all three OSs' own logs
    traces = dict(line.split(":", 1) for line in out.splitlines()
                  if line.split(":")[0] in ("support", "coding", "knowledge"))
    assert "declassified fed_queued" in traces["support"]
    assert "task_progress fed_queued" in traces["coding"] and "task_done" in traces["coding"]
    assert traces["knowledge"].split()[:2] == ["mail_sent", "task_queued"]
    assert "the declassification, logged on Support: 1" in out
    # log/trace/case-4521 on Support shows the chain in all three OSs
    whole = out.split("--- the whole case on Support (log/trace/case-4521), entries by OS:")[1]
    counts = dict(w.split("=") for w in whole.splitlines()[0].split())
    assert all(int(counts[os]) > 0 for os in ("support", "coding", "knowledge")), counts
