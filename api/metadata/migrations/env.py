"""Alembic environment of the metadata database.

The engine comes from ``config.attributes['engine']`` when the API upgrades itself
(``api.metadata.db.upgrade``), else from ``sqlalchemy.url`` (the ``alembic`` command).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from api.metadata.db import make_engine
from api.metadata.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of applying it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply migrations over a live connection."""
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        # Batch mode lets later revisions ALTER tables on SQLite too.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
