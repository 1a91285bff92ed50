"""A throwaway local Ray cluster for tests and benchmarks: ``ray start --head`` on 127.0.0.1, in a temp dir and a
process session of its own, stopped by killing exactly that session's processes (``ray stop`` would stop every
Ray on the machine, other people's included)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Processes of one session: gcs_server, raylet, and the workers, which have process groups of their own
    (so killing the group alone would leave them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                pids.append(int(entry.name))
    return pids


@contextmanager
def local_cluster(
    cpus: int = 2, timeout: float = 60, gpus: int = 0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start a head node with ``cpus`` CPUs and no token authentication; yield its address (``127.0.0.1:PORT``);
    kill it afterwards. ``gpus`` declares GPU resources only (Ray hands out their ids; no device is behind them);
    ``env`` adds to the head's environment (Ray's ``RAY_<setting>`` variables)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    command = [
        ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(cpus), "--num-gpus", str(gpus), "--include-dashboard", "false", "--temp-dir", temp,
        "--disable-usage-stats",
    ]  # fmt: skip
    # Without token authentication, whatever ~/.ray/auth_token holds: a token there turns it on for `ray start`
    # but not for a driver that joins with RAY_AUTH_MODE unset, so the tests would depend on the home folder.
    # Set for this process too while the cluster runs, so that the dsearch processes it starts inherit it.
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local Ray cluster did not start (exit {head.poll()})") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for pid in session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode
