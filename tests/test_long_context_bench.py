"""Smoke test of benchmarks/long_context.py: the tiny CPU configuration prints its tables."""

import itertools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_both_kinds():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "long_context.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed" not in proc.stdout and "OOM" not in proc.stdout, proc.stdout
    lines = proc.stdout.splitlines()
    groups = itertools.groupby(lines, lambda line: line.startswith("|"))
    tables = [list(rows) for is_table, rows in groups if is_table]
    # Measurements, per-layer costs, the 28-layer / 8-GPU extrapolation: both kinds in each.
    assert len(tables) == 3, proc.stdout
    for table in tables:
        kinds = {row.split("|")[1].strip() for row in table[2:]}
        assert kinds == {"videonsa", "dense"}, table
