"""Apply the Alembic migrations shipped in ``app/migrations`` to a database."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    config = Config(str(APP_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(APP_DIR / "migrations"))
    # ConfigParser treats '%' as interpolation, and passwords may contain it.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade_database(database_url: str) -> None:
    """Bring the schema to the newest revision; safe to call from several processes at once on PostgreSQL."""
    logger.info("applying database migrations")
    command.upgrade(alembic_config(database_url), "head")
