"""Test helper: real PostgreSQL and S3 (moto's server mode) processes on 127.0.0.1, free ports.

`postgres_server(...)` runs `initdb` and `pg_ctl` in a temporary folder, as an unprivileged
user when the tests run as root (initdb refuses root), and always stops and removes it.
`s3_server(...)` runs `moto_server -H 127.0.0.1 -p PORT` (a real HTTP S3, not the in-process
mock) and can stop and restart it on the same port. `postgres_missing()` / `moto_missing()`
say why a server cannot run here (the Makefile's `server-deps` installs both).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from semdedup_assets_tests.webserver import free_port, wait_for

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
PG_USER = "semdedup"  # the database role initdb creates (trust auth, loopback only)
UNPRIVILEGED = "nobody"


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    if postgres_bindir() is None:
        return "PostgreSQL is not installed (no initdb; `make server-deps` installs it with apt)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(UNPRIVILEGED)
        except KeyError:
            return f"running as root and there is no user {UNPRIVILEGED!r} to run initdb as"
    return None


def moto_missing() -> str | None:
    """Why moto's S3 server cannot run here, or None."""
    if not MOTO_SERVER.exists():
        return f"moto_server is not installed next to {sys.executable} (pip install 'moto[server]': the test extra)"
    try:
        import s3fs  # noqa: F401  (the deploy extra)
    except ImportError:
        return "s3fs is not installed (pip install -e '.[deploy]')"
    return None


def _as_user(cmd: list[str]) -> list[str]:
    """Run a command as the unprivileged user when we are root."""
    return ["runuser", "-u", UNPRIVILEGED, "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, listening on 127.0.0.1:port."""

    bindir: Path
    datadir: Path
    port: int
    log_path: Path

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of a database (psycopg2: see docs/deploy.md)."""
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(
            _as_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}\n{self.log_tail()}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl(
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            str(self.log_path),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.datadir} -c fsync=off",
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are disconnected)."""
        self._pg_ctl("stop", "-w", "-m", "fast")

    def create_database(self, name: str) -> str:
        """Create a database; returns its URL."""
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """Run SQL with psql; returns its output."""
        proc = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                PG_USER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr}")
        return proc.stdout

    def dump(self, database: str) -> str:
        """pg_dump of a database as SQL text (runs, tags, event logs, metadata: everything Dagster stored)."""
        proc = subprocess.run(
            [str(self.bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, database],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {proc.stderr}")
        return proc.stdout

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster (initdb, pg_ctl start); stopped and removed at the end."""
    bindir = postgres_bindir()
    assert bindir is not None, postgres_missing()
    # Not under pytest's tmp_path: that folder is private to root, and the server runs as nobody.
    top = Path(tempfile.mkdtemp(prefix="semdedup-pg-"))
    datadir = top / "data"
    datadir.mkdir()
    log_path = top / "postgres.log"
    log_path.touch()
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED)
        for p in (top, datadir, log_path):
            os.chown(p, user.pw_uid, user.pw_gid)
    os.chmod(datadir, 0o700)
    server = PostgresServer(bindir, datadir, free_port(), log_path)
    started = False
    try:
        proc = subprocess.run(
            _as_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stdout}{proc.stderr}")
        server.start()
        started = True
        yield server
    finally:
        if started:
            try:
                server.stop()
            except Exception:
                pass
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1:port, with credentials the clients use."""

    port: int
    log_path: Path
    access_key: str = ""  # an IAM user's key, created at start (moto then checks every signature)
    secret_key: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """The endpoint URL (AWS_ENDPOINT_URL)."""
        return f"http://127.0.0.1:{self.port}"

    def env(self, secret_key: str | None = None) -> dict[str, str]:
        """The standard AWS variables that botocore and s3fs read (never our code)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        """An s3fs filesystem on this server (for the test's own uploads and checks)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (through boto3: s3fs' mkdir sends a location constraint moto refuses)."""
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        ).create_bucket(Bucket=name)

    def start(self) -> None:
        """Start moto_server and wait until it answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115  the server writes it until stop()
        # Authentication on after the first 3 requests (user, policy, key below): from then on
        # moto refuses unknown keys and bad signatures, as S3 does.
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        self.process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"moto_server exited with {self.process.returncode}")
            return requests.get(f"{self.endpoint}/moto-api/", timeout=2).ok

        wait_for(
            "moto_server to answer",
            up,
            timeout=60,
            interval=0.2,
            log=lambda: self.log_path.read_text(errors="replace")[-3000:],
        )
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            region_name="us-east-1",
        )
        iam.create_user(UserName="semdedup")
        iam.put_user_policy(
            UserName="semdedup",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="semdedup")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        """Stop moto_server (its buckets are in memory: they are gone afterwards)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def s3_server(log_path: Path) -> Iterator[S3Server]:
    """A running moto S3 server; stopped at the end."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = S3Server(free_port(), log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_port_closed(port: int, timeout: float = 10) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:port."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} still open")
