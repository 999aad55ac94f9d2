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

from fairkd_utils import pipeline, rundir, runner_checks, train
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
    monkeypatch.setattr(runner_checks, "REPO_ROOT", repo)
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
    runner_checks.check_prerequisites(args, run_dir, pipeline.select_notebooks(known, ["02", "03", "05"]),
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
    runner_checks.check_prerequisites(args, run_dir, pipeline.select_notebooks(known, ["06"]), known,
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


# ---------------------------------------------------------------- issue 22, 7: the profile after --set
@pytest.mark.parametrize("setting, message", [
    ("student_epochs=0", "student_epochs=0: expected a whole number >= 1"),
    ("teacher_epochs=-2", "teacher_epochs=-2: expected a whole number >= 1"),
    ("warmup_epochs=-1", "warmup_epochs=-1: expected a whole number >= 0"),
    ("batch_size=0", "batch_size=0: expected a whole number >= 1"),
    ("lr=0", "lr=0.0: expected a finite number > 0"),
    ("lr=NaN", "lr=nan: expected a finite number > 0"),
    ("teacher_adapt_lr=-1", "teacher_adapt_lr=-1.0: expected a finite number > 0"),
    ("exit_stage=4", "exit_stage=4: the student has stages 1 to 3"),
    ("exit_stage=0", "exit_stage=0: the student has stages 1 to 3"),
    ("optimizer=adam", "optimizer='adam': choose one of ('sgd', 'adamw')"),
    ("student_arch=resnet19", "student_arch='resnet19': choose one of"),
    ("exit_pool=max", "exit_pool='max': choose one of ('cls', 'mean')"),
    ("methods=[]", "methods=[]: give at least one method"),
    ("methods=[\"kd\",\"kdd\"]", "unknown methods ['kdd']"),
    ("student_widths=[8,16]", "student_widths=[8, 16] has 2 stages but student_blocks=[1, 1, 1] has 3"),
    ("student_widths=[8,0,32]", "student_widths=[8, 0, 32]: expected whole numbers >= 1"),
    ("seeds=0,1", "seeds='0,1': expected a JSON list of whole numbers, e.g. seeds=[0,1]"),
    ("seeds=[]", "seeds=[]: give at least one seed"),
    ("seeds=[0.5]", "seeds=[0.5]: expected a JSON list of whole numbers"),
])
def test_bad_profile_values_after_set_are_named_before_any_kernel(setting, message, capsys, no_kernel,
                                                                 tmp_path):
    assert _main("--only", "01", "--set", setting, out=tmp_path) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_every_built_in_profile_passes_the_check():
    from fairkd_utils import profiles

    for table in (profiles.PROFILES, profiles.TEXT_PROFILES):
        for p in table.values():
            assert profiles.check_profile(p) is p


@pytest.mark.parametrize("argv", [["--sweep", "--seeds", "3"], ["--set", "sweep=true", "seeds=[0]"]])
def test_a_sweep_needs_two_seeds(argv, capsys, no_kernel, tmp_path):
    assert _main("--only", "01", *argv, out=tmp_path) == 1
    assert "the sweep averages over at least two seeds" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 22, 8: Ctrl-C
def test_ctrl_c_says_in_one_line_what_was_interrupted_and_that_a_rerun_resumes(
        fake_repo, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_notebook", interrupted)
    assert _main("--quiet", out=tmp_path) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "[fairkd] interrupted during 01_fake: rerun the same command to resume (finished "
        "checkpoints and jobs are reused)"], err
    manifest = json.loads((tmp_path / "synthetic-smoke" / "manifest.json").read_text())
    assert manifest["notebooks"]["01_fake"]["status"] == "interrupted"


# ---------------------------------------------------------------- issue 22, 11: flock unsupported
def test_a_lock_that_cannot_be_taken_says_what_failed(tmp_path, monkeypatch, capsys, no_kernel):
    import errno
    import fcntl

    from fairkd_utils import records

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(records.LockFailed) as err:
        with records.exclusive(tmp_path / "x.lock", "the thing"):
            pass
    assert "in use by another run" not in str(err.value)
    assert f"cannot lock {tmp_path / 'x.lock'} for the thing: flock failed ([Errno {errno.ENOLCK}] " \
           "No locks available)" in str(err.value)
    assert "file system" in str(err.value)
    assert _main("--only", "01", out=tmp_path) == 1
    assert "flock failed ([Errno" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 22, 3: orphaned local workers
PARENT = '''
import sys, time
from pathlib import Path
from fairkd_utils import executors, jobs, losses
from slow_work import SlowRun
out = Path(sys.argv[1])
run = SlowRun(run_dir=out / "run", figures_dir=out / "fig", profile=None, dataset="synthetic",
              data_root=None, seeds=[0], device="cpu")
todo = [jobs.Job(name=f"student-kd-x-seed{s}", kind="student", run=run,
                 config=losses.default_config("kd"), seed=s, fingerprint="f", checkpoint="c",
                 ckpt_dir=out / "ck") for s in range(2)]
executors._run_local(todo, jobs.options("local", workers=2, threads=1), out / "jobs", "cpu",
                     executors._Progress(2, "t", False), {}, {})
'''


def _state(pid: int):
    """The process's state letter (Z: a zombie, dead but not reaped), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_local_workers_die_with_the_process_that_started_them(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "parent.py").write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path)], env=env)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("started-*"))) < 2:
            assert parent.poll() is None and time.time() < deadline, "the workers never started"
            time.sleep(0.2)
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")]
        assert all(_state(w) not in (None, "Z") for w in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 20
    while any(_state(w) not in (None, "Z") for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    alive = [w for w in workers if _state(w) not in (None, "Z")]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} kept running after their parent was killed"
    assert not list(tmp_path.glob("finished-*"))


def test_a_method_set_run_shares_the_plain_runs_checkpoints_without_touching_them(tmp_path):
    """--methods laplace|extended starts from <dataset>-<profile>'s checkpoint files
    (fingerprinted names: only the same model is reused); files it has stay, and neither
    a plain run, a --retrain run nor a missing plain run shares anything."""
    parse = pipeline.build_parser().parse_args
    base = tmp_path / "synthetic-smoke" / "checkpoints"
    base.mkdir(parents=True)
    for name in ("teacher-abc.pt", "student-kd-seed0-def.pt", "warmup-seed0-123.pt"):
        (base / name).write_bytes(name.encode())
    args = parse(["--profile", "smoke", "--out", str(tmp_path), "--methods", "laplace"])
    run_dir, _ = pipeline.run_folders(args)
    assert run_dir.name == "synthetic-smoke-laplace"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "teacher-abc.pt").write_bytes(b"its own")
    assert pipeline.share_base_checkpoints(args, run_dir) == (2, base.parent)
    assert (run_dir / "checkpoints" / "teacher-abc.pt").read_bytes() == b"its own"
    assert (run_dir / "checkpoints" / "student-kd-seed0-def.pt").read_bytes() == b"student-kd-seed0-def.pt"
    assert pipeline.share_base_checkpoints(args, run_dir)[0] == 0         # idempotent
    retrain = parse(["--profile", "smoke", "--out", str(tmp_path), "--methods", "laplace", "--retrain"])
    assert pipeline.share_base_checkpoints(retrain, tmp_path / "other-laplace")[0] == 0
    plain = parse(["--profile", "smoke", "--out", str(tmp_path)])
    assert pipeline.share_base_checkpoints(plain, pipeline.run_folders(plain)[0])[0] == 0
    lonely = parse(["--profile", "default", "--out", str(tmp_path), "--methods", "extended"])
    assert pipeline.share_base_checkpoints(lonely, pipeline.run_folders(lonely)[0])[0] == 0
    assert sorted(p.name for p in base.iterdir()) == ["student-kd-seed0-def.pt", "teacher-abc.pt",
                                                      "warmup-seed0-123.pt"]
