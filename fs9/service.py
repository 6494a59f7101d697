"""What `fs9 mount` needs to run as a service: its configuration file, its log (rotated,
without other libraries' chatter) and systemd's readiness protocol (Type=notify)."""
import logging
import logging.handlers
import os
import socket
import tomllib

# `fs9 mount` options a configuration file may set (command-line options win), with the
# type each takes. The mount point stays on the command line: it names the instance.
CONFIG_KEYS = {"vault": str, "state": str, "agents": str, "durability": str,
               "metrics": str, "debug": bool, "kernel_audit": bool, "share_vault": bool,
               "otlp": str, "max_agents": int, "max_awake": int,
               "sandbox_pool": int}
LOG_BYTES = 10 << 20  # fs9.log rotates past 10 MiB, keeping LOG_KEPT old files
LOG_KEPT = 3


class ConfigError(Exception):
    pass


def config_path() -> str:
    """Where the configuration is looked for: /etc/fs9/config.toml for root, else
    $XDG_CONFIG_HOME/fs9/config.toml (~/.config/fs9/config.toml)."""
    if os.geteuid() == 0:
        return "/etc/fs9/config.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "fs9", "config.toml")


def load_config(path: str | None) -> dict:
    """The `[mount]` table of the configuration file, checked: {} if the default file
    does not exist; ConfigError (one line) if a named one does not, or is wrong. Relative
    paths in it are relative to the file's folder."""
    explicit, path = path is not None, path or config_path()
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("mount", {})
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"no configuration file {path}")
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [mount] must be a table")
    for key, value in table.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} in [mount] "
                              f"(known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, CONFIG_KEYS[key]):
            raise ConfigError(f"{path}: [mount] {key} must be a {CONFIG_KEYS[key].__name__}")
    here = os.path.dirname(os.path.abspath(path))
    return {k: os.path.join(here, os.path.expanduser(v)) if k in ("vault", "state", "agents")
            else v for k, v in table.items()}


class LogFile(logging.handlers.RotatingFileHandler):
    """fs9.log, rotated by size; stdout and stderr (libfuse's words, a crash's traceback)
    follow the live file across each rotation."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=LOG_BYTES, backupCount=LOG_KEPT)
        self._follow()

    def doRollover(self) -> None:
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        if self.stream is not None:
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def setup_logging(debug: bool, logfile: str | None) -> None:
    """fs9's own loggers at INFO (DEBUG with --debug); every other library's at WARNING,
    even with --debug (bm25s, llama-index, httpx log a line per index or call)."""
    handler = LogFile(logfile) if logfile else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fs9[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fs9").setLevel(logging.DEBUG if debug else logging.INFO)


def notify(address: str | None, state: str) -> None:
    """Tell systemd (Type=notify) the service's state, e.g. READY=1; nothing when not
    started by it (address: $NOTIFY_SOCKET, which the server takes out of its
    environment, so no agent inherits it). One datagram; '@' names an abstract socket."""
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        logging.getLogger("fs9").warning("cannot tell systemd %s: %s", state, e)
