"""benchmarks/gpu_check.py, the one-shot GPU check, is ready for a session with a GPU: its arguments, its refusal
without CUDA, and a toy-size smoke run of its sections on the CPU (the train section is left out here: it is a
plain nnUNetv2_train run, which the end-to-end tests cover)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_sections():
    result = _run("--help")
    assert result.returncode == 0
    for section in ("ops", "backends", "precision", "calibrate", "network", "inference", "train"):
        assert section in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_to_run_without_cuda():
    result = _run()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: error: torch sees no CUDA GPU (torch.cuda.is_available() is False). Run it on a machine with an "
        "NVIDIA GPU and a CUDA build of torch; `nvidia-smi` should list the GPU."]


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "only for --smoke"),
    (["--patch", "40"], "multiple of 32"),
    (["--repeats", "0"], "at least 1"),
    (["--sections", "everything"], "invalid choice"),
])
def test_bad_arguments_are_refused(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_smoke_run_of_the_sections_on_the_cpu(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = _run("--device", "cpu", "--smoke", "--sections", "env", "ops", "backends", "network", "inference",
                  "--json", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert not [r for r in rows if r["what"] == "failed"]
    sections = {r["section"] for r in rows}
    assert {"env", "ops", "backends", "network", "inference", "total"} <= sections
    decisions = [r for r in rows if r["section"] == "backends" and r["what"] != "section wall time"]
    assert decisions and all("depthwise conv" in r["what"] or "fan_out conv" in r["what"] for r in decisions)
    assert any("(measured forward+backward:" in r["value"] for r in decisions)
    network = [r for r in rows if r["section"] == "network" and r["what"].startswith("rep3d,")]
    assert network and network[0]["value"].endswith(" ms") and "planner's estimate" in network[0]["note"]
    assert "| section | what | value | note |" in result.stdout
