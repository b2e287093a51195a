"""Describe the machine a benchmark ran on and write its JSON result."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import socket

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def describe() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "platform": device.platform,
            "device": device.device_kind, "num_devices": jax.device_count(), "jax": jax.__version__,
            "python": platform.python_version()}


def machine_tag() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu{os.cpu_count()}"
    return device.device_kind.lower().replace(" ", "-")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_result(name: str, payload: dict, path: str | pathlib.Path | None = None) -> pathlib.Path:
    """``payload`` with the machine's description, to ``path`` (default ``results/<name>-<machine tag>.json``)."""
    path = RESULTS / f"{name}-{machine_tag()}.json" if path is None else pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": describe(), **payload}, indent=2))
    return path
