"""A real Ray head started with ``ray start --head --block`` in a subprocess, for launch tests.

It gets explicit free ports and a temporary folder of its own (so no ``ray_current_cluster``
pointer is left in the machine's default Ray folder), inherits the test session's token
authentication (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), and is stopped by its own process
id: ``ray start --block`` stops the processes it started when it is terminated.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PORT_OPTIONS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
    "--metrics-export-port",
)


# Ports for worker processes: the head's workers, the job supervisor and the job's tasks.
WORKER_PORTS = 100


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    gcs_address: str
    dashboard_url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def start_head(
    num_cpus: int = 2, env: dict[str, str] | None = None, temp_dir: Path | None = None, timeout_s: float = 120
) -> RayHead:
    """Start a head and wait until its dashboard (the Jobs API) answers.

    ``temp_dir`` is Ray's folder for the head (``--temp-dir``), where ``ray start`` also writes its
    ``ray_current_cluster`` pointer; by default a new short folder under /tmp.
    """
    # Short: Ray's socket paths live under it and must stay under the 107-byte limit.
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True))
    lo = free_ports(1)[0]
    while any(lo <= port <= lo + WORKER_PORTS for port in ports.values()) or lo + WORKER_PORTS > 65535:
        lo = free_ports(1)[0]
    cmd = [
        bin_path("ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", *(f"{opt}={port}" for opt, port in ports.items()),
        f"--min-worker-port={lo}", f"--max-worker-port={lo + WORKER_PORTS}",
    ]
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
    log = open(temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    head = RayHead(
        process=process,
        temp_dir=temp_dir,
        gcs_address=f"127.0.0.1:{ports['--port']}",
        dashboard_url=f"http://127.0.0.1:{ports['--dashboard-port']}",
    )
    deadline = time.monotonic() + timeout_s
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (temp_dir / "ray-start.log").read_text(errors="replace")
            head.stop()
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{text}")
        try:
            with urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2):
                return head
        except urllib.error.HTTPError:  # it answers (an auth error is still an answer)
            return head
        except OSError:
            time.sleep(1)
    head.stop()
    raise RuntimeError("the Ray head's dashboard did not answer in time")
