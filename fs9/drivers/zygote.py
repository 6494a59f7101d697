"""The sandbox of one confined agent: a small root process that lives in the agent's
private namespace and starts the agent's programs there. It is forked, fresh for each
agent, from the fork server (forkserver.py), which has paid Python's start and these
imports once: `run(spec, sock, flt)` is its whole life.

Set up once, used by every task (Plan 9: the namespace belongs to the process
group, not to one program; Android's zygote: pay the setup once):

  - its own IPC namespace (no SysV queue or semaphore shared with anyone), and,
    unless it pledged `inet`, its own network namespace with nothing in it (not even
    a loopback that is up): no TCP, UDP or abstract unix socket of the host reaches
    it or is reached; /proc is a fresh instance with hidepid=invisible, so its
    programs see only their own processes;
  - a private mount namespace in which the agent's view (MNT/agents/NAME/view,
    served by fs9) is bind-mounted over MNT, so the canonical paths show the view
    and nothing else; the vault subtrees it may only read are bound read-only from
    disk where the view shows them (native speed), and the subtrees it owns are bound
    read-write, idmapped so that their owner's files on disk are the agent's; the
    state directory and the vault's backing directory are covered by empty
    read-only tmpfs;
  - a seccomp filter that hands every namespace, mount, ptrace and file-handle
    syscall to this process, which refuses it (EPERM) and reports it to fs9 as
    an escape attempt (the kernel records the audit event);
  - each program then runs as the agent's own uid, with no capabilities,
    no_new_privs, and Landlock (Linux's unveil) allowing only the system's
    read-only directories, the view, the program's folder and a scratch folder; a
    second Landlock layer (netrules.py) refuses TCP connect and bind but to the ports
    its manifest allows (none without `inet`) and scopes abstract unix sockets and
    signals to the agent's own programs.

Everything inherits: children, double-forks, setsid, exec'd shells. A sandbox made
ahead of its agent (pooled.py) runs the same steps in two halves: what every agent has
(own_namespaces) before its agent is known, the rest (show_view, serve) once taken.
This process is a child subreaper, so escaped descendants stay ours; when fs9
closes the socket or dies (PDEATHSIG), every process of the agent's uid is killed.

Protocol on the socket spec["sock"] (SOCK_SEQPACKET, one JSON object per packet):
  fs9 -> {"op": "spawn", "id", "argv", "env", "cwd", "nice"} + fds stdin, stdout, stderr
  <- {"op": "ready"} | {"op": "started", "id", "pid"} | {"op": "error", "id", "text"}
  <- {"op": "exit", "pid", "status"} | {"op": "attempt", "pid", "syscall", "comm"}
"""
import array
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import sys

import landlock
import pyseccomp

from fs9 import resolve
from fs9.drivers import netrules, notices, programs
from fs9.drivers.confinable import landlock_call

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x10000000, 0x08000000, \
    0x40000000
# the new mount API (same numbers on x86_64 and aarch64), for binds made from fds
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_EMPTY_PATH, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = \
    0x1000, 1, 0x04, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_IDMAP = 0x1, 0x2, 0x4, 0x100000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
SPAWN_MAX = 8 << 20  # bytes of one request from fs9 (confine.SPAWN_MAX: a start's cmd and env)

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    _check(libc.mount(source and source.encode(), target.encode(),
                      fstype and fstype.encode(), ctypes.c_ulong(flags),
                      data and data.encode()), f"mount {target}")


def enter_namespace(spec: dict) -> None:
    """The agent's private namespaces: its view over MNT, secrets covered, its own IPC,
    its own (empty) network unless it pledged inet, and a /proc showing only its own."""
    own_namespaces(spec)
    show_view(spec)


