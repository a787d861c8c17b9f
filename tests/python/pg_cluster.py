"""A throwaway PostgreSQL cluster for tests and the demo: initdb + pg_ctl on a free port.

Uses Debian's server binaries (``postgresql`` + ``postgresql-plpython3-15``). PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres`` OS user (its data
directory is chowned to it and the server commands run through ``runuser``); otherwise it
belongs to the current user. Host connections need a password (scram-sha-256), so the
roles the tests create behave like real logins; the Unix socket in the cluster's directory
trusts the admin.

    python tests/python/pg_cluster.py start DIR    # prints export lines for PG* variables
    python tests/python/pg_cluster.py stop DIR
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ADMIN = "deid_admin"
ADMIN_PASSWORD = "admin-test-password"  # a throwaway cluster on 127.0.0.1 only


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin dir that has plpython3u next to it, or None."""
    for pg_ctl in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True):
        root = Path(pg_ctl).parent.parent
        if (root / "lib" / "plpython3.so").exists():
            return root / "bin"
    return None


def missing_reason() -> str | None:
    """Why a cluster cannot start here (None if it can)."""
    if find_bindir() is None:
        return ("PostgreSQL server with plpython3u not installed (apt-get install postgresql "
                "postgresql-plpython3-15; .ci/run does this)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start postgres as another OS user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    port: int
    bindir: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, user: str = ADMIN, password: str = ADMIN_PASSWORD,
            dbname: str = "deid") -> str:
        return (f"host={self.host} port={self.port} dbname={dbname} user={user} "
                f"password={password} connect_timeout=5")

    def url(self, user: str = ADMIN, password: str = ADMIN_PASSWORD,
            dbname: str = "deid") -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def env(self, user: str = ADMIN, password: str = ADMIN_PASSWORD,
            dbname: str = "deid") -> dict[str, str]:
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": user,
                "PGPASSWORD": password, "PGDATABASE": dbname}

    def _server_cmd(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--",
                    *args]
        return args

    def _server_env(self) -> dict[str, str]:
        # The server's environment is what plpython3u sees: keep it minimal and secret-free.
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                "HOME": str(self.root), "TZ": "UTC"}

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._server_cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data),
                                             "-m", "immediate", "-w", "stop"]),
                           env=self._server_env(), capture_output=True, check=False)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no server log)"


def start(root: Path | None = None, *, database: str = "deid") -> Cluster:
    """initdb a new cluster under `root` (a new temp dir by default), start it, create the
    admin login and `database`. Takes about a second. On failure nothing is left running,
    and a temp dir it made is removed."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError(missing_reason())
    made = root is None
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="deid-pg-"))
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, free_port(), bindir)
    try:
        _init_and_start(cluster, database)
    except BaseException:
        cluster.stop()
        if made:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


def _init_and_start(cluster: Cluster, database: str) -> None:
    root, bindir = cluster.root, cluster.bindir
    pwfile = root / "pwfile"
    pwfile.write_text(ADMIN_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    root.chmod(0o700)
    pwfile.chmod(0o600)
    run = cluster._server_cmd
    try:
        proc = subprocess.run(run([str(bindir / "initdb"), "-D", str(cluster.data), "-U", ADMIN,
                                   "--pwfile", str(pwfile), "-E", "UTF8", "--locale=C.UTF-8",
                                   "--auth-local=trust", "--auth-host=scram-sha-256"]),
                              env=cluster._server_env(), capture_output=True, text=True,
                              check=False)
    finally:
        pwfile.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"initdb failed (the cluster's parent directories must be "
                           f"traversable by its OS user): {proc.stderr.strip()}")
    opts = (f"-p {cluster.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 "
            "-c shared_buffers=32MB -c deadlock_timeout=200ms")
    proc = subprocess.run(run([str(bindir / "pg_ctl"), "-D", str(cluster.data), "-l",
                               str(root / "server.log"), "-o", opts, "-w", "-t", "30", "start"]),
                          env=cluster._server_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {proc.stderr.strip()}\n{cluster.log_tail()}")
    admin_sql(cluster, f"create database {database}", dbname="postgres")


def admin_sql(cluster: Cluster, sql: str, *, dbname: str = "deid") -> None:
    """Run SQL as the admin over TCP (psycopg2, autocommit)."""
    import psycopg2

    deadline = time.monotonic() + 10
    while True:
        try:
            conn = psycopg2.connect(cluster.dsn(dbname=dbname))
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def destroy(cluster: Cluster) -> None:
    cluster.stop()
    with contextlib.suppress(OSError):
        shutil.rmtree(cluster.root)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print("usage: pg_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    root = Path(argv[2]).resolve()
    if argv[1] == "start":
        reason = missing_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        cluster = start(root)
        (root / "port").write_text(str(cluster.port))
        for k, v in cluster.env().items():
            print(f"export {k}={v}")
        return 0
    bindir = find_bindir()
    if bindir is None or not (root / "port").exists():
        return 0
    Cluster(root, int((root / "port").read_text()), bindir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
