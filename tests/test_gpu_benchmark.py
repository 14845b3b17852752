"""Smoke test of ``benchmarks/gpu.py`` on a CPU at its tiniest size (a few seconds).

The numbers are not checked (they are measurements); what is checked is that every
configuration the issue asks for (the J-free exact mode included) is timed and reported,
that no memory figure is made up on a CPU, and that asking for CUDA where there is none stops
with the fix.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch._functorch.config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--small", "--tasks", "2,3", "--batch", "4", "--image", "8"]
TINY += ["--rounds", "1", "--steps", "1", "--solver-rounds", "1", "--threads", "1"]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dynamo looks the compiled code's module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    return load_script()


def row(out: str, name: str) -> list[str]:
    """The cells of the first table row named ``name``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_tiny_cpu_run_reports_every_configuration(
    gpu: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    gpu.main(TINY)
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads is put back
    assert out.count("## K=") == 2
    for name in ("EW", "loop (LibMTL)", "exact, upgrad", "features, upgrad", "fork, upgrad"):
        ms, ratio, _ = row(out, name)
        assert float(ms) > 0 and float(ratio) > 0
    for mode in ("exact", "J-free exact", "features", "fork"):
        assert float(row(out, f"{mode}, engine only (mean)")[0]) > 0
        assert float(row(out, f"{mode}, upgrad")[0]) > 0
    assert row(out, "EW")[-2:] != ["n/a on CPU", "n/a"]  # the timing row, not the memory one
    memory = [line for line in out.splitlines() if "n/a on CPU" in line]
    assert len(memory) == 2 * 10  # every configuration of both K, no figure made up
    assert re.search(r"\| upgrad \| [0-9.]+ \| [0-9.]+ \|", out)  # solver times at K = 2, 3


def test_cuda_without_cuda_stops_with_the_fix(
    gpu: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cuda"])
    assert "run with --device cpu" in capsys.readouterr().err


def test_trunk_is_resnet18_sized(gpu: ModuleType) -> None:
    trunk = gpu.resnet_trunk()
    assert 11.0e6 < sum(p.numel() for p in trunk.parameters()) < 11.3e6
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_compiled_trunk_is_compiled_once(
    gpu: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--compile``: one graph for every configuration, none compiled after the first steps."""
    donated = torch._functorch.config.donated_buffer
    gpu.main([*TINY[:3], "--tasks", "2", *TINY[5:], "--compile", "aot_eager"])
    out = capsys.readouterr().out
    assert torch._functorch.config.donated_buffer == donated  # put back
    assert "graphs compiled: 1 in the first steps, 0 afterwards" in out
    assert float(row(out, "fork, upgrad")[0]) > 0
