"""Command line of the service: serve, run migrations, manage tenants and API keys.

    python -m app serve --embedded            # API + worker, SQLite, local artifacts
    python -m app serve                       # API only; Celery workers run the jobs
    python -m app create-tenant acme          # prints the tenant id
    python -m app create-key --tenant ten_... # prints a new API key once

Settings come from ``SUBCLONE_*`` environment variables; the flags below
override the most common ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from app.core.config import Settings, get_settings

logger = logging.getLogger(__name__)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _apply_overrides(args: argparse.Namespace) -> None:
    # Flags become environment variables because the worker process reads its
    # settings from the environment and must get the same values.
    overrides = {
        "SUBCLONE_STATE_DIR": getattr(args, "state_dir", None),
        "SUBCLONE_DATABASE_URL": getattr(args, "database_url", None),
        "SUBCLONE_HOST": getattr(args, "host", None),
        "SUBCLONE_PORT": getattr(args, "port", None),
    }
    if getattr(args, "embedded", None) is not None:
        overrides["SUBCLONE_EMBEDDED"] = "true" if args.embedded else "false"
    if getattr(args, "no_auth", False):
        overrides["SUBCLONE_AUTH_DISABLED"] = "true"
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)


def _load_settings() -> Settings:
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        messages = "; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors())
        raise SystemExit(f"invalid settings: {messages}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.logging import configure_logging
    from app.db.migrate import upgrade_database
    from app.embedded import WorkerSupervisor, bind_socket
    from app.main import create_app

    settings = _load_settings()
    configure_logging(settings.log_level)
    upgrade_database(settings.resolved_database_url)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    app = create_app(settings)

    supervisor = None
    if settings.embedded and not args.no_worker:
        supervisor = WorkerSupervisor(settings)
        app.state.supervisor = supervisor
        supervisor.start()

    url_host = f"[{host}]" if ":" in host else host
    logger.info(
        "listening on http://%s:%d (%s mode)",
        url_host,
        port,
        "embedded" if settings.embedded else "api",
    )
    if args.port_file:
        Path(args.port_file).write_text(str(port))
    config = uvicorn.Config(
        app, log_level=settings.log_level.lower(), access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.core.logging import configure_logging
    from app.db.migrate import upgrade_database

    settings = _load_settings()
    configure_logging(settings.log_level)
    upgrade_database(settings.resolved_database_url)
    return 0


def cmd_create_tenant(args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade_database
    from app.db.session import session_scope
    from app.tenants import ensure_tenant

    settings = _load_settings()
    upgrade_database(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        tenant = ensure_tenant(session, args.name)
        tenant_id = tenant.id
    _out(tenant_id)
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.core.errors import NotFound
    from app.db.migrate import upgrade_database
    from app.db.session import session_scope
    from app.tenants import ensure_tenant, issue_key

    settings = _load_settings()
    upgrade_database(settings.resolved_database_url)
    try:
        with session_scope(settings.resolved_database_url) as session:
            tenant_id = args.tenant
            if args.tenant_name:
                tenant_id = ensure_tenant(session, args.tenant_name).id
            issued = issue_key(session, tenant_id, name=args.name or "")
    except NotFound as exc:
        raise SystemExit(
            f"{exc.detail}; create it with 'python -m app create-tenant NAME'"
        ) from None
    _out(issued.secret)
    sys.stderr.write(
        f"key {issued.key_id} for tenant {issued.tenant_id}; the key is shown only once\n"
    )
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from app.core.errors import NotFound
    from app.db.session import session_scope
    from app.tenants import revoke_key

    settings = _load_settings()
    try:
        with session_scope(settings.resolved_database_url) as session:
            revoke_key(session, args.key_id)
    except NotFound as exc:
        raise SystemExit(exc.detail) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="subclone job service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Run the HTTP API (with a worker in embedded mode).")
    mode = serve.add_mutually_exclusive_group()
    mode.add_argument(
        "--embedded",
        dest="embedded",
        action="store_true",
        default=None,
        help="API and a job-table worker on this machine; no broker (the default).",
    )
    mode.add_argument(
        "--api-only",
        dest="embedded",
        action="store_false",
        help="API only; jobs go to Celery workers through the broker.",
    )
    serve.add_argument("--host", help="Bind address (default 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port; 0 picks a free one (default 8000).")
    serve.add_argument(
        "--state-dir", help="Directory for SQLite, artifacts and caches (default ./var)."
    )
    serve.add_argument(
        "--database-url", help="SQLAlchemy URL (default: SQLite in the data directory)."
    )
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="Accept requests without an API key (embedded mode on loopback only).",
    )
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="Embedded mode without starting the worker process.",
    )
    serve.add_argument("--port-file", help="Write the bound port to this file once listening.")
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser("migrate", help="Apply database migrations and exit.")
    migrate.add_argument("--database-url", help="SQLAlchemy URL.")
    migrate.set_defaults(handler=cmd_migrate)

    tenant = commands.add_parser(
        "create-tenant", help="Create a tenant (or find it by name) and print its id."
    )
    tenant.add_argument("name", help="Tenant name, unique.")
    tenant.add_argument("--database-url", help="SQLAlchemy URL.")
    tenant.set_defaults(handler=cmd_create_tenant)

    key = commands.add_parser("create-key", help="Create an API key and print it once.")
    owner = key.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="Tenant id (ten_...).")
    owner.add_argument("--tenant-name", help="Tenant name; created if it does not exist.")
    key.add_argument("--name", help="Label for the key.")
    key.add_argument("--database-url", help="SQLAlchemy URL.")
    key.set_defaults(handler=cmd_create_key)

    revoke = commands.add_parser("revoke-key", help="Revoke an API key by its id (key_...).")
    revoke.add_argument("key_id")
    revoke.add_argument("--database-url", help="SQLAlchemy URL.")
    revoke.set_defaults(handler=cmd_revoke_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_overrides(args)
    return int(args.handler(args))
