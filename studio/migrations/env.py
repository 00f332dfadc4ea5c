"""Alembic environment. Normally driven by `studio.db.engine.upgrade`, which passes an open connection in
`config.attributes["connection"]`; run by hand (`alembic -c studio/alembic.ini upgrade head`) it opens the
database named by `MANGO_DB_URL` (or the default data folder) itself."""

from __future__ import annotations

from alembic import context

from studio.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    # The caller's connection is already inside a BEGIN IMMEDIATE transaction (see studio.db.engine.upgrade),
    # so the whole upgrade is one SQLite transaction. render_as_batch: SQLite cannot ALTER most things in
    # place; batch mode copies the table instead (PRAGMA foreign_keys cannot change inside a transaction, so a
    # batch migration must keep foreign keys valid at every step).
    context.configure(
        connection=connection, target_metadata=target_metadata, render_as_batch=True, transactional_ddl=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    from studio.db.engine import resolve_url

    context.configure(
        url=resolve_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from studio.db.engine import create_db_engine

    engine = create_db_engine()
    try:
        with engine.execution_options(mango_begin="IMMEDIATE").begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
