"""Engine, sessions and schema upgrades of the metadata database (``settings.metadata_url``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from tidemark.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def metadata_url_for(settings: Settings) -> str:
    """The metadata database URL: ``settings.metadata_url``, whose default SQLite file follows ``state_dir``.

    Why: local state lives in one place; a process (or test) with its own state dir gets its own
    metadata database without a second setting.
    """
    default = Settings.model_fields["metadata_url"].default
    if settings.metadata_url == default:
        return f"sqlite:///{Path(settings.state_dir) / 'metadata.db'}"
    return settings.metadata_url


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets its parent directory created and foreign keys switched on.

    ``postgresql://`` URLs are routed to the psycopg 3 driver.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_foreign_keys(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # SQLite ignores ON DELETE CASCADE unless asked per connection.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(parsed, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit (handlers return them)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    """Alembic configured in code (no alembic.ini needed): scripts in this package, this engine."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the metadata schema to ``revision`` (idempotent; run at API start)."""
    command.upgrade(alembic_config(engine), revision)
    log.info("Metadata database at revision %s (%s)", revision, engine.url.get_backend_name())


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
