"""The study end to end: the smoke profile through papermill writes every table,
every record and every figure of the study; failures name notebook and cell."""

import hashlib
import json
import re

import jupytext
import nbformat
import pandas as pd
import pytest

from fairkd_utils import pipeline, runner_checks
from fairkd_utils.profiles import DEFAULT_METHODS, EXTRA_METHODS, get_profile

#: The methods a plain smoke run compares (the extended set has its own run directory).
METHODS = get_profile("smoke").methods

FIGURES = ["01_group_counts", "01_group_samples", "02_teacher_group_acc",
           "03_exit_vs_final_group_acc", "03_exit_confidence_by_group", "04_laplace_samples",
           "04_map_vs_laplace_confidence", "04_reliability", "04_score_auroc",
           "05_weights_by_group", "06_wga_vs_avg", "06_group_acc_heatmap",
           "06_weight_distributions", "06_paired_differences"]


def test_smoke_run_writes_manifest_and_executed_notebooks(smoke_run):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    names = [p.stem for p in pipeline.discover_notebooks()]
    assert list(manifest["notebooks"]) == names
    assert all(v["status"] == "ok" for v in manifest["notebooks"].values())
    assert manifest["versions"]["torch"].startswith("2.14.1")
    assert manifest["config"]["profile"]["name"] == "smoke"
    assert manifest["device"] == "cpu"
    for name in names:
        assert (smoke_run / "executed" / f"{name}.ipynb").is_file()


def test_smoke_run_draws_every_figure_as_png_and_pdf(smoke_run):
    figures = smoke_run.parent / "figures"
    for slug in FIGURES:
        for ext in ("png", "pdf"):
            path = figures / f"{slug}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path


def test_groups_table_has_every_split_and_group(smoke_run):
    groups = pd.read_csv(smoke_run / "groups.csv")
    assert list(groups.columns) == ["split", "group", "group_name", "y", "a", "n"]
    assert set(groups.split) == {"train", "val", "test"}
    assert (groups.groupby("split").group.nunique() == 4).all()
    assert (groups.n > 0).all()


def test_metrics_have_teacher_student_exit_and_laplace_rows_for_every_group(smoke_run):
    m = pd.read_csv(smoke_run / "metrics.csv")
    keys = ["dataset", "profile", "seed", "config_id", "model", "method", "predictive", "split",
            "group", "n", "acc", "ece", "nll"]
    assert set(keys) <= set(m.columns)
    test = m[m.split == "test"]
    for model in ("teacher", "student", "exit", "exit_laplace"):
        groups = set(test[test.model == model].group_name)
        assert len(groups) == 5 and "all" in groups, model
    assert set(test[test.model == "exit_laplace"].predictive) == {"probit", "mc"}


def test_every_method_has_rows_for_every_group_and_seed(smoke_run):
    m = pd.read_csv(smoke_run / "metrics.csv")
    students = m[(m.model == "student") & (m.split == "test")]
    seeds = json.loads((smoke_run / "manifest.json").read_text())["config"]["parameters"]["seeds"]
    counts = students.groupby(["method", "seed"]).group_name.nunique()
    assert len(counts) == len(METHODS) * len(seeds)
    assert (counts == 5).all()
    weights = pd.read_csv(smoke_run / "weights.csv")
    for method in ("dedier", "dedier_both", "laplace_kd", "group_balanced"):
        assert weights[weights.method == method].group.nunique() == 4, method


def test_summary_has_every_method_metric_and_paired_differences(smoke_run):
    s = pd.read_csv(smoke_run / "summary.csv")
    assert set(s.method) == set(METHODS)
    assert set(s.metric) == {"worst_group_acc", "avg_acc", "train_weighted_acc", "group_gap", "ece"}
    assert {"mean", "std", "ci95_lo", "ci95_hi", "diff_vs_kd_mean"} <= set(s.columns)
    p = pd.read_csv(smoke_run / "predictions.csv")
    assert {"id", "split", "group", "y", "seed", "model", "method", "predictive", "prob",
            "margin", "correct", "weight", "variance"} <= set(p.columns)
    train_w = p[(p.split == "train") & p.weight.notna()]
    assert {"dedier", "laplace_kd"} <= set(train_w.method)


def _digest(folder, prefix):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(f"{prefix}_*")) if p.suffix in (".png", ".pdf")}


def test_fairness_plots_rerun_from_tables_byte_identical(smoke_run):
    figures = smoke_run.parent / "figures"
    before = _digest(figures, "06")
    assert len(before) == 8
    rc = pipeline.main(["--profile", "smoke", "--out", str(smoke_run.parent), "--figures",
                        str(figures), "--only", "06", "--quiet"])
    assert rc == 0
    assert _digest(figures, "06") == before


def test_missing_prerequisite_stops_naming_the_notebook(tmp_path, capsys):
    rc = pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--figures",
                        str(tmp_path / "fig"), "--only", "02", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "02_teacher" in err and "01_data_and_groups" in err and "--only 01 02" in err


