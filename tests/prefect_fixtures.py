"""A real, throw-away Prefect server for the flow tests.

``prefect server start`` runs as a subprocess on 127.0.0.1 and a free port, with its own ``PREFECT_HOME``
(so its SQLite database lives in a temporary directory), analytics off and a fast scheduler loop, so that
scheduled runs of served deployments appear within seconds instead of the default minute. The test process
talks to it through ``PREFECT_API_URL``, set both in ``os.environ`` (for subprocesses such as
``pmi-pipeline serve``) and in Prefect's settings context (for flows run in-process). One server serves the
whole pytest session and is stopped at the end. Its database starts as a copy of an empty, migrated one
(:func:`database_template`): start-up takes 12-13 s instead of 30 s on the shared two-core machine.

Use it by importing the fixture into a test module (``from prefect_fixtures import prefect_server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).with_name("prefect")
STARTUP_TIMEOUT_S = 90.0

# Settings for every Prefect process of the test session (server, in-process client, subprocesses).
CLIENT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
}
SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Create runs of scheduled deployments every second instead of every minute.
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "true",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def database_template() -> Path | None:
    """An empty, migrated Prefect database for this Prefect version, built once per machine and then copied.

    A fresh server spends about half its start-up (13 of 30 s on two busy cores) migrating a new SQLite file.
    The template is made by ``prefect server database upgrade`` in a directory of the system's temp dir and moved
    into place atomically; each test server gets its own copy in its own home, so runs never share a database.
    None (a server that migrates its own database) if the template cannot be built.
    """
    import prefect

    final = Path(tempfile.gettempdir()) / f"pmi-prefect-db-template-{prefect.__version__}"
    if (final / "prefect.db").is_file():
        return final / "prefect.db"
    build = Path(tempfile.mkdtemp(prefix=final.name + ".build-", dir=final.parent))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(SERVER_ENV, PREFECT_HOME=str(build))
    done = subprocess.run(
        [str(PREFECT), "server", "database", "upgrade", "-y"], env=env, capture_output=True, timeout=300
    )
    if done.returncode != 0 or not (build / "prefect.db").is_file():
        shutil.rmtree(build, ignore_errors=True)
        return None
    try:
        build.rename(final)
    except OSError:  # another session built it meanwhile
        shutil.rmtree(build, ignore_errors=True)
    return final / "prefect.db" if (final / "prefect.db").is_file() else None


@dataclass
class PrefectServer:
    """A ``prefect server start`` subprocess; ``url`` is the base URL, ``api_url`` what clients use."""

    home: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self, timeout: float = STARTUP_TIMEOUT_S, *, template: Path | None = None) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        if template is not None:
            shutil.copy(template, self.home / "prefect.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        # The UI asks its API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
        env.update(SERVER_ENV, PREFECT_HOME=str(self.home), PREFECT_UI_API_URL=self.api_url)
        self.log_path = self.home / "server.log"
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited early:\n{self.log_tail()}")
            if _healthy(self.url):
                self.startup_s = time.monotonic() - t0
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The server runs in its own session: signal only that group, i.e. the server we started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@contextlib.contextmanager
def running_server(root: Path) -> Iterator[PrefectServer]:
    """Start a server under ``root`` and point this process (and its children) at it."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    server = PrefectServer(home=root / "server-home").start(template=database_template())
    client_home = root / "client-home"
    saved = {k: os.environ.get(k) for k in [*CLIENT_ENV, "PREFECT_API_URL", "PREFECT_HOME"]}
    os.environ.update(CLIENT_ENV, PREFECT_API_URL=server.api_url, PREFECT_HOME=str(client_home))
    try:
        with temporary_settings(
            updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_HOME: str(client_home),
                PREFECT_SERVER_ANALYTICS_ENABLED: False,
                PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.5,
            }
        ):
            yield server
            _flush_api_logs()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _flush_api_logs() -> None:
    """Send buffered run logs before the server goes away (else they are retried against a dead port)."""
    from prefect.logging.handlers import APILogHandler

    with contextlib.suppress(Exception):
        APILogHandler.flush()


_SESSION: dict[str, PrefectServer] = {}


@pytest.fixture(scope="session")
def prefect_server(request: pytest.FixtureRequest) -> PrefectServer:
    """One real Prefect server for the whole session, in a temporary directory removed afterwards.

    Importing this fixture into several test modules registers it once per module; the server is cached here
    so that they all share one, and it is stopped when pytest finishes.
    """
    if "server" not in _SESSION:
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pmi-prefect-"))
        _SESSION["server"] = stack.enter_context(running_server(Path(tmp)))
        request.config.add_cleanup(stack.close)
        request.config.add_cleanup(lambda: _SESSION.pop("server", None))
    return _SESSION["server"]


def api_get(server: PrefectServer, path: str) -> object:
    import json

    with urllib.request.urlopen(f"{server.api_url}{path}", timeout=10) as response:
        return json.loads(response.read())


def api_post(server: PrefectServer, path: str, body: dict | None = None) -> object:
    import json

    request = urllib.request.Request(
        f"{server.api_url}{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
