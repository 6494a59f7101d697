"""The event table (kernel.py `appliers`): every event kind fs9 ever records has exactly
one handler, or is declared audit-only; found by reading fs9's own source, so a new
kind without a handler (or a handler nobody records) fails here, not in a replay."""
import ast
import pathlib

from fs9.kernel.appliers import AUDIT_ONLY
from fs9.kernel.kernel import Kernel

FS9 = pathlib.Path(__file__).resolve().parent.parent / "fs9"


def kinds_written() -> dict[str, set[str]]:
    """{"record": kinds passed to Kernel.record (or as its record_many's items), "append": kinds appended to the log
    directly (EventLog.append, and "bug" from EventLog.bug), "defer": kinds logged with
    the next commit (EventLog.defer)}, from fs9's source."""
    found = {"record": set(), "append": set(), "defer": set()}
    for path in FS9.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        names = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}  # KIND = "..." at the top
        appended = set()  # the items of append_many calls: ("kind", dict(...)), logged
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "append_many":
                appended |= {id(t) for t in ast.walk(node) if _item(t)}
        for node in ast.walk(tree):
            # an item of record_many (or append_many), however it is built; an audit-only
            # one may ride in record_many's commit (it applies nothing)
            if _item(node) and node.elts[0].value not in AUDIT_ONLY:
                found["append" if id(node) in appended else "record"].add(node.elts[0].value)
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, args = node.func.attr, node.args
            if name == "bug" and _ends_in_log(node.func.value):
                found["append"].add("bug")
            elif name in ("record", "append", "defer") and args and (
                    name == "record" or _ends_in_log(node.func.value)):
                found[name] |= _constants(args[0], names)
            elif name == "cut" and len(args) > 1 and _ends_in_log(node.func.value):
                # EventLog.cut(deletes, kind): logged in the cut's transaction, then, a
                # state event, applied by its caller (Kernel.apply), as record() does
                for kind in _constants(args[1], names):
                    found["append" if kind in AUDIT_ONLY else "record"].add(kind)
    return found


def _item(node: ast.AST) -> bool:
    """("kind", dict(...)): one event of record_many / append_many."""
    return isinstance(node, ast.Tuple) and len(node.elts) == 2 and \
        isinstance(node.elts[0], ast.Constant) and isinstance(node.elts[0].value, str) and \
        isinstance(node.elts[1], ast.Call) and isinstance(node.elts[1].func, ast.Name) and \
        node.elts[1].func.id == "dict"


def _constants(kind: ast.expr, names: dict[str, str]) -> set[str]:
    """The kinds a call's kind argument can be: "x", or "x" if ... else "y", or a name
    the module sets to "x"."""
    if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
        return {kind.value}
    if isinstance(kind, ast.Name) and kind.id in names:
        return {names[kind.id]}
    if isinstance(kind, ast.IfExp):
        return _constants(kind.body, names) | _constants(kind.orelse, names)
    return set()


def _ends_in_log(value: ast.expr) -> bool:
    """`log.append(...)`, `self.log.append(...)`, `kernel.log.append(...)`."""
    return (isinstance(value, ast.Name) and value.id == "log") or \
        (isinstance(value, ast.Attribute) and value.attr == "log")


def test_every_event_kind_has_one_handler_or_is_audit_only(tmp_path):
    kernel = Kernel(str(tmp_path / "state"), str(tmp_path / "agents"))
    table = kernel.handlers
    written = kinds_written()
    assert written["record"] and written["append"]  # the scan found the calls
    assert not set(table) & AUDIT_ONLY
    every = written["record"] | written["append"] | written["defer"]
    assert every - set(table) - AUDIT_ONLY == set(), "kinds with no handler"
    # a handler nobody records is dead code (or a kind renamed on one side only); a
    # deferred state event (fed_sent) is applied by its caller at once, logged with the
    # next commit, and applied by its handler at replay
    assert set(table) - written["record"] - written["defer"] == set(), \
        "handlers for kinds never recorded"
    # an event that changes state goes through record (append, then apply): appended
    # directly, it would change the state at replay but not while running
    assert written["append"] & set(table) == set(), "state events appended, not recorded"
    # record() of an audit-only kind applies nothing: it should be a plain append
    assert written["record"] & AUDIT_ONLY == set(), "audit-only kinds recorded"


def test_a_kind_claimed_twice_is_refused(tmp_path):
    from fs9.kernel.appliers import event_table

    class Twice:
        def appliers(self):
            return {"spawn": lambda e, agent, task: None}
    kernel = Kernel(str(tmp_path / "state"), str(tmp_path / "agents"))
    try:
        event_table(kernel, Twice())
    except AssertionError as e:
        assert "spawn" in str(e)
    else:
        raise AssertionError("a second handler for spawn was accepted")
