"""The train CLI's dry run: exact sharded state bytes, the analytic estimate, and XLA's memory
analysis of the compiled step on the 8 fake CPU devices."""

import os
import re

import jax
import pytest

from videonsa_jax.parallel import dry_run
from videonsa_jax.training.configs import load_config_file

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

GIB = 2**30


def _gib(report: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+) GiB", report)
    assert match, f"no {label!r} in:\n{report}"
    return float(match.group(1))


@pytest.mark.parametrize("target, devices", [("h200", 8), ("v5p", 64)])
def test_long128k_analytic(target, devices):
    config = load_config_file(f"{CONFIGS}/long128k.py", target)
    report = dry_run.report(config, "analytic")
    params = float(re.search(r"([\d,.]+)M parameters", report).group(1).replace(",", "")) * 1e6
    assert 8.2e9 < params < 8.8e9  # Qwen2.5-VL-7B + the VideoNSA gate MLPs
    # fp32 params + two fp32 Adam moments, sharded over fsdp x context (a few small tensors
    # do not divide by 64 and stay replicated).
    ideal = 12 * params / devices / GIB
    assert ideal <= _gib(report, r"\(params \+ optimizer, exact\):") <= 1.1 * ideal
    terms = re.findall(r"^  (\w[\w /]*?)\s+([\d.]+) (GiB|MiB)  =", report, re.M)
    names = [name for name, _, _ in terms]
    assert names == [
        "state",
        "grads",
        "decoder saved",
        "decoder layer",
        "gathered K/V",
        "text rows",
        "loss chunk",
        "vision tower",
    ]
    total = sum(float(v) * (1 if unit == "GiB" else 1 / 1024) for _, v, unit in terms)
    assert _gib(report, "total") == pytest.approx(total, abs=0.05)
    assert "H200 141GB yes" in report


def test_remat_changes_the_estimate():
    config = load_config_file(f"{CONFIGS}/long128k.py", "h200")
    full = _gib(dry_run.report(config, "analytic"), "vision tower")
    config.model.remat = "none"
    none = _gib(dry_run.report(config, "analytic"), "vision tower")
    assert none > 5 * full


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_tiny_compiled_memory_analysis():
    config = load_config_file(f"{CONFIGS}/tiny.py")
    config.mesh.update(data=1, fsdp=2, context=4, tensor=1)
    report = dry_run.report(config, "compile")
    assert "XLA memory analysis of the compiled step (cpu)" in report
    peak = re.search(r"peak ~ argument \+ output \+ temp - alias = ([\d.]+) (MiB|GiB)", report)
    assert peak and float(peak.group(1)) > 0
    assert "fits (<= 90% of device memory)" in report


def test_bad_mode():
    with pytest.raises(ValueError, match="dry-run mode must be one of"):
        dry_run.report(load_config_file(f"{CONFIGS}/tiny.py"), "guess")
