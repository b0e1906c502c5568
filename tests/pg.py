"""A throwaway PostgreSQL server on a free loopback port, for the job store's tests."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testkit.net import free_port


@dataclass
class Postgres:
    data: Path
    port: int
    pg_ctl: str
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)


def start_postgres() -> Postgres | None:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        return None
    where = Path(tempfile.mkdtemp(prefix="pg-for-sam3-video-tests-"))  # not under a root-only folder
    # The server refuses to run as root: as root, run it as the packages' postgres user.
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = where / "data"
    data.mkdir()
    if run_as:
        shutil.chown(where, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    return Postgres(data, port, pg_ctl, run_as)
