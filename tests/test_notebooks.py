"""The notebooks' contract with the runner: one parameters cell each, defining
every parameter the runner passes (papermill silently ignores unknown ones)."""

import argparse
import json

import jupytext
import pytest

from fairkd_utils import jobs, pipeline, rundir

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


def test_the_executor_flags_reach_the_jobs_through_the_run_not_a_notebook(tmp_path, capsys, monkeypatch):
    """No notebook has an executor, worker, thread or SLURM parameter: the runner puts
    them in the kernels' environment and ``rundir.setup`` makes them the run's ``jobs``."""
    declaring = [p.name for p in NOTEBOOKS
                 if {"executor", "workers", "threads", "slurm"} & pipeline.declared_parameters(jupytext.read(p))]
    assert declaring == []
    args = pipeline.build_parser().parse_args(
        ["--executor", "slurm", "--workers", "8", "--slurm-partition", "gpu", "--slurm-time", "2:00:00",
         "--slurm-gpus", "1", "--slurm-cpus", "6"])
    env = pipeline.jobs_environment(args)
    assert pipeline.optional_parameters(args) == {}
    expected = {"executor": "slurm", "workers": 8, "slurm": {"partition": "gpu", "time": 120, "gpus": 1, "cpus": 6}}
    assert json.loads(env[rundir.JOBS_ENV]) == expected
    monkeypatch.setenv(rundir.JOBS_ENV, env[rundir.JOBS_ENV])
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke")
    assert run.jobs == expected
    assert jobs.options(**run.jobs).slurm == {"partition": "gpu", "time": 120, "gpus": 1, "cpus": 6}
    monkeypatch.delenv(rundir.JOBS_ENV)
    assert rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke").jobs == {}
    assert pipeline.jobs_environment(pipeline.build_parser().parse_args([])) == {}
    for argv, message in ((["--slurm-gpus", "1"], "apply to --executor slurm only"),
                          (["--workers", "2"], "--workers applies to --executor local or slurm"),
                          (["--executor", "slurm", "--slurm-time", "2h"], "--slurm-time '2h'")):
        assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--only", "01", *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "synthetic-smoke").exists()


def test_a_sweep_run_reads_the_hyper_parameters_its_sweep_writes(tmp_path):
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", sweep=True)
    assert run.sweep and run.hparams_file == str(tmp_path / "run" / "sweep" / "hparams.json")
    assert not rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke").sweep   # the profile's setting
    with pytest.raises(ValueError, match="not both"):
        rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", sweep=True, hparams_file=tmp_path / "h.json")


# ------------------------------------------------------------ the reference, readable without running
REFERENCE = pipeline.REPO_ROOT / "results" / "reference"
EXECUTED = sorted(REFERENCE.glob("*/executed/*.ipynb"))


def _sources(nb, kind):
    """The sources of a notebook's cells of ``kind``, without papermill's injected cell."""
    return [c.source.strip() for c in nb.cells if c.cell_type == kind
            and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def test_every_reference_run_commits_its_executed_notebooks():
    runs = sorted(p.parent for p in REFERENCE.glob("*/summary.csv"))
    assert runs
    for run in runs:
        assert sorted(p.stem for p in (run / "executed").glob("*.ipynb")) == [p.stem for p in NOTEBOOKS], run.name
        size = sum(p.stat().st_size for p in (run / "executed").glob("*.ipynb"))
        assert size < 8e6, f"{run.name}: executed notebooks take {size / 1e6:.1f} MB (limit 8 MB)"


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: f"{p.parents[1].name}/{p.stem}")
def test_a_committed_executed_notebook_is_its_py_run(path):
    """A reader never sees a stale copy: the executed reference holds exactly the
    cells of ``notebooks/NN_name.py``, and outputs that read cleanly."""
    import nbformat

    executed = nbformat.read(str(path), as_version=4)
    source = jupytext.read(pipeline.NOTEBOOKS_DIR / f"{path.stem}.py")
    for kind in ("code", "markdown"):
        assert _sources(executed, kind) == _sources(source, kind), \
            f"{path} is stale: rerun `make reproduce` with --reference (see README)"
    for cell in executed.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path}: a cell failed"
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            assert "\r" not in text and (text.strip() or out.get("name") != "stderr"), \
                f"{path}: a progress-bar fragment"
            assert "Warning" not in text, f"{path}: a library warning: {text[:200]}"


def test_clean_executed_drops_progress_bars_only(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="\rbar:  50%|#####     | 1/2"),
        nbformat.v4.new_output("stream", name="stderr", text="\n"),   # what a closing bar leaves
        nbformat.v4.new_output("stream", name="stdout", text="result\n"),
        nbformat.v4.new_output("stream", name="stdout", text="\n"),   # a program's own blank line stays
        nbformat.v4.new_output("stream", name="stderr", text="a real message\n")])])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    pipeline.clean_executed(path)
    kept = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [o["text"] for o in kept] == ["result\n", "\n", "a real message\n"]


def test_write_reference_copies_the_tables_and_executed_notebooks(tmp_path):
    run_dir = tmp_path / "results" / "synthetic-default"
    for rel in ("summary.csv", "manifest.json", "sweep/sweep.csv", "metrics.csv",
                "executed/01_data_and_groups.ipynb", "executed/02_teacher.ipynb"):
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(rel)
    # the repository's path as a notebook names it (escaped in a source line, and as a JSON
    # value), and the same characters inside an image's base64 data, which must stay
    (run_dir / "executed" / "02_teacher.ipynb").write_text(
        f'"run_dir = \\"{run_dir}\\"\\n", "output_path": "{run_dir}/x", "image/png": "iVB{tmp_path}/Qm"')
    ref = pipeline.write_reference(run_dir, NOTEBOOKS[:2], reference_root=tmp_path / "reference",
                                   root=tmp_path)
    assert ref == tmp_path / "reference" / "synthetic-default"
    assert sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()) == [
        "executed/01_data_and_groups.ipynb", "executed/02_teacher.ipynb", "manifest.json",
        "summary.csv", "sweep.csv"]
    assert (ref / "sweep.csv").read_text() == "sweep/sweep.csv"
    # the machine's path to the repository is left out: the copy reads the same on every clone
    assert (ref / "executed" / "02_teacher.ipynb").read_text() == (
        '"run_dir = \\"results/synthetic-default\\"\\n", "output_path": "results/synthetic-default/x", '
        f'"image/png": "iVB{tmp_path}/Qm"')


def test_reference_needs_the_default_out(tmp_path):
    args = pipeline.build_parser().parse_args(["--profile", "smoke", "--reference", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--reference"):
        pipeline.run(args)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_has_at_least_as_much_prose_as_code(path):
    """Notebooks teach: non-blank markdown lines >= non-blank, non-comment code lines."""
    nb = jupytext.read(path)
    md = sum(1 for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines() if line.strip())
    code = sum(1 for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
               if line.strip() and not line.strip().startswith("#"))
    assert md >= code, f"{path.name}: {md} markdown lines for {code} code lines"