def test_a_failing_cell_is_named(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    src = tmp_path / "99_broken.py"
    jupytext.write(nb, src, fmt="py:percent")
    with pytest.raises(pipeline.PipelineError, match=r"99_broken.py failed in cell 1 .*ValueError: boom"):
        pipeline.run_notebook(src, tmp_path / "out" / "99_broken.ipynb", {}, cwd=tmp_path, progress=False)
    assert (tmp_path / "out" / "99_broken.failed.ipynb").is_file()
    assert not (tmp_path / "out" / "99_broken.ipynb").exists()


def test_smoke_run_logs_every_epoch_and_notebook_to_run_log(smoke_run):
    log = (smoke_run / "run.log").read_text()
    assert re.search(r"^\d\d:\d\d:\d\d student-erm-seed0 epoch \d+/\d+ loss [\d.]+ val wga ", log, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d warmup-seed0 epoch 1/\d+ loss ", log, re.M)  # the shared warm-up
    assert "[fairkd] 06_fairness_plots done in" in log
    entries = json.loads((smoke_run / "manifest.json").read_text())["notebooks"].values()
    assert all(e["seeds"] == [0] and "fairkd_utils.pipeline" in e["command"] for e in entries)


def test_set_overrides_profile_fields_with_their_types_and_a_run_directory_of_their_own(tmp_path):
    from fairkd_utils.profiles import apply_overrides, get_profile, overrides_tag, parse_overrides

    o = parse_overrides(["student_epochs=5", "lr=1", "student_widths=[8,16,32]", "optimizer=adamw",
                         "augment=true"])
    assert o == {"student_epochs": 5, "lr": 1, "student_widths": [8, 16, 32], "optimizer": "adamw",
                 "augment": True}
    p = apply_overrides(get_profile("smoke"), o)
    assert (p.student_epochs, p.lr, p.student_widths, p.optimizer, p.augment) == (5, 1.0, (8, 16, 32), "adamw", True)
    assert get_profile("smoke").student_epochs != 5                       # the profile itself is untouched
    with pytest.raises(ValueError, match="no such profile field.*student_epochs"):
        apply_overrides(get_profile("smoke"), {"student_epoch": 5})
    with pytest.raises(ValueError, match="expected a int"):
        apply_overrides(get_profile("smoke"), {"student_epochs": "five"})
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["student_epochs"])
    args = pipeline.build_parser().parse_args(["--profile", "smoke", "--out", str(tmp_path),
                                               "--set", "student_epochs=5", "--set", "seeds=[1]"])
    run_dir, figures = pipeline.run_folders(args)
    assert run_dir.name == "synthetic-smoke" + overrides_tag({"student_epochs": 5, "seeds": [1]})
    assert run_dir.name.startswith("synthetic-smoke-set-") and figures == run_dir / "figures"
    params = pipeline.notebook_parameters(args, run_dir, figures, "cpu")
    assert params["profile_overrides"] == {"student_epochs": 5, "seeds": [1]} and params["seeds"] == [1]
    assert pipeline.main(["--profile", "smoke", "--out", str(tmp_path), "--set", "epochs=3"]) == 1


def test_the_plain_smoke_run_compares_the_default_methods_only(smoke_run):
    s = pd.read_csv(smoke_run / "summary.csv")
    assert METHODS == DEFAULT_METHODS and not set(EXTRA_METHODS) & set(s.method)


def test_methods_extended_reaches_notebook_05_in_a_run_directory_of_its_own(tmp_path, monkeypatch):
    """--methods extended: its own run directory <dataset>-<profile>-extended (figures too),
    passed as notebook 05's `methods` parameter (only 05 declares it), and notebook 06 is
    checked for the extended methods' records."""
    from fairkd_utils import rundir

    args = pipeline.build_parser().parse_args(["--profile", "smoke", "--out", str(tmp_path),
                                               "--methods", "extended"])
    run_dir, figures = pipeline.run_folders(args)
    assert run_dir.name == "synthetic-smoke-extended" and figures == run_dir / "figures"
    plain = pipeline.run_folders(pipeline.build_parser().parse_args(["--profile", "smoke", "--out",
                                                                     str(tmp_path)]))[0]
    assert plain.name == "synthetic-smoke" and plain != run_dir
    with_set = pipeline.build_parser().parse_args(["--profile", "smoke", "--out", str(tmp_path),
                                                   "--methods", "extended", "--set", "seeds=[1]"])
    assert pipeline.run_folders(with_set)[0].name.startswith("synthetic-smoke-extended-set-")
    assert pipeline.optional_parameters(args) == {"methods": "extended"}
    assert pipeline.optional_parameters(pipeline.build_parser().parse_args([])) == {}
    declaring = [p.name for p in pipeline.discover_notebooks()
                 if "methods" in pipeline.declared_parameters(jupytext.read(p))]
    assert declaring == ["05_distillation_comparison.py"]
    # a notebook run by hand names the same folder (under results/, here a temporary one)
    monkeypatch.setattr(rundir, "REPO_ROOT", tmp_path / "repo")
    assert rundir.setup(None, None, "smoke", methods="extended").run_dir == \
        tmp_path / "repo" / "results" / run_dir.name
    (run_dir / "records").mkdir(parents=True)
    (run_dir / "groups.csv").write_text("x")
    (run_dir / "summary.csv").write_text("x")
    missing = {glob for _, glob, _ in runner_checks.missing_prerequisites(
        run_dir, {"06"}, [0], pipeline.resolve_methods(get_profile("smoke"), "extended"))}
    assert {f"records/metrics/student-{m}-*-seed0-map-test.csv" for m in EXTRA_METHODS} <= missing
    assert "--methods extended" in runner_checks.suggest_command(args, ["05", "06"])


def test_methods_extended_parameter_is_passed_to_the_kernel_of_notebook_05(tmp_path):
    """The runner gives notebook 05's parameters cell `methods = "extended"`."""
    src = pipeline.NOTEBOOKS_DIR / "05_distillation_comparison.py"
    nb = jupytext.read(src)
    (cell,) = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    nb.cells = [cell, nbformat.v4.new_code_cell("assert methods == 'extended', methods")]
    probe = tmp_path / "05_probe.py"
    jupytext.write(nb, probe, fmt="py:percent")
    args = pipeline.build_parser().parse_args(["--profile", "smoke", "--methods", "extended"])
    pipeline.run_notebook(probe, tmp_path / "out" / "05_probe.ipynb", {}, cwd=tmp_path, progress=False,
                          optional=pipeline.optional_parameters(args))