def own_namespaces(spec: dict) -> None:
    """What is the same for every agent (a pooled sandbox makes it ahead: pooled.py):
    its own mount, IPC and (unless it pledged inet) network namespaces, and /proc."""
    flags = CLONE_NEWNS | CLONE_NEWIPC | (0 if spec.get("net", {}).get("inet") else CLONE_NEWNET)
    _check(libc.unshare(flags), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do leaks back out
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")


def show_view(spec: dict) -> None:
    """What is the agent's own: its view over MNT, its vault binds, its scratch tmpfs;
    then the state and vault folders covered."""
    _mount(spec["view"], spec["mnt"], None, MS_BIND)
    _mount(None, spec["mnt"], None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)
    _bind_vault(spec)
    if spec.get("scratch"):  # its scratch folder: a tmpfs of its own, bounded in size
        _mount("fs9-scratch", spec["scratch"], "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={spec.get('scratch_mb', 256)}m,mode=0700,uid={spec['uid']},"
               f"gid={spec['uid']}")
    for secret in spec["hide"]:
        if os.path.isdir(secret):
            _mount("fs9-hidden", secret, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=4k,mode=000")


def _bind_vault(spec: dict) -> None:
    """The vault subtrees it may only read, bound read-only from disk where its view
    shows them (reads at native speed; a write is EROFS), and those it owns, bound
    read-write and idmapped so that the subtree owner's files on disk are the agent's
    own (and what it makes is stored as that owner's). Before the vault's own folder
    is covered. A subtree that cannot be bound stays with fs9 (served by the mount)."""
    binds = [(rel, target, MOUNT_ATTR_RDONLY) for rel, target in spec.get("binds", ())]
    binds += [(rel, target, MOUNT_ATTR_IDMAP) for rel, target in spec.get("owned_binds", ())]
    if not binds:
        return
    vault = os.open(spec["vault"], resolve.DIR)  # the operator's choice: resolved normally
    mnt = os.open(spec["mnt"], resolve.DIR)  # now showing the view
    try:
        for rel, target, attrs in binds:
            try:
                bind_beneath(vault, rel, mnt, target, attrs, spec["uid"])
            except OSError as e:
                print(f"fs9 sandbox: {'/'.join(target)} stays with fs9: {e}", file=sys.stderr)
    finally:
        os.close(vault)
        os.close(mnt)


def bind_beneath(vault: int, rel, mnt: int, target, attrs: int, uid: int) -> None:
    """Bind the directory vault/rel over mnt/target (names), nosuid and nodev, plus
    attrs (MOUNT_ATTR_RDONLY, or MOUNT_ATTR_IDMAP: the source's owner on disk shown as
    uid inside, Linux's idmapped mounts). Both ends are resolved beneath their fd with
    no symlink followed (fs9/resolve.py) and the mount API takes the fds, so a name an
    agent swapped for a symlink (in the vault, or in the view) never binds or covers
    anything else: ELOOP, and the subtree stays with fs9. open_tree must clone a mount
    of this namespace: the fds are opened after unshare."""
    src = resolve.directory_beneath(vault, "/".join(rel).encode()) if rel else os.dup(vault)
    userns = tgt = tree = -1
    try:
        tgt = resolve.directory_beneath(mnt, "/".join(target).encode())
        if attrs & MOUNT_ATTR_IDMAP:
            st = os.fstat(src)
            userns = _userns(f"{st.st_uid} {uid} 1", f"{st.st_gid} {uid} 1")
        tree = _syscall(SYS_OPEN_TREE, src, b"", OPEN_TREE_CLONE | AT_EMPTY_PATH | os.O_CLOEXEC)
        attr = ctypes.create_string_buffer(struct.pack(
            "QQQQ", attrs | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, max(userns, 0)))
        _syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, 32)
        _syscall(SYS_MOVE_MOUNT, tree, b"", tgt, b"",
                 MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
    finally:
        for fd in (src, tgt, userns, tree):
            if fd >= 0:
                os.close(fd)


def _userns(uid_map: str, gid_map: str) -> int:
    """An fd of a new user namespace with these maps (a child makes it, then exits)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)  # so that our read below ends when the parent closes its end
        ok = libc.unshare(CLONE_NEWUSER) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "cannot make a user namespace for an idmapped mount")
        for name, text in (("uid_map", uid_map), ("setgroups", "deny"), ("gid_map", gid_map)):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _syscall(number: int, *args) -> int:
    result = libc.syscall(number, *args)
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return result


def landlock_ruleset(spec: dict, begun: tuple | None = None) -> landlock.Ruleset:
    """The agent's file-system Landlock layer: spec's read, devices and write paths.
    `begun`: (a ruleset, the part of a spec its rules were made for) made ahead by a
    pooled sandbox (pooled.py): the rules of spec's paths not in that part are added.
    (A rule holds the inode its path shows when it is made: the write paths, MNT
    among them, only once the view is bound over it.)"""
    access = landlock.FSAccess
    ruleset, done = begun or (landlock_call(landlock.Ruleset), {})
    read = access.READ_FILE | access.READ_DIR | access.EXECUTE
    for path in spec.get("read", ()):
        if path not in done.get("read", ()) and os.path.isdir(path):
            landlock_call(ruleset.allow, path, rules=read)
    for path in spec.get("devices", ()):
        if path not in done.get("devices", ()) and os.path.exists(path):
            landlock_call(ruleset.allow, path, rules=access.READ_FILE | access.WRITE_FILE)
    for path in spec.get("write", ()):
        landlock_call(ruleset.allow, path, rules=access.all())
    return ruleset


def net_ruleset(spec: dict) -> int | None:
    """The network-and-scopes Landlock layer (netrules.py) for this agent, or None."""
    net = spec.get("net", {})
    if net.get("inet"):
        return netrules.ruleset(net.get("connect"), net.get("bind"))
    # no inet: its network namespace is empty anyway; Landlock also refuses TCP, so the
    # attempt is audited (EACCES), where the kernel has network rules
    none = [] if netrules.abi() >= 4 else None
    return netrules.ruleset(none, none)


def kill_all(uid: int) -> None:
    """Every process running as the agent's uid belongs to the agent: end them all. As
    that uid, kill(-1) signals exactly the processes whose real or saved uid it is, in
    one system call that a fork cannot outrun: no walk of /proc (a thousand sandboxes
    ending at once each walked every process: an unmount took 20 s), and none missed for
    having made itself undumpable (its /proc entry is then root's). A child of ours
    takes the uid to do it and is reaped here, so no process of the uid is left over,
    not even a zombie waiting for init."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # (never the caller itself)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def serve(sock: socket.socket, spec: dict, flt: pyseccomp.SyscallFilter,
          first: "programs.Prepared | None" = None, begun: tuple | None = None) -> None:
    """Load the filter, make the Landlock layers, say ready, then start programs and
    answer the filters' notifications until fs9 closes the socket or goes. A pooled
    sandbox's (pooled.py): `first`, its first program, forked ahead (under a filter of
    its own, whose listener it handed us; it takes its uid and the layers once they
    are made, before its start), and `begun`, (its Landlock layer begun ahead, as
    landlock_ruleset takes it, and its network layer). A pooled sandbox loads its own filter only before it forks a
    second program (its first loaded its own): off the way of the first task."""
    late = first is not None and first.listener is not None
    if not late:
        flt.load()  # (before the first program's fork: it inherits it)
    if begun is not None:
        ruleset, net_fd = landlock_ruleset(spec, begun[0]), begun[1]
    else:
        ruleset, net_fd = landlock_ruleset(spec), net_ruleset(spec)
    if late:  # its first program, forked ahead, takes its uid and the layers now
        try:
            first.confine((ruleset._fd, net_fd))
        except OSError:
            first.used = True  # (it has ended: programs start as the rest do)
    # its first program, forked now (under the filter, with the layers), so that its
    # move into the control groups overlaps the rest of our set-up and fs9's first
    # start (programs.py); never used, it ends with us (parent-death signal, kill_all)
    if first is None:
        try:
            first = programs.Prepared(spec, ruleset, net_fd)
        except OSError:
            pass  # (then it starts as the rest do)
    own = None if late else programs.flt_listener(flt)  # our filter's listener
    listeners = [fd for fd in (own, first and first.listener) if fd is not None]
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)  # PDEATHSIG: fs9 is gone
    send = lambda **m: sock.send(json.dumps(m).encode())  # noqa: E731
    started: set[int] = set()
    send(op="ready")
    while True:
        ready, _, _ = select.select([sock, wake_r, *listeners], [], [])
        if wake_r in ready:
            signals = os.read(wake_r, 512)
            if signal.SIGTERM in signals:
                return
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in started:  # orphans that came to us are reaped silently
                    started.discard(pid)
                    code = os.waitstatus_to_exitcode(status)
                    send(op="exit", pid=pid, status=128 - code if code < 0 else code)
        for listener in [fd for fd in listeners if fd in ready]:
            if listener != own and notices.hung_up(listener):
                listeners.remove(listener)  # its first program's filter: nothing is left
                os.close(listener)  # under it (a read would wait for ever)
                continue
            note = notices.refuse_next(listener)
            if note is None:
                continue  # the caller died while we looked
            name = pyseccomp.resolve_syscall(note.syscall_arch, note.syscall).decode()
            try:  # (bytes the program chose: read as bytes, decoded without fail, since
                # a decoding error here would end the sandbox and every process of it)
                with open(f"/proc/{note.pid}/comm", "rb") as f:
                    comm = f.read().strip().decode(errors="replace")
            except OSError:
                comm = "?"
            send(op="attempt", pid=note.pid, syscall=name, comm=comm)
        if sock in ready:
            fds = array.array("i")
            data, ancdata, _, _ = sock.recvmsg(SPAWN_MAX, socket.CMSG_LEN(16 * fds.itemsize))
            if not data:
                return  # fs9 closed the sandbox
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
            msg = json.loads(data)
            try:
                if first is not None and not first.used:
                    pid = first.start(msg, list(fds))
                else:
                    if own is None:  # (a pooled sandbox's first loaded its own filter)
                        flt.load()  # (every program forked from now on inherits it)
                        listeners.insert(0, own := programs.flt_listener(flt))
                    pid = programs.start_program(msg, list(fds), spec, ruleset, net_fd)
                started.add(pid)
                send(op="started", id=msg["id"], pid=pid)
            except OSError as e:
                send(op="error", id=msg["id"], text=e.strerror or str(e))
            finally:
                for fd in fds:
                    os.close(fd)


def set_loginuid(spec: dict) -> None:
    """Make the agent's uid our login uid (auid), before we fork any program: every
    program inherits it, through setuid and exec, and cannot change it (no
    CAP_AUDIT_CONTROL). fs9's audit task rules give an audit context, hence
    audit, only to tasks forked with an agent's auid (drivers/auditrules.py). We,
    forked by the fork server without one, keep none (the rules are checked at fork): our own
    syscalls cost nothing extra, and only the programs we fork from now on are audited."""
    try:
        with open("/proc/thread-self/loginuid", "w") as f:
            f.write(str(spec["uid"]))
    except FileNotFoundError:
        pass  # a kernel without syscall audit: nothing to key on
    except OSError as e:  # immutable loginuids (auditctl --loginuid-immutable), no capability
        print(f"fs9 sandbox of {spec.get('agent')}: cannot set the login uid ({e}): "
              "its programs' refused syscalls are not audited", file=sys.stderr)


def arm(spec: dict) -> bool:
    """A sandbox's first steps: it dies with the fork server, is its programs' subreaper
    and is not dumpable; whether the fork server (spec["parent"]) is still there."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no one may read our memory through /proc
    return os.getppid() == spec["parent"]


def run(spec: dict, sock: socket.socket, flt: pyseccomp.SyscallFilter) -> None:
    """The sandbox's life, in a process the fork server has just forked for this agent
    (spec["parent"]: the fork server's pid): set up, serve until fs9 closes the socket
    or goes, then end every process of the agent's uid. `flt`: the seccomp filter,
    built ahead by the fork server (the same for every agent), loaded here."""
    try:
        if not arm(spec):
            return  # the fork server died before PDEATHSIG was armed
        if spec.get("audit", True):
            set_loginuid(spec)
        enter_namespace(spec)
        serve(sock, spec, flt)
    except OSError as e:
        try:
            sock.send(json.dumps({"op": "failed", "text": str(e)}).encode())
        except OSError:
            pass
    finally:
        kill_all(spec["uid"])
