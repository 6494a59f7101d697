"""A sandbox made ahead of its agent (issue 25: a confined spawn in milliseconds).

A sandbox's start costs a fork by the fork server, its namespaces, and its first
program's move into the agent's control groups, whose first cgroup.procs write waits
for an RCU grace period of the kernel's migration lock (10-15 ms here:
docs/benchmarks.md). fs9 keeps a few sandboxes made ahead (kernel/agents/pool.py), each
for one uid that fs9 has set aside for it (vetted free) and so for the agent that will
get that uid: its login uid set, its own mount, IPC and network namespaces and /proc
made, and its first program forked and already in the uid's control group (the grace
period paid then). The agent of the spawn that takes it hands it its spec ("take") at
once; it then does the rest as a fresh sandbox does (zygote.py): the view, vault binds,
scratch and hidden folders, the Landlock layers; fs9 made its scratch folder and group
ahead, and writes the agent's limits there if they differ. It loads the seccomp filter
for itself only before it forks a program other than the first (zygote.serve).

Since its first program was forked before the sandbox loads the seccomp filter (the
sandbox's own mounts come after the fork, and a filter it loaded would hand them to
itself), that program loads the same filter itself and hands its listener over; it
takes its uid and Landlock layers once the sandbox, taken, has made them, before its
start (as a fresh sandbox's first program waits). It runs then under exactly what a
fresh sandbox's first program does (tests/test_pool.py compares them).

A pooled sandbox is used once, by the agent of its uid, or never: a sandbox never
taken ends at fs9's word (its socket closed) having run nothing of anyone's, with no
process of its uid to end. Only agents without `inet` (their network namespace is a
new, empty one) are served by the pool.
"""
import errno
import json
import socket

from fs9.drivers import programs, zygote
from fs9.drivers.confinable import DEVICES, SYSTEM_READ

TAKE_MAX = 2 << 20  # bytes of the take request (a spec, at most confine.MAX_REQUEST)


def run(spec: dict, sock: socket.socket, flt) -> None:
    """The pooled sandbox's life, in a process the fork server has just forked (spec:
    {"pooled", "parent", "uid", "audit", "cgroups"}): made ready, then, once taken,
    serve its agent as zygote.run does; end every process of the uid if it was taken."""
    taken = None
    try:
        if not zygote.arm(spec):
            return  # the fork server died before PDEATHSIG was armed
        if spec.get("audit", True):
            zygote.set_loginuid(spec)
        zygote.own_namespaces({})  # (no inet: its own, empty network namespace)
        # the Landlock rules every agent has (the system's folders, the devices), and
        # the network layer of an agent without inet, made now
        common = {"read": list(SYSTEM_READ), "devices": list(DEVICES)}
        begun = ((zygote.landlock_ruleset(common), common), zygote.net_ruleset({}))
        first = programs.Prepared(spec, None, None, flt)
        sock.send(json.dumps({"op": "pooled"}).encode())
        data = sock.recv(TAKE_MAX)
        if not data:
            return  # never taken: nothing of any agent's ran here
        taken = json.loads(data)["spec"]
        if taken["uid"] != spec["uid"] or taken.get("net", {}).get("inet"):
            raise OSError(errno.EINVAL, "a pooled sandbox serves only the uid it was made "
                                        "for, without inet")
        zygote.show_view(taken)
        zygote.serve(sock, taken, flt, first, begun)
    except (OSError, ValueError, KeyError) as e:
        try:
            sock.send(json.dumps({"op": "failed", "text": str(e)}).encode())
        except OSError:
            pass
    finally:
        if taken is not None:
            zygote.kill_all(spec["uid"])
