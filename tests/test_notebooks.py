"""The notebooks' contract with the runner: one parameters cell each, defining
every parameter the runner passes (papermill silently ignores unknown ones)."""

import argparse

import jupytext
import pytest

from fairkd_utils import pipeline

NOTEBOOKS = pipeline.discover_notebooks()


def runner_parameters():
    args = pipeline.build_parser().parse_args(["--profile", "smoke"])
    return pipeline.notebook_parameters(args, run_dir=pipeline.REPO_ROOT / "results" / "x",
                                        figures_dir=pipeline.REPO_ROOT / "figures" / "x",
                                        device="cpu")


def parameter_cells(path):
    nb = jupytext.read(path)
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_notebooks_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(numbers) and numbers[0] == 1
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_exactly_one_parameters_cell(path):
    cells = parameter_cells(path)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_runner_parameter_is_defined_in_the_parameters_cell(path):
    missing = set(runner_parameters()) - pipeline.declared_parameters(jupytext.read(path))
    assert not missing, f"{path.name} does not define {sorted(missing)} in its parameters cell"


def test_runner_parameters_are_json_like():
    def json_like(v):
        if isinstance(v, (list, tuple)):
            return isinstance(v, list) and all(json_like(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool, dict))
    assert all(json_like(v) for v in runner_parameters().values())


def test_unknown_profile_dataset_and_notebook_are_refused(capsys, tmp_path):
    with pytest.raises(ValueError, match="unknown profile"):
        pipeline.run(argparse.Namespace(profile="huge", dataset="synthetic", data_root=None,
                                        only=None, device="cpu", out=str(tmp_path), figures=None,
                                        seeds=None, quiet=True))
    with pytest.raises(SystemExit):
        pipeline.build_parser().parse_args(["--dataset", "imagenet"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no such notebook"):
        pipeline.select_notebooks(NOTEBOOKS, ["42"])
    assert pipeline.main(["--dataset", "waterbirds", "--out", str(tmp_path)]) == 1
    assert "--data-root" in capsys.readouterr().err


def test_the_sweep_switch_reaches_only_notebooks_that_declare_it():
    declaring = [p.name for p in NOTEBOOKS if "sweep" in pipeline.declared_parameters(jupytext.read(p))]
    assert declaring == ["05_distillation_comparison.py"]
    assert pipeline.build_parser().parse_args(["--sweep"]).sweep is True


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_line_of_the_parameters_cell(path):
    """papermill reads the parameters cell to tell a known parameter from an unknown
    one; a line it cannot parse (e.g. ``=`` or a parenthesis in the comment) makes it
    warn 'Passed unknown parameter' for a parameter that is defined."""
    from papermill.translators import PythonTranslator

    (cell,) = parameter_cells(path)
    lines = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    parsed = {p.name for p in PythonTranslator.inspect(cell)}
    assert len(parsed) == len(lines), f"{path.name}: papermill parses {sorted(parsed)} of {lines}"


def test_the_executor_flags_reach_only_notebook_05_checked_before_any_kernel(tmp_path, capsys):
    declaring = [p.name for p in NOTEBOOKS
                 if {"executor", "workers", "threads", "slurm"} <= pipeline.declared_parameters(jupytext.read(p))]
    assert declaring == ["05_distillation_comparison.py"]
    args = pipeline.build_parser().parse_args(
        ["--executor", "slurm", "--workers", "8", "--slurm-partition", "gpu", "--slurm-time", "2:00:00",
         "--slurm-gpus", "1", "--slurm-cpus", "6"])
    assert pipeline.optional_parameters(args) == {
        "executor": "slurm", "workers": 8,
        "slurm": {"partition": "gpu", "time": 120, "gpus": 1, "cpus": 6}}
    assert pipeline.optional_parameters(pipeline.build_parser().parse_args([])) == {}
    for argv, message in ((["--slurm-gpus", "1"], "apply to --executor slurm only"),
                          (["--workers", "2"], "--workers applies to --executor local or slurm"),
                          (["--executor", "slurm", "--slurm-time", "2h"], "--slurm-time '2h'")):
        assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--only", "01", *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "synthetic-smoke").exists()
