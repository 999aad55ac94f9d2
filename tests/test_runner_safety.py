"""The runner is safe to rerun: nothing is written outside --out, a failed or killed
notebook never replaces the last good one or mixes runs in the manifest, what a
notebook needs is checked before any kernel starts, and training shows progress."""

import json
import logging
import os
import re
from pathlib import Path

import nbformat
import pytest

from fairkd_utils import pipeline, rundir, train
from fairkd_utils.profiles import METHODS

# One tiny notebook "01" (no prerequisites): it logs like the training loop, draws a
# "figure", and fails while <run_dir>/fail exists.
FAKE = '''\
# %% tags=["parameters"]
run_dir = None
figures_dir = None
data_root = None
seeds = None
profile = "smoke"
dataset = "synthetic"
device = "cpu"

# %%
import logging
from pathlib import Path
import fairkd_utils as fk
run = fk.rundir.setup(run_dir, figures_dir, profile, dataset, data_root, seeds, "cpu")
logging.getLogger("fairkd").info("fake-seed%d epoch 1/1 loss 0.5", run.seeds[0])
Path(figures_dir, "fake.png").write_bytes(b"png")
if Path(run_dir, "fail").exists():
    raise ValueError("boom")
'''


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """The runner pointed at a repository holding only the fake notebook 01."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "notebooks" / "01_fake.py").write_text(FAKE)
    monkeypatch.setattr(pipeline, "REPO_ROOT", repo)
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", repo / "notebooks")
    return repo


def _errors(path):
    nb = nbformat.read(str(path), as_version=4)
    return [o.evalue for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]


def _main(*argv, out=None):
    return pipeline.main(["--profile", "smoke", "--device", "cpu", *(["--out", str(out)] if out else []),
                          *argv])


# ---------------------------------------------------------------- 6: figures stay inside --out
def test_figures_go_into_the_run_directory_when_out_is_given(fake_repo, tmp_path, capfd):
    out = tmp_path / "out"
    assert _main("--only", "01", "--seeds", "0", out=out) == 0
    assert (out / "synthetic-smoke" / "figures" / "fake.png").is_file()
    assert not (fake_repo / "figures").exists()
    # 12: the epoch line reaches run.log and the terminal; the kernel's TCP warning does not
    captured = capfd.readouterr()
    assert "fake-seed0 epoch 1/1 loss 0.5" in (out / "synthetic-smoke" / "run.log").read_text()
    assert re.search(r"^  \d\d:\d\d:\d\d fake-seed0 epoch 1/1 loss 0.5$", captured.out, re.M)
    assert "without encryption" not in captured.out + captured.err


def test_figures_default_to_the_repository_only_with_the_default_out(fake_repo, tmp_path):
    args = pipeline.build_parser().parse_args(["--profile", "smoke"])
    assert pipeline.run_folders(args) == (fake_repo / "results" / "synthetic-smoke",
                                          fake_repo / "figures" / "synthetic-smoke")
    args = pipeline.build_parser().parse_args(["--profile", "smoke", "--out", str(tmp_path)])
    assert pipeline.run_folders(args) == (tmp_path / "synthetic-smoke",
                                          tmp_path / "synthetic-smoke" / "figures")
    args = pipeline.build_parser().parse_args(["--out", str(tmp_path), "--figures", str(tmp_path / "f")])
    assert pipeline.run_folders(args)[1] == tmp_path / "f"


# ---------------------------------------------------------------- 7: failures and the manifest
def test_a_failed_only_run_keeps_the_good_notebook_and_its_own_manifest_entry(fake_repo, tmp_path, capsys):
    out, run_dir = tmp_path / "out", tmp_path / "out" / "synthetic-smoke"
    executed = run_dir / "executed"
    assert _main("--seeds", "0", "--quiet", out=out) == 0
    good = (executed / "01_fake.ipynb").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["notebooks"]["02_killed"] = {"status": "running", "seeds": [0]}   # a killed run
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    (run_dir / "fail").touch()
    assert _main("--only", "01", "--seeds", "5", "--quiet", out=out) == 1
    assert "01_fake.failed.ipynb" in capsys.readouterr().err
    assert (executed / "01_fake.ipynb").read_text() == good and _errors(executed / "01_fake.ipynb") == []
    assert _errors(executed / "01_fake.failed.ipynb") == ["boom"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = manifest["notebooks"]["01_fake"]
    assert entry["status"] == "failed" and entry["seeds"] == [5] and "--seeds 5" in entry["command"]
    assert manifest["config"]["parameters"]["seeds"] == [0]     # the whole run's seeds stay
    assert manifest["notebooks"]["02_killed"]["status"] == "interrupted"

    (run_dir / "fail").unlink()
    assert _main("--only", "01", "--seeds", "5", "--quiet", out=out) == 0
    assert not (executed / "01_fake.failed.ipynb").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["notebooks"]["01_fake"]["status"] == "ok"


def test_a_second_runner_into_the_same_run_directory_is_refused(fake_repo, tmp_path, capsys):
    from fairkd_utils import records

    out, run_dir = tmp_path / "out", tmp_path / "out" / "synthetic-smoke"
    with records.exclusive(run_dir / pipeline.RUN_LOCK, "held by the test"):
        assert _main("--seeds", "0", "--quiet", out=out) == 1
    err = capsys.readouterr().err
    assert f"run directory {run_dir} is in use by another run (pid {os.getpid()}" in err
    assert "give this run another --out" in err and "Traceback" not in err
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "executed").exists()
    assert _main("--seeds", "0", "--quiet", out=out) == 0     # released: runs


def test_entries_left_running_are_marked_interrupted(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"notebooks": {"03_x": {"status": "running"}, "01_y": {"status": "ok"}}}))
    entries = pipeline.load_manifest(path)["notebooks"]
    assert entries == {"03_x": {"status": "interrupted"}, "01_y": {"status": "ok"}}
    path.write_text("{")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        pipeline.load_manifest(path)


# ---------------------------------------------------------------- 8: checks before any kernel
@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if a notebook would be executed."""
    def refuse(*a, **k):
        raise AssertionError("a kernel was started")
    monkeypatch.setattr(pipeline, "run_notebook", refuse)


