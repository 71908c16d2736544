"""Start and stop a ``kvflow.launch_server`` process (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A kvflow (or stock, through the same launcher) SGLang server on localhost.

    Use as a context manager: it starts the server, waits until ``/health``
    answers, and on exit terminates the whole process group.
    """

    def __init__(self, args: list[str], log_path: str | Path | None = None, timeout: float = 300.0) -> None:
        self.port = free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="kvflow-server-", suffix=".log")[1])
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Start the process without waiting (several servers can then start side by side)."""
        self._started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvflow.launch_server", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Block until ``/health`` answers; raise if the server exits or the timeout passes."""
        deadline = self._started + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.startup_seconds = time.monotonic() - self._started
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server not ready after {self.timeout:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
