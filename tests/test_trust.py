"""Trustworthy runs: editing the library retrains (and --retrain retrains on request),
reused checkpoints are said in the log, damaged records stop the run naming the file
and the notebook that writes it, and a plumbing-check profile says so."""

import ast
import logging
import os
import shutil

import pandas as pd
import pytest
import torch

from fairkd_utils import (checkpoints, losses, metrics, models, pipeline, profiles, records, rundir,
                          runner_checks, students, train)
from test_train import TINY, _cfg, _split


@pytest.fixture(scope="module")
def splits():
    return {"train": _split("train", 64, 0), "val": _split("val", 32, 1), "test": _split("test", 32, 2)}


@pytest.fixture
def no_retrain(monkeypatch):
    monkeypatch.delenv("FAIRKD_RETRAIN", raising=False)
    monkeypatch.delenv("FAIRKD_RETRAIN_RUN", raising=False)
    return monkeypatch


def _smoke_run(tmp_path, profile="smoke"):
    return rundir.Run(run_dir=tmp_path, figures_dir=tmp_path, profile=profiles.get_profile(profile),
                          dataset="synthetic", data_root=None, seeds=[0], device="cpu")


def _student(splits, ckpt_dir, extra=None, name="student-kd-seed0"):
    return train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=1),
                             ckpt_dir=ckpt_dir, name=name, fingerprint_extra=extra)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fairkd"]


# ---------------------------------------------------------------- 1: code in the fingerprint
def _package_copy(tmp_path):
    package = os.path.dirname(students.__file__)
    for name in os.listdir(package):
        if name.endswith(".py"):
            shutil.copy(os.path.join(package, name), tmp_path)
    checkpoints.code_fingerprint.cache_clear()
    return checkpoints.code_fingerprint(tmp_path)


def _edit(path, old, new):
    source = path.read_text()
    assert old in source
    path.write_text(source.replace(old, new, 1))
    checkpoints.code_fingerprint.cache_clear()


def test_the_fingerprint_covers_the_code_of_the_modules_that_train(tmp_path):
    before = _package_copy(tmp_path)
    assert before == checkpoints.code_fingerprint(str(tmp_path)) != ""
    assert {"data", "models", "losses", "exit_laplace", "train", "checkpoints", "students", "build", "teacher", "hparams", "rundir",
            "profiles", "metrics", "synthetic_images", "kron_factors", "laplace_source"} <= set(checkpoints.code_modules(tmp_path))
    assert not {"plots", "palette", "pipeline", "runner_checks", "jobs", "executors"} & set(checkpoints.code_modules(tmp_path))
    _edit(tmp_path / "losses.py", "def confidence_margin(", "def confidence_margin_(")
    assert checkpoints.code_fingerprint(tmp_path) != before


def test_a_docstring_or_comment_edit_keeps_the_fingerprint(tmp_path):
    before = _package_copy(tmp_path)
    _edit(tmp_path / "metrics.py", '"""', '"""An edited module docstring.\n\n')
    _edit(tmp_path / "train.py", "\n", "\n# a new comment line\n")
    losses_src = (tmp_path / "losses.py").read_text()
    func = losses_src.index("def confidence_margin(")
    doc = losses_src.index('"""', func)
    _edit(tmp_path / "losses.py", losses_src[doc:doc + 3], '"""Reworded: ')
    assert checkpoints.code_fingerprint(tmp_path) == before
    _edit(tmp_path / "metrics.py", "import ", "import os  # now imported\nimport ")
    assert checkpoints.code_fingerprint(tmp_path) != before


def test_a_docstring_edit_reuses_a_checkpoint_and_a_code_edit_retrains(splits, tmp_path, no_retrain):
    run = _smoke_run(tmp_path)
    package = tmp_path / "package"
    package.mkdir()
    original = _package_copy(package)
    no_retrain.setattr(rundir, "code_fingerprint", lambda folder=None: checkpoints.code_fingerprint(package))
    first = _student(splits, tmp_path, run.fingerprint_extra())
    assert not first.reused
    _edit(package / "models.py", '"""', '"""Docstring edited after training.\n\n')
    assert checkpoints.code_fingerprint(package) == original
    assert _student(splits, tmp_path, run.fingerprint_extra()).reused
    _edit(package / "models.py", "\nimport ", "\nimport math as _unused_math\nimport ")
    assert not _student(splits, tmp_path, run.fingerprint_extra()).reused


