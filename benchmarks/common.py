"""Helpers shared by the benchmark scripts: timing a jitted call, and running one measurement in a
fresh Python process (its peak-memory counter is its own, and an out-of-memory error or a crash
ends only that measurement, not the sweep). jax is imported only where it is used, so a driver
that only starts workers does not initialise the accelerator."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "measured: "  # a worker prints its result as one line: MARKER + json


def bench(fn, *args, reps: int = 10) -> float:
    """Median wall time (ms) of `reps` calls of fn(*args), after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_worker(script: str, job: dict, timeout: float, env: Mapping[str, str] = {}) -> dict:
    """Runs `python script --worker JSON(job)` and returns the dict it printed after MARKER, or the
    job with an "error": the last exception line of its stderr (else its last line).

    `env`: defaults for the worker's environment (the caller's variables take precedence);
    XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95; preallocation is always off, and the
    repository root is on PYTHONPATH.
    """
    cmd = [sys.executable, script, "--worker", json.dumps(job)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **env, **os.environ}
    full_env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception)\b", ln)]
    return {**job, "error": ((raised or lines or [f"exit code {proc.returncode}"])[-1])[:300]}
