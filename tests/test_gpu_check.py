"""bench/gpu_check.py: the tiny run on the CPU has every section's rows with finite
positive values, its exit Laplace covariances equal laplace-torch's, and the table it
prints is the CSV it writes; a failing measurement becomes an error row."""

import argparse
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def _printed_rows(stdout: str, fields) -> list[list[str]]:
    """The aligned table's rows as cells (columns are two or more spaces apart)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert re.split(r"\s{2,}", lines[0].strip()) == list(fields)
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=len(fields) - 1) for line in lines[1:]]
    return [cells + [""] * (len(fields) - len(cells)) for cells in rows]


def test_tiny_run_on_cpu(gc, tmp_path):
    csv_path = tmp_path / "check.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--csv", str(csv_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = gc.read_csv(csv_path)
    assert not [r for r in rows if r["metric"] in ("error", "skipped")], proc.stderr[-3000:]
    assert {r["section"] for r in rows} == set(gc.SECTIONS)
    for r in rows:
        assert math.isfinite(r["value"]) and r["value"] > 0, r

    def metrics(section):
        return sorted(r["metric"] for r in rows if r["section"] == section and r["config"] != "section")
    assert metrics("image") == ["peak_mem"] * 4 + ["throughput"] * 4
    assert metrics("compile") == ["compile_s"] * 4 + ["peak_mem"] * 4 + ["throughput"] * 4
    assert metrics("text") == ["peak_mem"] * 2 + ["throughput"] * 2
    assert metrics("pipeline") == ["throughput"] * 6      # render, train, val, resident, fed, text
    assert metrics("laplace") == sorted(["cov_max_abs_diff"] + ["fit_s", "peak_mem", "predict_s"] * 2)
    units = {(r["section"], r["unit"]) for r in rows if r["metric"] == "throughput"}
    assert units == {("pipeline", "images/s"), ("pipeline", "tokens/s"), ("image", "images/s"),
                     ("compile", "images/s"), ("text", "tokens/s")}
    # the closed-form exit Laplace and laplace-torch give the same logit covariances
    assert [r["value"] for r in rows if r["metric"] == "cov_max_abs_diff"][0] < 1e-8
    assert len([r for r in rows if r["section"] == "summary" and r["metric"] == "ratio"]) == 11

    printed = _printed_rows(proc.stdout, gc.FIELDS)
    assert len(printed) == len(rows)
    for cells, row in zip(printed, rows):
        assert cells[:3] == [row["section"], row["config"], row["metric"]]
        assert float(cells[3]) == pytest.approx(row["value"], rel=1e-5)
        assert cells[4:] == [row["unit"], row["note"]]


def test_csv_round_trips_and_errors_become_rows(gc, tmp_path):
    table = gc.Table(tmp_path / "t.csv")
    args = argparse.Namespace(warmup=1, steps=2, seconds=0.01, budget_s=1.0)
    runner = gc.Runner(table, torch.device("cpu"), gc.TINY, args)
    with runner.guard("image", "a failing config"):
        raise RuntimeError("bf16  is   not supported")
    table.add("image", "some config", "throughput", 1 / 3, "images/s", "batch 8")
    table.add("laplace", "x", "cov_max_abs_diff", 1e-300, "logit^2")
    gc._image_rows(runner, "compile", compiled=True)  # past the budget: every config skipped
    back = gc.read_csv(tmp_path / "t.csv")
    assert [r["metric"] for r in back] == ["error", "throughput", "cov_max_abs_diff"] + ["skipped"] * 4
    assert back[0]["note"] == "RuntimeError: bf16 is not supported" and math.isnan(back[0]["value"])
    for got, want in zip(back[1:3], table.rows[1:3]):
        assert got == want                                # values read back exactly
    printed = _printed_rows(table.format(), gc.FIELDS)
    assert [cells[:3] for cells in printed] == [[r["section"], r["config"], r["metric"]] for r in back]
