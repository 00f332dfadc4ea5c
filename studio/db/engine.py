"""Engine setup and migrations.

SQLite is used from Gradio's thread pool and, in tests, from several processes at once, so every connection
gets: WAL (readers never block the writer), a busy timeout, foreign keys on, and `check_same_thread=False`
(safe because a connection is only ever used by one session at a time, one session per call). pysqlite's own
implicit BEGIN is switched off and we emit BEGIN ourselves: writes use `BEGIN IMMEDIATE`, which takes the write
lock up front (waiting on the busy timeout) instead of failing later when a read lock cannot be upgraded."""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
BUSY_TIMEOUT_S = 10.0
# Alembic keeps its running context in module globals: one migration at a time per process. (Across processes,
# the BEGIN IMMEDIATE around each upgrade serialises them.)
_MIGRATION_LOCK = threading.Lock()


def default_data_dir() -> Path:
    """`MANGO_DATA_DIR`, else `$XDG_DATA_HOME/mango`, else `~/.local/share/mango`."""
    if os.environ.get("MANGO_DATA_DIR"):
        return Path(os.environ["MANGO_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "mango"


def resolve_url(url: str | None = None) -> str:
    """The explicit URL, else `MANGO_DB_URL`, else `sqlite:///<data dir>/mango.db`."""
    url = url or os.environ.get("MANGO_DB_URL")
    if url:
        return url
    return f"sqlite:///{default_data_dir() / 'mango.db'}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases and other backends."""
    u = make_url(url)
    if (
        u.get_backend_name() != "sqlite"
        or u.database in (None, "", ":memory:")
        or u.database.startswith("file:")
    ):
        return None
    return Path(u.database).expanduser()


def create_db_engine(url: str | None = None, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> Engine:
    """An engine for `url` (see `resolve_url`) with the connection settings above. Creates the data folder."""
    url = resolve_url(url)
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": busy_timeout_s},
    }
    # Gradio runs up to 40 callbacks at once; SQLite connections are cheap, so let the pool grow that far
    # rather than make callbacks queue for a connection.
    pool = {"pool_size": 5, "max_overflow": 45}
    path = sqlite_path(url)
    if path is None:
        kwargs["poolclass"] = StaticPool  # one shared connection, or every session would see its own empty DB
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(pool)
        if u.database != str(path):
            u = u.set(database=str(path))
    engine = create_engine(u, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys = ON")
        if path is not None:
            cur.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit that returned survives power loss too, not only a killed process.
            cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("mango_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def alembic_config() -> Config:
    """Alembic configuration built in code: works from an installed package, whatever the working folder."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head", *, backup_before: bool = True) -> None:
    """Bring the schema to `revision`, in one `BEGIN IMMEDIATE` transaction (so concurrent starts serialise
    and a failed upgrade leaves the database as it was). An existing database file at an older revision is
    first copied to `<file>.pre-<revision>-<UTC time>.bak`."""
    current = current_revision(engine)
    target = head_revision() if revision == "head" else revision
    if current == target:
        return
    path = sqlite_path(str(engine.url))
    if backup_before and current is not None and path is not None and path.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        copy_sqlite(engine, path.with_name(f"{path.name}.pre-{target}-{stamp}.bak"))
    cfg = alembic_config()
    # One transaction we own, begun IMMEDIATE: Alembic then leaves transactions alone, reads the current
    # revision under the write lock, and a failure rolls every step back.
    with _MIGRATION_LOCK, engine.execution_options(mango_begin="IMMEDIATE").begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the schema back to `revision` (for development; the app itself only ever upgrades). A database
    file is first copied to `<file>.pre-<revision>-<UTC time>.bak`: downgrades drop tables."""
    path = sqlite_path(str(engine.url))
    if path is not None and path.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        copy_sqlite(engine, path.with_name(f"{path.name}.pre-{revision}-{stamp}.bak"))
    cfg = alembic_config()
    # One transaction we own, begun IMMEDIATE: Alembic then leaves transactions alone, reads the current
    # revision under the write lock, and a failure rolls every step back.
    with _MIGRATION_LOCK, engine.execution_options(mango_begin="IMMEDIATE").begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def copy_sqlite(engine: Engine, dest: Path) -> None:
    """A consistent copy of a live database (WAL included) through sqlite's online backup API, written as one
    self-contained file (rollback journal mode, no -wal/-shm companions)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    raw = engine.raw_connection()
    try:
        target = sqlite3.connect(str(dest))
        try:
            raw.driver_connection.backup(target)  # type: ignore[union-attr]
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()
    finally:
        raw.close()


def init_db(url: str | None = None) -> Engine:
    """Engine for `url`, with the schema upgraded to the newest revision. Call once at start."""
    engine = create_db_engine(url)
    upgrade(engine)
    return engine


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "copy_sqlite",
    "create_db_engine",
    "current_revision",
    "default_data_dir",
    "downgrade",
    "head_revision",
    "init_db",
    "known_revisions",
    "resolve_url",
    "sqlite_path",
    "upgrade",
]
