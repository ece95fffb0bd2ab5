"""Runs one selection forward or backward at length T, for Nsight Compute to profile a chunk kernel.

    ncu --clock-control none -k regex:_fwd_chunk --launch-skip 6 -c 1 --section WarpStateStats \
        --page raw --csv python3 benchmarks/ncu_selection.py fwd 131072

(B=1, 28/4 heads, D=128, block 64, 32 blocks, bf16, random inputs, as benchmarks/nsa_kernels.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nsa_kernels import branch_fns  # noqa: E402


def main() -> None:
    which, t = sys.argv[1], int(sys.argv[2])
    fns, args = branch_fns(t)
    name = {"fwd": "slc", "bwd": "slc_bwd"}[which]
    jax.block_until_ready(fns[name](*args[name]))


if __name__ == "__main__":
    main()