def test_runs_fingerprint_holds_the_code_and_no_hand_bumped_version(tmp_path):
    extra = _smoke_run(tmp_path).fingerprint_extra()
    assert extra["code"] == checkpoints.code_fingerprint()
    assert "study_version" not in extra and not hasattr(students, "STUDY_VERSION")


def test_a_library_edit_retrains_instead_of_reusing(splits, tmp_path, no_retrain):
    run = _smoke_run(tmp_path)
    no_retrain.setattr(rundir, "code_fingerprint", lambda folder=None: "old-code")
    first = _student(splits, tmp_path, run.fingerprint_extra())
    assert _student(splits, tmp_path, run.fingerprint_extra()).reused
    no_retrain.setattr(rundir, "code_fingerprint", lambda folder=None: "edited-code")
    edited = _student(splits, tmp_path, run.fingerprint_extra())
    assert not edited.reused and edited.checkpoint != first.checkpoint


# ---------------------------------------------------------------- 1: --retrain
def test_a_reused_checkpoint_is_said_in_the_log(splits, tmp_path, no_retrain, caplog):
    first = _student(splits, tmp_path)
    with caplog.at_level(logging.INFO, logger="fairkd"):
        again = _student(splits, tmp_path)
    assert again.reused
    assert f"reused checkpoint {first.checkpoint.name}" in _messages(caplog)


def test_retrain_replaces_the_named_checkpoints_once_per_run(splits, tmp_path, no_retrain, caplog):
    first = _student(splits, tmp_path)
    no_retrain.setenv("FAIRKD_RETRAIN", "teacher warmup")  # not this one
    no_retrain.setenv("FAIRKD_RETRAIN_RUN", "run-1")
    assert _student(splits, tmp_path).reused
    no_retrain.setenv("FAIRKD_RETRAIN", "teacher student-kd")
    with caplog.at_level(logging.INFO, logger="fairkd"):
        retrained = _student(splits, tmp_path)
    assert not retrained.reused and retrained.checkpoint == first.checkpoint  # same fingerprint
    assert torch.load(first.checkpoint, weights_only=True)["run"] == "run-1"  # replaced
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert any(m.startswith("retraining student-kd-seed0-") for m in _messages(caplog))
    assert _student(splits, tmp_path).reused  # a later notebook of the same run reuses it
    no_retrain.setenv("FAIRKD_RETRAIN", "*")
    no_retrain.setenv("FAIRKD_RETRAIN_RUN", "run-2")
    assert not _student(splits, tmp_path).reused


def test_a_corrupt_checkpoint_asked_to_retrain_is_replaced(splits, tmp_path, no_retrain):
    first = _student(splits, tmp_path)
    first.checkpoint.write_bytes(b"garbage")
    no_retrain.setenv("FAIRKD_RETRAIN", "student")
    assert not _student(splits, tmp_path).reused
    assert torch.load(first.checkpoint, weights_only=True)["format"] == checkpoints.CHECKPOINT_FORMAT


def test_the_warmup_state_is_reused_with_a_log_line_and_retrained_on_request(
        splits, tmp_path, no_retrain, caplog):
    ds = splits["train"]
    teacher = torch.randn(len(ds), 2, generator=torch.Generator().manual_seed(5))
    config = losses.default_config("kd", lam=0.5, T=2.0, warmup_epochs=1)

    def warm():
        return train.train_warmup(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=2),
                                  losses.warmup_objective(config, teacher, len(ds), 2), 1,
                                  ckpt_dir=tmp_path, name="warmup-seed0")

    warm()
    (path,) = tmp_path.glob("warmup-seed0-*.pt")
    with caplog.at_level(logging.INFO, logger="fairkd"):
        warm()
    assert f"reused checkpoint {path.name}" in _messages(caplog)
    no_retrain.setenv("FAIRKD_RETRAIN", "warmup")
    no_retrain.setenv("FAIRKD_RETRAIN_RUN", "run-3")
    warm()
    assert torch.load(path, weights_only=True)["run"] == "run-3"


def test_the_runner_parses_retrain_and_refuses_names_no_checkpoint_has():
    parse = pipeline.build_parser().parse_args
    assert parse([]).retrain is None
    assert parse(["--retrain"]).retrain == []
    assert parse(["--retrain", "teacher", "student-kd"]).retrain == ["teacher", "student-kd"]
    for ok in (["teacher"], ["teacher-pre"], ["warmup"], ["warmup-seed12"], ["student-laplace_kd-seed0"],
               ["student"], []):
        assert runner_checks.check_retrain(ok) == ok
    for bad in ("studnet", "student-kd-seedx", "checkpoints", ""):
        with pytest.raises(ValueError, match="no checkpoint name starts with it"):
            runner_checks.check_retrain([bad])


