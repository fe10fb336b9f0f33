"""Management command line: serving refuses unsafe settings, keys are stored hashed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text
from svc_helpers import REPO, clean_env

from app.core.security import hash_api_key


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_without_keys_on_public_address_refused(tmp_path: Path) -> None:
    env = clean_env(SUBCLONE_STATE_DIR=str(tmp_path))
    result = run_cli(
        "serve", "--embedded", "--no-auth", "--host", "0.0.0.0", "--port", "0", env=env
    )
    assert result.returncode != 0
    assert "auth_disabled requires a loopback host" in result.stderr


def test_create_key_stores_only_hash(tmp_path: Path) -> None:
    env = clean_env(SUBCLONE_STATE_DIR=str(tmp_path))
    tenant = run_cli("create-tenant", "acme", env=env)
    assert tenant.returncode == 0, tenant.stderr
    tenant_id = tenant.stdout.strip()
    assert tenant_id.startswith("ten_")
    # Creating the same tenant again returns the same id.
    assert run_cli("create-tenant", "acme", env=env).stdout.strip() == tenant_id

    issued = run_cli("create-key", "--tenant", tenant_id, "--name", "ci", env=env)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert key.startswith("sk_")

    engine = create_engine(f"sqlite:///{tmp_path / 'subclone.db'}")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT tenant_id, key_hash FROM api_keys")).all()
    engine.dispose()
    assert rows == [(tenant_id, hash_api_key(key))]
    database = (tmp_path / "subclone.db").read_bytes()
    assert key.encode() not in database


def test_create_key_for_unknown_tenant_fails(tmp_path: Path) -> None:
    env = clean_env(SUBCLONE_STATE_DIR=str(tmp_path))
    result = run_cli("create-key", "--tenant", "ten_missing", env=env)
    assert result.returncode != 0
    assert "tenant 'ten_missing' not found" in result.stderr
