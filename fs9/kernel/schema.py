"""The event log's tables (log.py opens them; event_retention.py's archives copy them):
`events` append-only (triggers refuse an UPDATE or a DELETE; only retention's own
transaction drops the DELETE trigger, then makes it again: NO_DELETE), task output as
`chunks`, blobs kept for a while (`kept`: a topic's bounded tail), `set_aside` (events
a replay could not apply) and the one `snapshot` (a cache of the state at an event).
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY,
    ts    REAL NOT NULL,
    kind  TEXT NOT NULL,
    agent TEXT,
    task  INTEGER,
    corr  TEXT,
    data  TEXT NOT NULL,
    blob  BLOB              -- a task's input, on its task_queued event
);
CREATE TABLE IF NOT EXISTS chunks (
    task    INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    fd      INTEGER NOT NULL,   -- 1 stdout, 2 stderr
    data    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS kept (
    seq    INTEGER PRIMARY KEY,  -- of the event whose blob this is
    stream TEXT NOT NULL,        -- what trim() cuts as one: "topic:NAME"
    data   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_task ON chunks (task, attempt, fd);
CREATE INDEX IF NOT EXISTS kept_by_stream ON kept (stream, seq);
CREATE INDEX IF NOT EXISTS events_by_corr ON events (corr) WHERE corr IS NOT NULL;
-- a retired task's events, read when its tasks/ID is looked up (finished.py)
CREATE INDEX IF NOT EXISTS events_by_task ON events (task) WHERE task IS NOT NULL;
CREATE TABLE IF NOT EXISTS set_aside (  -- events the latest replay could not apply
    seq       INTEGER PRIMARY KEY,      -- the event's, in `events` (which keeps it)
    kind      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    found     REAL NOT NULL,            -- when a replay first set it aside
    dismissed REAL                      -- when the operator dismissed it (root ctl)
);
CREATE TABLE IF NOT EXISTS snapshot (  -- the state at event seq: a cache (snapshot.py)
    id    INTEGER PRIMARY KEY CHECK (id = 1),  -- one at most; a new one replaces it
    seq   INTEGER NOT NULL,
    made  REAL NOT NULL,
    about TEXT NOT NULL,    -- JSON: format, versions, digest of the rows up to seq
    kept  BLOB NOT NULL,    -- zlib: the seqs up to seq a replay applies (int64, ascending)
    state BLOB NOT NULL     -- zlib: JSON of what the events left out changed
);
CREATE TRIGGER IF NOT EXISTS events_append_only BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
"""
NO_DELETE = """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;"""
SCHEMA += NO_DELETE