def test_the_runner_tells_every_kernel_of_the_run_the_same_retrain_request(
        tmp_path, no_retrain, capsys):
    seen = []

    def fake_notebook(src, out_path, parameters, cwd, progress=True, optional=None):
        seen.append((os.environ.get("FAIRKD_RETRAIN"), os.environ.get("FAIRKD_RETRAIN_RUN")))

    no_retrain.setattr(pipeline, "run_notebook", fake_notebook)
    argv = ["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--only", "01", "02", "--quiet"]
    assert pipeline.main([*argv, "--retrain", "teacher", "student-kd"]) == 0
    assert [s[0] for s in seen] == ["teacher student-kd"] * 2
    assert seen[0][1] and seen[0][1] == seen[1][1]  # one run: each checkpoint retrained once
    assert "FAIRKD_RETRAIN" not in os.environ  # restored after the run
    assert pipeline.main([*argv, "--retrain"]) == 0
    assert seen[2][0] == "*" and seen[2][1] != seen[0][1]
    assert pipeline.main(argv) == 0
    assert seen[4:] == [(None, None)] * 2
    assert "--retrain: retraining teacher* student-kd*" in (tmp_path / "synthetic-smoke" / "run.log").read_text()


# ---------------------------------------------------------------- 4: damaged records
NAMES = ["y0 a0", "y0 a1", "y1 a0", "y1 a1"]
TEACHER = "teacher-erm-teacher-seed0-map-test"
STUDENT = "student-kd-cfg-seed0-map-test"


def _metric_rows(model, method, config_id):
    g = torch.arange(20) % 4
    y = g // 2
    probs = torch.softmax(torch.randn(20, 2, generator=torch.Generator().manual_seed(0)), 1)
    return metrics.metric_rows(probs, y, g, NAMES, dataset="synthetic", profile="smoke", seed=0,
                               config_id=config_id, model=model, method=method, predictive="map",
                               split="test")


def _run_dir(tmp_path, groups_csv=True):
    if groups_csv:
        records.write_csv(tmp_path / "groups.csv", pd.DataFrame(
            [{"split": s, "group": k, "group_name": NAMES[k], "y": k // 2, "a": k % 2, "n": 5}
             for s in ("train", "val", "test") for k in range(4)]))
    records.write_record(tmp_path, "metrics", TEACHER, _metric_rows("teacher", "erm", "teacher"))
    records.write_record(tmp_path, "metrics", STUDENT, _metric_rows("student", "kd", "cfg"))
    return tmp_path


@pytest.mark.parametrize("groups_csv", [True, False])
def test_a_teacher_record_cut_to_two_rows_stops_assembly_naming_file_and_notebook(tmp_path, groups_csv):
    run_dir = _run_dir(tmp_path, groups_csv)
    assert len(records.assemble(run_dir, "metrics")) == 10
    path = records.record_path(run_dir, "metrics", TEACHER)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))  # header + 2 rows
    with pytest.raises(ValueError) as err:
        records.assemble(run_dir, "metrics")
    assert str(path) in str(err.value) and "02_teacher" in str(err.value)
    assert "delete it and rerun notebook 02_teacher" in str(err.value)


def test_a_record_cut_mid_line_is_refused(tmp_path):
    run_dir = _run_dir(tmp_path)
    path = records.record_path(run_dir, "metrics", STUDENT)
    text = path.read_text()
    path.write_text(text[:len(text) - 4])  # the overall row's nll cut short
    with pytest.raises(ValueError, match="cut short.*05_distillation_comparison"):
        records.assemble(run_dir, "metrics", write=False)


@pytest.mark.parametrize("damage, message", [
    (lambda df: df.drop(columns="nll"), "lacks the columns"),
    (lambda df: df.assign(seed=[None] + [0] * (len(df) - 1)), "missing values"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "not one row per group"),
    (lambda df: df.assign(n=df.n + 1), "summed over groups|group sizes"),
])
def test_a_record_with_bad_columns_keys_or_rows_is_refused(tmp_path, damage, message):
    run_dir = _run_dir(tmp_path)
    path = records.record_path(run_dir, "metrics", TEACHER)
    records.write_csv(path, damage(records.read_table(path)))
    with pytest.raises(ValueError, match=message):
        records.assemble(run_dir, "metrics")
    assert not (run_dir / "metrics.csv").exists()


