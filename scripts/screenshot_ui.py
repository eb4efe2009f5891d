#!/usr/bin/env python
"""Screenshots of the Prefect UI showing the pipeline's runs and artifacts, taken with headless Chromium.

Needs a Chromium binary (Debian/Ubuntu: ``apt-get install chromium``); this script installs nothing.

Two ways to run it::

    # against a server that already holds pipeline runs (PREFECT_API_URL or --url)
    python scripts/screenshot_ui.py --url http://127.0.0.1:4200

    # self-contained: a throw-away server, `pmi-pipeline demo` run against it, the pictures, server stopped
    python scripts/screenshot_ui.py --start-server

It writes, in ``docs/img/``: ``prefect-ui-runs.png`` (the flow runs list), ``prefect-ui-flow-run.png`` (the
latest ``pipeline`` run with its subflows and logs), ``prefect-ui-artifact.png`` (the pipeline's learning
curves, a picture artifact) and ``prefect-ui-table.png`` (the embedding summary, a table artifact). The UI is
a single-page app that loads its data after the page itself: Chromium's ``--virtual-time-budget`` lets it
finish before the picture is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
)
#: Artifacts to show, first found wins.
PICTURE_ARTIFACTS = ("pipeline-curves", "train-curve-plot-cosine")
TABLE_ARTIFACTS = ("embed-summary", "pipeline-summary", "train-metrics-cosine")


def find_chromium(explicit: str | None) -> str:
    for name in (explicit, *CHROMIUM_NAMES):
        if name and (path := shutil.which(name)):
            return path
    sys.exit("no Chromium found: install it (apt-get install chromium) or pass --chromium PATH")


def api(base_url: str, path: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base_url}/api{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def screenshot(chromium: str, url: str, out: Path, window: str, wait_ms: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmi-chromium-") as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    if not out.exists() or out.stat().st_size == 0:
        sys.exit(f"chromium wrote no picture for {url}")
    print(f"{out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}  <-  {url}")
    return out


def latest_flow_run(base_url: str, flow_name: str) -> dict | None:
    runs = api(
        base_url,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC", "limit": 1},
    )
    return runs[0] if runs else None


def latest_artifact(base_url: str, keys: tuple[str, ...]) -> dict | None:
    for key in keys:
        found = api(
            base_url,
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": [key]}}, "limit": 1, "sort": "CREATED_DESC"},
        )
        if found:
            return found[0]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_server(home: Path) -> Iterator[str]:
    """``prefect server start`` on a free port with its database under ``home``; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"{url}/api",  # else the UI asks port 4200
    )
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if api(url, "/health") is True:
                    break
            if proc.poll() is not None:
                sys.exit(f"prefect server exited; see {home / 'server.log'}")
            time.sleep(0.5)
        else:
            sys.exit("prefect server did not become healthy in 120 s")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def run_demo(url: str, out_dir: Path, extra: list[str]) -> None:
    env = dict(os.environ, PREFECT_API_URL=f"{url}/api")
    cmd = [sys.executable, "-m", "pmi_pipeline", "demo", "--out", str(out_dir), *extra]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)


def take_pictures(args: argparse.Namespace, base_url: str) -> list[Path]:
    chromium = find_chromium(args.chromium)
    out_dir = Path(args.out_dir)
    runs_png = out_dir / "prefect-ui-runs.png"
    shots = [screenshot(chromium, f"{base_url}/runs", runs_png, args.window, args.wait_ms)]
    run = latest_flow_run(base_url, "pipeline")
    if run is not None:
        shots.append(
            screenshot(
                chromium,
                f"{base_url}/runs/flow-run/{run['id']}",
                out_dir / "prefect-ui-flow-run.png",
                args.window,
                args.wait_ms,
            )
        )
    else:
        print("no `pipeline` flow run on this server: flow-run picture skipped", file=sys.stderr)
    for keys, name in ((PICTURE_ARTIFACTS, "prefect-ui-artifact.png"), (TABLE_ARTIFACTS, "prefect-ui-table.png")):
        artifact = latest_artifact(base_url, keys)
        if artifact is None:
            print(f"none of the artifacts {keys} here: {name} skipped", file=sys.stderr)
            continue
        url = f"{base_url}/artifacts/artifact/{artifact['id']}"
        shots.append(screenshot(chromium, url, out_dir / name, args.window, args.wait_ms))
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server base URL (default: PREFECT_API_URL without /api)")
    parser.add_argument(
        "--start-server",
        action="store_true",
        help="start a throw-away server and run `pmi-pipeline demo` against it first",
    )
    parser.add_argument("--demo-args", default="", help="extra arguments for `pmi-pipeline demo`, one string")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "docs" / "img"), help="where the PNGs go")
    parser.add_argument("--window", default="1600,1000", help="browser window W,H (default 1600,1000)")
    parser.add_argument("--wait-ms", type=int, default=40000, help="virtual time the page gets to load")
    parser.add_argument("--chromium", help=f"Chromium binary (default: first of {CHROMIUM_NAMES} on PATH)")
    args = parser.parse_args(argv)
    find_chromium(args.chromium)  # fail before any long work
    if args.start_server:
        with tempfile.TemporaryDirectory(prefix="pmi-ui-") as tmp, throwaway_server(Path(tmp)) as url:
            run_demo(url, Path(tmp) / "demo-output", args.demo_args.split())
            take_pictures(args, url)
        return 0
    url = args.url or os.environ.get("PREFECT_API_URL", "").removesuffix("/").removesuffix("/api")
    if not url:
        parser.error("give --url, set PREFECT_API_URL, or use --start-server")
    take_pictures(args, url.rstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
