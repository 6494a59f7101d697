"""`fs9 top MOUNTPOINT`: a live terminal view of a mount (textual), refreshed each second.

The data comes from fs9/top.py (the mount's files only). Everything shown was written by
agents or the kernel about them, so it is shown as plain text, never as textual markup.
"""
import sys
import threading
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Log, Static
from textual.widgets.data_table import CellDoesNotExist

from . import top

REFRESH_S = 1.0


class TopApp(App):
    TITLE = "fs9 top"
    CSS = """
    #agents { height: 2fr; }
    #middle { height: 2fr; border-top: solid $accent; }
    #tree { width: 1fr; padding: 0 1; }
    #models { width: 2fr; border-left: solid $accent; }
    #approvals { height: 1fr; border-top: solid $accent; }
    #events { height: 1fr; border-top: solid $accent; }
    #kernel, #said { height: 1; }
    """
    BINDINGS = [
        Binding("s", "agent('stop')", "stop"),
        Binding("g", "agent('start')", "start"),
        Binding("r", "agent('restart')", "restart"),
        Binding("b", "agent('reset')", "reset breaker"),
        Binding("a", "answer('approve')", "approve"),
        Binding("d", "answer('deny')", "deny"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, mountpoint: Path) -> None:
        super().__init__()
        self.mnt = Path(mountpoint)
        self.tail: top.EventTail | None = None
        self.reading = threading.Lock()

    def compose(self) -> ComposeResult:
        yield Static(id="kernel")
        yield DataTable(id="agents", cursor_type="row")
        with Horizontal(id="middle"):
            yield Static(id="tree")
            yield DataTable(id="models", cursor_type="none")
        yield DataTable(id="approvals", cursor_type="row")
        yield Log(id="events", max_lines=top.EVENT_LINES)
        yield Static(id="said")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#agents", DataTable).add_columns(
            "agent", "state", "task", "elapsed", "queue", "restarts", "tokens today",
            "progress", "reason")
        self.query_one("#models", DataTable).add_columns(
            "model", "state", "calls", "tokens in/out", "in flight", "breaker")
        self.query_one("#approvals", DataTable).add_columns(
            "approval", "agent", "action", "what", "deadline")
        try:
            self.tail = top.EventTail(self.mnt)
        except OSError as e:
            self.say(f"events: {e.strerror}")
        self.query_one("#agents", DataTable).focus()
        self.gather()
        self.set_interval(REFRESH_S, self.gather)

    @work(thread=True)
    def gather(self) -> None:
        """Read the mount in a thread: a slow or remote mount never freezes the keys. One
        read at a time (the events tail keeps a partial line); a refresh due meanwhile
        is skipped."""
        if not self.reading.acquire(blocking=False):
            return
        try:
            snap = top.snapshot(self.mnt)
            lines = self.tail.new_lines() if self.tail else []
        finally:
            self.reading.release()
        self.call_from_thread(self.show, snap, lines)

    def show(self, snap: top.Snapshot, lines: list[str]) -> None:
        self.query_one("#kernel", Static).update(Text(f"{self.mnt}  {snap.kernel}"))
        self.query_one("#tree", Static).update(Text(snap.tree or "(no agents)"))
        _fill(self.query_one("#agents", DataTable),
              [(a.name, [a.name, a.state, a.task, a.elapsed, a.queued, a.restarts,
                         a.tokens_today, a.progress, a.reason]) for a in snap.agents])
        _fill(self.query_one("#models", DataTable),
              [(m.name, [m.name, m.state, m.calls, m.tokens, m.in_flight, m.breaker])
               for m in snap.models])
        _fill(self.query_one("#approvals", DataTable),
              [(p.id, [p.id, p.agent, p.action, p.what, p.deadline]) for p in snap.approvals])
        if lines:
            self.query_one("#events", Log).write_lines(top.event_line(x) for x in lines)

    def action_agent(self, verb: str) -> None:
        name = _selected(self.query_one("#agents", DataTable))
        if name:
            self.say(top.command(self.mnt, name, verb) or f"{verb} {name}")
            self.gather()

    def action_answer(self, verb: str) -> None:
        aid = _selected(self.query_one("#approvals", DataTable))
        if aid:
            self.say(top.answer(self.mnt, aid, verb) or f"{verb} approval {aid}")
            self.gather()

    def say(self, line: str) -> None:
        self.query_one("#said", Static).update(Text(line))

    def on_unmount(self) -> None:
        if self.tail:
            self.tail.close()


def _fill(table: DataTable, rows: list[tuple[str, list[str]]]) -> None:
    """Replace the table's rows, keeping the cursor on the same key where it still is."""
    keep = _selected(table)
    table.clear()
    for key, cells in rows:
        table.add_row(*(Text(c) for c in cells), key=key)
    keys = [key for key, _ in rows]
    if keep in keys:
        table.move_cursor(row=keys.index(keep))


def _selected(table: DataTable) -> str | None:
    if not table.row_count:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except CellDoesNotExist:  # the cursor is past the rows a refresh left
        return None


def run(mountpoint: str) -> int:
    if top.read(Path(mountpoint) / "ctl") is None:
        print(f"fs9: {mountpoint} is not an fs9 mount the operator can read", file=sys.stderr)
        return 1
    TopApp(Path(mountpoint)).run()
    return 0