def test_out_naming_a_file_is_refused(tmp_path, capsys, no_kernel):
    (tmp_path / "file").write_text("x")
    assert _main("--only", "01", out=tmp_path / "file") == 1
    err = capsys.readouterr().err
    assert "[fairkd] error: --out" in err and "is a file, not a folder" in err
    assert "Traceback" not in err


def test_out_in_an_unwritable_folder_is_refused(tmp_path, capsys, no_kernel):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):   # root writes anywhere, but not into /proc
        locked = Path("/proc/1")
    try:
        assert _main("--only", "01", out=locked / "runs") == 1
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert f"cannot write in {locked} (permission denied)" in capsys.readouterr().err


def _touch(run_dir, *paths):
    for p in paths:
        (run_dir / p).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / p).write_text("x")


def test_missing_prerequisites_name_the_writer_and_the_command(tmp_path, capsys, no_kernel):
    run_dir = tmp_path / "synthetic-smoke"
    _touch(run_dir, "groups.csv")
    assert _main("--only", "05", out=tmp_path) == 1
    err = capsys.readouterr().err
    assert "05_distillation_comparison reads teacher_logits.pt (written by 02_teacher)" in err
    assert "records/metrics/student-erm-*-seed0-map-test.csv (written by 03_early_exit_student)" in err
    assert f"--out {tmp_path} --only 02 03 05" in err
    # nothing is missing that a selected notebook writes
    args = pipeline.build_parser().parse_args(["--out", str(tmp_path), "--profile", "smoke"])
    known = pipeline.discover_notebooks()
    pipeline.check_prerequisites(args, run_dir, pipeline.select_notebooks(known, ["02", "03", "05"]),
                                 known, [0], METHODS)


