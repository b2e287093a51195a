"""A real TensorBoard server on 127.0.0.1 serves what the monitor wrote; Chromium renders its dashboard."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import pytest

import ntkcv
from ntkcv.sinks import TensorBoardSink

pytest.importorskip("tensorboard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb")
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (4, 8)), "v": jax.random.normal(keys[1], (8, 3))}
    apply_fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    monitor = ntkcv.NTKMonitor(apply_fn, jax.random.normal(keys[2], (10, 4)), schedule=ntkcv.Schedule(every_steps=2),
                               cvs=("entropy", "trace"), sinks=[TensorBoardSink(str(logdir))])
    written = {}
    for step in range(6):
        scale = 1 + 0.1 * step
        values = monitor(step, jax.tree_util.tree_map(lambda a, s=scale: a * s, params), loss=1.0 / (1 + step))
        if "cv/entropy" in values:
            written[step] = values["cv/entropy"]
    monitor.close()
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/data/runs", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    yield url, written
    process.terminate()
    process.wait(timeout=30)


def _get(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def test_http_scalars_api_serves_the_monitor_values(server):
    url, written = server
    deadline = time.monotonic() + 60
    rows = []
    while time.monotonic() < deadline and len(rows) < len(written):
        try:
            rows = _get(f"{url}/data/plugin/scalars/scalars?run=.&tag=cv/entropy")
        except OSError:
            rows = []
        time.sleep(0.5)
    assert {int(step): value for _, step, value in rows} == pytest.approx(written, rel=1e-6)


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_dashboard_renders_in_headless_chromium(server, tmp_path):
    url, _ = server
    png = tmp_path / "dashboard.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=15000",
                    f"--screenshot={png}", f"{url}/#timeseries"], capture_output=True, timeout=120)
    assert png.exists() and png.stat().st_size > 10_000
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                          f"--user-data-dir={tmp_path / 'profile2'}", "--virtual-time-budget=15000", "--dump-dom",
                          f"{url}/#timeseries"], capture_output=True, text=True, timeout=120).stdout
    assert "cv/entropy" in dom