def test_group_sizes_are_checked_against_groups_csv(tmp_path):
    run_dir = _run_dir(tmp_path)
    groups = pd.read_csv(run_dir / "groups.csv")
    records.write_csv(run_dir / "groups.csv", groups.assign(n=groups.n * 2))
    with pytest.raises(ValueError, match="group sizes"):
        records.assemble(run_dir, "metrics")


def test_a_truncated_predictions_or_weights_record_is_refused(tmp_path):
    run_dir = _run_dir(tmp_path)
    pred = pd.DataFrame({"id": [f"t{i}" for i in range(20)], "split": "test", "group": [i % 4 for i in range(20)],
                         "y": 0, "seed": 0, "model": "student", "method": "kd", "config_id": "cfg",
                         "predictive": "map", "prob": 0.5, "margin": 0.0, "correct": True,
                         "weight": float("nan"), "variance": float("nan")})
    records.write_record(run_dir, "predictions", STUDENT, pred)
    assert len(records.assemble(run_dir, "predictions")) == 20
    records.write_record(run_dir, "predictions", STUDENT, pred.iloc[:12])
    with pytest.raises(ValueError, match="12 rows for split 'test'"):
        records.assemble(run_dir, "predictions")
    weights = pd.DataFrame([{"seed": 0, "method": "dedier", "config_id": "cfg", "epoch": e, "group": k, "n": 5,
                             "term": t, "weight": 1.0, "group_name": NAMES[k]}
                            for t in ("ce", "kd") for e in (1, 2) for k in range(4)])
    records.write_record(run_dir, "weights", "dedier-cfg-seed0", weights)
    assert len(records.assemble(run_dir, "weights")) == 16
    records.write_record(run_dir, "weights", "dedier-cfg-seed0", weights.iloc[:-3])
    with pytest.raises(ValueError, match="dedier-cfg-seed0.*05_distillation_comparison"):
        records.assemble(run_dir, "weights")


@pytest.mark.parametrize("kind, name, notebook", [
    ("metrics", TEACHER, "02_teacher"),
    ("predictions", "teacher-erm-teacher-seed0-map-test", "02_teacher"),
    ("metrics", "student-erm-abc-seed0-map-val", "03_early_exit_student"),
    ("metrics", "exit-erm-abc-seed0-map-test", "03_early_exit_student"),
    ("metrics", "exit_laplace-erm-exact-seed0-probit-test", "04_laplace_early_exit"),
    ("metrics", "student-laplace_kd-abc-seed0-map-test", "05_distillation_comparison"),
    ("predictions", "exit-dedier-abc-seed0-map-train", "05_distillation_comparison"),
    ("weights", "dedier_both-abc-seed1", "05_distillation_comparison"),
    ("laplace_effect", "laplace_kd-abc-seed1", "05_distillation_comparison"),
    ("timings", "teacher-pretrained", "02_teacher"),
    ("timings", "student-erm-seed0-abc", "03_early_exit_student"),
    ("timings", "student-kd-seed0-abc", "05_distillation_comparison"),
])
def test_each_record_names_the_notebook_that_writes_it(kind, name, notebook):
    assert records.writer_notebook(kind, name) == notebook


# ---------------------------------------------------------------- 13: plumbing-check profile
def test_the_smoke_profile_says_its_numbers_mean_nothing_and_where_real_ones_are(tmp_path):
    note = rundir.profile_note(_smoke_run(tmp_path))
    assert "plumbing check" in note and "meaningless" in note and "make reproduce" in note
    assert "results/reference/synthetic-default/summary.csv" in note
    assert rundir.profile_note(_smoke_run(tmp_path, "default")) is None
    root = rundir.REPO_ROOT
    assert (root / "results" / "reference" / "synthetic-default" / "summary.csv").is_file()
    assert "## What the reference run shows" in (root / "README.md").read_text()


@pytest.mark.parametrize("path", pipeline.discover_notebooks(), ids=lambda p: p.stem)
def test_every_notebook_prints_the_note_right_after_setup(path):
    body = ast.parse(path.read_text()).body
    setup = [i for i, node in enumerate(body) if isinstance(node, ast.Assign)
             and ast.unparse(node.value).startswith("fk.rundir.setup(")]
    assert len(setup) == 1
    assert ast.unparse(body[setup[0] + 1]) == "fk.rundir.print_profile_note(run)"
