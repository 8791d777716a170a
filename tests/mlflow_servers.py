"""A real PostgreSQL server and an MLflow tracking server on top of it, for the tests that track where a cluster
would: PostgreSQL from Debian's `postgresql` package (`make install` installs it as root) on 127.0.0.1 in a
temporary directory, and `mlflow server` on it, driven over HTTP."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _postgres_bin() -> Path | None:
    """The newest `/usr/lib/postgresql/<version>/bin` with initdb and pg_ctl (Debian's layout), else PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bin_dir in candidates:
        if (bin_dir / "initdb").exists() and (bin_dir / "pg_ctl").exists():
            return bin_dir
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    bin_dir: Path
    root: Path
    port: int
    user: str
    password: str
    database: str
    run_as: list[str]

    @property
    def uri(self) -> str:
        # The driver is explicit: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the image lacks.
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb + pg_ctl start on 127.0.0.1:<free port> in a fresh temporary directory; password auth over TCP,
    as a remote database would be used. PostgreSQL refuses to run as root, so as root it runs as `postgres`."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL binaries (initdb, pg_ctl) not found: `apt-get install postgresql` (make install does)"
        )
    run_as: list[str] = []
    owner_uid = os.geteuid()
    if owner_uid == 0:
        try:
            owner_uid = pwd.getpwnam("postgres").pw_uid
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="medplib-pg-"))  # not pytest's tmp_path: `postgres` must reach it
    os.chown(root, owner_uid, -1)
    root.chmod(0o700)
    pg = Postgres(bin_dir, root, free_port(), "medplib", f"pw-{os.urandom(6).hex()}", "mlflow", run_as)
    pwfile = root / "pwfile"
    pwfile.write_text(pg.password + "\n")
    os.chown(pwfile, owner_uid, -1)
    try:
        init = subprocess.run(
            [
                *run_as,
                str(bin_dir / "initdb"),
                "-D",
                str(root / "data"),
                "-U",
                pg.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-locale",
                "-E",
                "UTF8",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {root} -c fsync=off"
        start = pg.ctl("-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60", "start")
        log = root / "postgres.log"
        assert start.returncode == 0, (
            f"pg_ctl start failed:\n{start.stderr}\n{log.read_text() if log.exists() else ''}"
        )
        created = subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, pg.database],
            env={**os.environ, "PGPASSWORD": pg.password},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, f"createdb failed: {created.stderr}"
        yield pg
    finally:
        pg.ctl("-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class MlflowServer:
    url: str
    artifacts: Path
    process: subprocess.Popen[bytes]
    log: Path


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"mlflow server exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise AssertionError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path) -> Iterator[MlflowServer]:
    """`mlflow server` as infra/mlflow runs it (database backend, proxied artifact store), on loopback, with the
    job runner off (it saves about 1.3 GB and 10 s)."""
    port = free_port()
    artifacts = workdir / "artifacts"
    log = workdir / "mlflow-server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # Configured the way infra/mlflow/mlflow.yaml and compose.yaml do it: the store locations and allowed hosts as
    # MLFLOW_* variables (the password stays out of the arguments), the rest as flags.
    command = [
        str(mlflow_cli) if mlflow_cli.exists() else "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow*,localhost*,127.0.0.1*",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log, timeout_s=180)
        yield MlflowServer(url, artifacts, process, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def table_count(pg: Postgres, table: str) -> int:
    import psycopg2

    with (
        contextlib.closing(
            psycopg2.connect(
                host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname=pg.database
            )
        ) as conn,
        conn.cursor() as cursor,
    ):
        cursor.execute(f"SELECT count(*) FROM {table}")  # table names are literals of this file
        return int(cursor.fetchone()[0])
