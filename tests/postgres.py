"""A real PostgreSQL for the tests: a throw-away cluster (initdb) on a free 127.0.0.1 port, one database per test.

Debian's server binaries live in /usr/lib/postgresql/<version>/bin (not on PATH); initdb refuses to run as root, so
as root the cluster is made and run as the ``postgres`` user, in a folder that user owns. Trust authentication
on loopback only, fsync off: a test cluster, never a configuration to copy.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import free_port, require_tool, wait_for


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


@dataclass
class Cluster:
    port: int
    data: Path
    pg_ctl: str
    as_user: list[str]
    proc: subprocess.Popen | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> str:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement)
            return str(cur.fetchall()) if cur.description else ""

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True, check=False)

    def start(self) -> None:
        log = self.data.parent / "postgres.log"
        options = (f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200")
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", str(log), "-w", "-t", "60", "-o",
                        options, "start"], check=True, capture_output=True)
        wait_for(self._answers, 30, 0.1, "PostgreSQL answering")

    def _answers(self) -> bool:
        try:
            self.sql("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False


def start_cluster() -> Cluster:
    initdb = require_tool(_bin("initdb"), "PostgreSQL's server (apt-get install postgresql)")
    pg_ctl = require_tool(_bin("pg_ctl"), "PostgreSQL's pg_ctl")
    require_tool(shutil.which("psql") or "psycopg", "psql")
    root = Path(tempfile.mkdtemp(prefix="ctseg-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
        os.chmod(root, 0o700)
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    cluster = Cluster(free_port(), data, pg_ctl, as_user)
    cluster.start()
    return cluster


def kill_cluster(cluster: Cluster) -> None:
    """SIGKILL the postmaster (a crash, not a shutdown)."""
    pid_file = cluster.data / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
