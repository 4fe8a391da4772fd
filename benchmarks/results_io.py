"""Shared by the benchmark scripts: where and how results are written."""

from __future__ import annotations

import json
import os
import platform

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment(device: str) -> dict:
    """The fields every benchmark record carries about where it ran: device name and versions."""
    import torch
    import triton

    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}


def write_results(records: list, name: str, device: str, out_dir: str = RESULTS_DIR, tag: str = "") -> str:
    """Write records to <out_dir>/<name>[-<tag>]-<device>.json (device made file-name safe); return the path."""
    os.makedirs(out_dir, exist_ok=True)
    name = f"{name}-{tag}" if tag else name
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in device.replace(" ", "-"))
    path = os.path.join(out_dir, f"{name}-{tag}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=2)
    print(f"wrote {path}")
    return path
