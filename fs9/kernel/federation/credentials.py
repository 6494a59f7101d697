"""Per-member NATS credentials: each member signs in with an nkey of its own, and the
server lets it publish only as itself.

Without them any client of the nats-server (an agent with the `inet` pledge and no
`[net]` port list reaches a local one) may publish on `fs9.fed.TO.FROM` as any OS, read
any member's mail through a consumer of its own, or ack it away. With them:
  - a member holds its nkey's seed in a file only the operator reads (`key_file`): fs9
    reads it as root, so the file and every directory above it must be the operator's
    and writable by nobody else (ssh's StrictModes rule), no symlink on the way;
  - the server's configuration holds the public keys alone, each user with the
    permissions `permissions(OS)` gives: publish on `fs9.fed.*.OS` and `fs9.card.OS`,
    its own durable consumer's API and acks, the cards' reads; replies only under its
    own inbox prefix (`inbox(OS)`), so no member reads another's fetches or acks.
`fs9 federation-keys DIR OS...` makes the seeds and the server's `authorization` block
(`authorization`); members run by different operators each make a seed and hand over
the public key alone. Blocking (file reads); pure apart from them.
"""
import errno
import os
import stat

import nkeys

from ...errors import Fs9Error

MAX_KEY_FILE = 4096


def inbox(me: str) -> str:
    """The reply subjects' prefix of member `me` (the only ones it may subscribe to)."""
    return f"_INBOX.{me}"


def permissions(me: str) -> dict[str, list[str]]:
    """What member `me` may publish and subscribe to (engine.py's subjects and the
    JetStream API calls nats-py makes for them). Stream updates, deletes, purges and
    other members' consumers are not in it: the NATS server's operator does those."""
    api, durable = "$JS.API", f"fs9-{me}"
    return {"publish": [
        f"fs9.fed.*.{me}", f"fs9.card.{me}",
        f"{api}.INFO", f"{api}.STREAM.INFO.FS9FED", f"{api}.STREAM.INFO.FS9CARDS",
        f"{api}.STREAM.CREATE.FS9FED", f"{api}.STREAM.CREATE.FS9CARDS",
        # the consumer's filter is in the subject: the server holds the body to it
        f"{api}.CONSUMER.CREATE.FS9FED.{durable}.fs9.fed.{me}.*",
        f"{api}.CONSUMER.INFO.FS9FED.{durable}",
        f"{api}.CONSUMER.MSG.NEXT.FS9FED.{durable}",
        f"$JS.ACK.FS9FED.{durable}.>",
        f"{api}.STREAM.MSG.GET.FS9CARDS", f"{api}.DIRECT.GET.FS9CARDS.>"],
        "subscribe": [f"{inbox(me)}.>"]}


def new_seed() -> tuple[bytes, str]:
    """A new user nkey: (its seed, the file's content; its public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed, public_key(seed)


def public_key(seed: bytes) -> str:
    """The public key of a user seed; Fs9Error(EINVAL) for what is none."""
    try:
        if not seed.startswith(b"SU"):
            raise ValueError
        return nkeys.from_seed(bytearray(seed)).public_key.decode()
    except Exception:  # (nkeys raises its own kinds, and binascii's)
        raise Fs9Error(errno.EINVAL, "not an nkey user seed (SU...): make one with "
                                     "`fs9 federation-keys`") from None


def authorization(members: dict[str, str]) -> str:
    """nats-server configuration: an `authorization` block with one user per member
    (OS -> public key), each with its `permissions`."""
    users = []
    for me, key in sorted(members.items()):
        p = permissions(me)
        users.append(f'    {{ nkey: "{key}"\n      permissions: {{\n'
                      f'        publish: {{ allow: {_list(p["publish"])} }}\n'
                      f'        subscribe: {{ allow: {_list(p["subscribe"])} }}\n'
                      f'      }} }}  # {me}')
    return "authorization {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"


def _list(subjects: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def read_seed(path: str) -> str:
    """The seed in the key file at `path` (absolute), read as root only if nobody but
    the operator could have put it there: the file and each directory from / down are
    owned by root or by this process's user, none writable by group or others (a
    sticky directory, /tmp, passes: nobody else may rename what is ours in it), the
    file readable by nobody else, no symlink anywhere. Fs9Error(EACCES|EINVAL|ENOENT)
    with the reason otherwise."""
    if not path.startswith("/"):
        raise Fs9Error(errno.EINVAL, f"key file {path!r}: an absolute path")
    names = [n for n in path.split("/") if n]
    if not names or any(n in (".", "..") for n in names):
        raise Fs9Error(errno.EINVAL, f"key file {path!r}: no '.' or '..' in it")
    owners = {0, os.geteuid()}
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        where = ""
        for i, name in enumerate(names):
            st = os.fstat(fd)
            if st.st_uid not in owners or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                raise Fs9Error(errno.EACCES, f"key file {path}: {where or '/'} may be changed "
                                             "by others than the operator")
            last = i == len(names) - 1
            flags = (os.O_RDONLY if last else os.O_PATH | os.O_DIRECTORY) | \
                os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                why = "a symlink" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
                raise Fs9Error(e.errno if e.errno == errno.ENOENT else errno.EACCES,
                               f"key file {path}: {where}/{name}: {why}") from None
            os.close(fd)
            fd, where = nxt, f"{where}/{name}"
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Fs9Error(errno.EACCES, f"key file {path}: not a regular file")
        if st.st_uid not in owners or st.st_mode & 0o077:
            raise Fs9Error(errno.EACCES, f"key file {path}: readable or writable by others "
                                         "than the operator (chmod 600 it)")
        seed = os.read(fd, MAX_KEY_FILE).strip()
    finally:
        os.close(fd)
    public_key(seed)  # (EINVAL for what is not a seed)
    return seed.decode()


def write_keys(folder: str, members: list[str]) -> dict[str, str]:
    """`fs9 federation-keys`: in folder (made 0700 if missing), OS.nk, a new seed (0600)
    for each member that has none, and auth.conf (0600), the server's `authorization`
    block for every OS.nk there (include it in the nats-server configuration). Returns
    OS -> public key. Fs9Error(EINVAL) for a bad OS name."""
    from ..names import OS_RE
    bad = [m for m in members if not OS_RE.fullmatch(m)]
    if bad:
        raise Fs9Error(errno.EINVAL, f"bad OS name {bad[0]!r}: letters, digits, _ and -")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for me in members:
        try:
            fd = os.open(os.path.join(folder, f"{me}.nk"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue  # (a member's key is kept: its fs9 may have joined with it)
        with os.fdopen(fd, "wb") as f:
            f.write(new_seed()[0] + b"\n")
    keys = {}
    for name in sorted(os.listdir(folder)):
        me = name.removesuffix(".nk")
        if name.endswith(".nk") and OS_RE.fullmatch(me):
            keys[me] = public_key(read_seed(os.path.abspath(os.path.join(folder, name))).encode())
    conf = os.path.join(folder, "auth.conf")
    fd = os.open(conf + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(authorization(keys))
    os.replace(conf + ".new", conf)
    return keys