def test_only_06_with_seeds_never_run_says_which_notebooks_to_rerun(tmp_path, capsys, no_kernel):
    run_dir = tmp_path / "synthetic-smoke"
    _touch(run_dir, "groups.csv", "summary.csv", "teacher_logits.pt",
           *[f"records/metrics/student-{m}-abc123-seed0-map-test.csv" for m in METHODS])
    assert _main("--only", "06", "--seeds", "3", out=tmp_path) == 1
    err = capsys.readouterr().err
    assert "06_fairness_plots reads records/metrics/student-" in err and "-seed3-map-test.csv" in err
    assert "run 03_early_exit_student, 05_distillation_comparison too" in err
    assert err.rstrip().endswith("--only 03 05 06 --seeds 3")
    args = pipeline.build_parser().parse_args(["--out", str(tmp_path), "--profile", "smoke"])
    known = pipeline.discover_notebooks()
    pipeline.check_prerequisites(args, run_dir, pipeline.select_notebooks(known, ["06"]), known,
                                 [0], METHODS)


# ---------------------------------------------------------------- 9: --only and --seeds
def test_only_accepts_notebook_numbers_and_says_so(capsys, no_kernel, tmp_path):
    assert _main("--only", "5x", out=tmp_path) == 1
    err = capsys.readouterr().err
    assert "--only 5x: expected notebook numbers such as 04 or 4; known: 01 02 03 04 05 06" in err
    assert [p.name[:2] for p in pipeline.select_notebooks(pipeline.discover_notebooks(), ["5", "06"])] == ["05", "06"]


@pytest.mark.parametrize("seed", ["-1", str(2**31)])
def test_seeds_out_of_range_are_refused_at_the_start(seed, capsys, no_kernel, tmp_path):
    assert _main("--only", "01", "--seeds", "0", seed, out=tmp_path) == 1
    assert f"--seeds {seed}: every seed must satisfy 0 <= seed < 2**31" in capsys.readouterr().err
    assert not (tmp_path / "synthetic-smoke").exists()


# ---------------------------------------------------------------- 12: progress in run.log
def test_the_training_loop_logs_one_line_per_epoch(caplog):
    from test_train import TINY, _cfg, _split
    from fairkd_utils import models

    splits = {"train": _split("train", 64, 0), "val": _split("val", 32, 1), "test": _split("test", 32, 2)}
    with caplog.at_level(logging.INFO, logger="fairkd"):
        train.train_model(models.build_student(TINY, 2, seed=0), splits, _cfg(epochs=2), name="tiny")
    lines = [r.getMessage() for r in caplog.records if r.name == "fairkd"]
    assert len(lines) == 2
    assert lines[1].startswith("tiny epoch 2/2 loss ") and " val wga " in lines[1] and " avg " in lines[1]


def test_setup_appends_the_fairkd_log_to_run_log_once(tmp_path):
    logger = logging.getLogger("fairkd")
    for run_dir in ("a", "a", "b"):
        rundir.setup(tmp_path / run_dir, tmp_path / "fig", "smoke", device="cpu")
        logger.info("line in %s", run_dir)
    handlers = [h for h in logger.handlers if getattr(h, "fairkd_run_log", None)]
    assert len(handlers) == 1
    assert (tmp_path / "a" / "run.log").read_text().count("line in a") == 2
    assert "line in b" in (tmp_path / "b" / "run.log").read_text()
    assert "line in b" not in (tmp_path / "a" / "run.log").read_text()
    logger.removeHandler(handlers[0])
    handlers[0].close()


def test_echo_log_prints_only_new_complete_lines(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("old line\n")
    with pipeline.echo_log(log):
        with open(log, "a") as fh:
            fh.write("new line\npartial")
    assert capsys.readouterr().out == "  new line\n"
    with pipeline.echo_log(log, enabled=False):
        with open(log, "a") as fh:
            fh.write(" done\n")
    assert capsys.readouterr().out == ""
