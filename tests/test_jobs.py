"""Notebook 05's students as jobs (fairkd_utils.jobs): local worker processes give the
same tables as inline, a failing job is named with its log while the others finish and
a rerun runs only it, the SLURM path (job array, parameters, log paths) works with
submitit's local executor standing in for a cluster, and no two runs share a run
directory at once."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from fairkd_utils import checkpoints, executors, hparams, jobs, losses, records, rundir, students, sweep
from fairkd_utils import teacher as teacher_mod

#: A real comparison, kept small: one method per kind of weight (none, the exit's MAP,
#: the exit's Laplace, the true group at lam = 0) on the smoke profile's seed.
METHODS = ("kd", "dedier_both", "laplace_kd", "group_balanced_erm")
TABLES = ("metrics", "predictions", "weights", "laplace_effect")


def _prefix(smoke_run: Path, dest: Path):
    """A copy of the smoke run as notebooks 01-03 leave it: the teacher's files, the
    ERM student and its warm-up; no notebook-05 checkpoint, warm-up or job stamp."""
    run_dir = dest / "synthetic-smoke"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("jobs", "done", "sweep", "*.lock"))
    run = rundir.setup(run_dir, dest / "figures", "smoke", "synthetic", None, [0], "cpu")
    keep = students.plan_student(run, hparams.method_config(run, "erm"), 0).warmup_checkpoint().name
    for ck in (run_dir / "checkpoints").iterdir():
        if not (ck.name.startswith(("teacher", "student-erm-")) or ck.name == keep):
            ck.unlink()
    return run


def _configs(run, methods=METHODS):
    return hparams.method_configs(run, methods)[0]   # as notebook 05 reads them: once, recorded


def _tables(run) -> dict:
    for kind in TABLES:
        records.assemble(run.run_dir, kind)
    return {kind: (run.run_dir / f"{kind}.csv").read_bytes() for kind in TABLES}


def _stamp(run, name) -> dict:
    return json.loads((run.run_dir / "records" / "done" / f"{name}.json").read_text())


def test_local_workers_give_tables_byte_identical_to_inline(smoke_run, tmp_path):
    """Same jobs, same threads per job (1: CPU training depends on the thread count),
    inline in this process vs two local worker processes: byte-identical tables and
    record files (timings aside); a rerun skips everything."""
    a, b = _prefix(smoke_run, tmp_path / "inline"), _prefix(smoke_run, tmp_path / "local")
    inline = jobs.run_grid(a, _configs(a), jobs.options("inline", threads=1), show=False)
    local = jobs.run_grid(b, _configs(b), jobs.options("local", workers=2, threads=1), show=False)
    for table in (inline, local):
        assert set(table.status) == {"done"}, table
        assert sorted(table.kind) == ["student"] * 4 + ["warmup"]   # kd's, shared by three
    for run in (a, b):   # the hyper-parameters of these records (method_configs), for the runner
        used = json.loads((run.run_dir / "hparams_used.json").read_text())
        assert used["configs"] == {m: c.to_dict() for m, c in _configs(run).items()}
        assert used["source"].startswith("library defaults") and used["file"] is None
    assert _tables(a) == _tables(b)
    for job in local[local.kind == "student"].job:
        sa, sb = _stamp(a, job), _stamp(b, job)
        assert sa["fingerprint"] == sb["fingerprint"] and sa["records"] == sb["records"]
        assert (sb["device"], sb["threads"]) == ("cpu", 1)
        for f in sa["records"]:
            if "/timings/" not in f:
                assert (a.run_dir / f).read_bytes() == (b.run_dir / f).read_bytes(), f
    logs = [Path(p) for p in local.stdout.dropna()]
    assert len(logs) == 5 and all(p.is_file() and b.run_dir / "jobs" in p.parents for p in logs)
    assert all("[fairkd] job " in p.read_text() for p in logs)  # each job's own log
    # the stamp's fingerprint is the one the checkpoint got
    kd = _stamp(b, next(j for j in local.job if j.startswith("student-kd-")))
    ck = next((b.run_dir / "checkpoints").glob("student-kd-seed0-*.pt"))
    assert ck.stem.endswith(kd["fingerprint"])
    # a rerun finds every job done: nothing submitted
    before = sorted((b.run_dir / "jobs").iterdir())
    again = jobs.run_grid(b, _configs(b), jobs.options("local", workers=2), show=False)
    assert set(again.status) == {"skipped"} and sorted((b.run_dir / "jobs").iterdir()) == before


def test_a_failing_job_is_named_with_its_log_and_a_rerun_runs_only_it(smoke_run, tmp_path):
    run = _prefix(smoke_run, tmp_path)
    configs = _configs(run, ("erm", "kd", "group_balanced_erm"))
    bad = students.plan_student(run, configs["group_balanced_erm"], 0).checkpoint
    bad.write_bytes(b"not a checkpoint")    # the job that loads it raises CheckpointError
    with pytest.raises(jobs.JobsFailed) as err:
        jobs.run_grid(run, configs, jobs.options("local", workers=2), show=False)
    message = str(err.value)
    name = f"student-group_balanced_erm-{configs['group_balanced_erm'].config_id}-seed0"
    assert "1 of 3 grid jobs did not finish" in message and f"{name}: failed; log " in message
    log = Path(message.split("; log ")[1].splitlines()[0])
    assert log.is_file() and run.run_dir / "jobs" in log.parents
    assert "CheckpointError" in message and "is corrupt" in message   # the error's last lines
    index = records.read_table(next((run.run_dir / "jobs").glob("*/jobs.csv")))
    assert index.set_index("job").status.to_dict() == {
        name: "failed", **{j: "done" for j in index.job if j != name}}
    for method in ("erm", "kd"):   # the others finished
        stamp = _stamp(run, f"student-{method}-{configs[method].config_id}-seed0")
        assert stamp["threads"] == max(1, jobs.cores() // 2)   # cores // workers
    assert not (run.run_dir / "records" / "done" / f"{name}.json").exists()

    bad.unlink()
    table = jobs.run_grid(run, configs, jobs.options("local", workers=2), show=False)
    assert table.set_index("job").status.to_dict() == {
        name: "done", **{j: "skipped" for j in table.job if j != name}}
    assert (run.run_dir / "records" / "done" / f"{name}.json").is_file()


def test_the_slurm_path_runs_a_job_array_with_a_local_executor_standing_in(smoke_run, tmp_path):
    """The slurm code path end to end (slurm parameters, map_array, waiting, log paths),
    submitit's local executor standing in for the cluster."""
    import submitit

    run = _prefix(smoke_run, tmp_path)
    made = []

    def stand_in(folder, cluster):
        made.append(cluster)
        return submitit.AutoExecutor(folder=folder, cluster="local")

    opts = jobs.options("slurm", workers=2, slurm={"partition": "gpu", "time": "0:30:00", "cpus": 1,
                                                   "gpus": 0}, executor_factory=stand_in, poll_s=0.2)
    table = jobs.run_grid(run, _configs(run, ("erm", "group_balanced_erm")), opts, show=False)
    assert made == ["slurm"] and set(table.status) == {"done"}
    for row in table.itertuples():
        assert Path(row.stdout).is_file() and Path(row.stderr).is_file()
        assert run.run_dir / "jobs" in Path(row.stdout).parents
        stamp = _stamp(run, row.job)
        assert (stamp["device"], stamp["threads"]) == ("cpu", 1)   # --slurm-cpus


def test_slurm_jobs_are_one_array_with_the_flags_parameters_and_log_paths(tmp_path, monkeypatch):
    """What sbatch receives, with a fake sbatch on PATH (no cluster, nothing runs)."""
    from submitit.core.utils import DelayedSubmission

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {tmp_path}/sbatch-script.sh\necho "Submitted batch job 4242"'),
                       ("srun", "exit 1")):   # submitit looks for srun to believe it is on SLURM
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", device="cpu")
    todo = [jobs.Job(name=f"student-kd-x-seed{s}", kind="student", run=run,
                     config=losses.default_config("kd"), seed=s, fingerprint="f", checkpoint="c",
                     ckpt_dir=run.path("checkpoints")) for s in range(3)]
    opts = jobs.options("slurm", workers=2, slurm={"partition": "gpu", "time": "1:30:00", "gpus": 1,
                                                   "cpus": 4})
    folder = jobs.submission_folder(run, "grid")
    subs = executors.submit_array(executors.slurm_executor(opts, folder), todo, opts)
    script = (tmp_path / "sbatch-script.sh").read_text()
    for line in ("--array=0-2%2", "--partition=gpu", "--time=90", "--gpus-per-node=1",
                 "--cpus-per-task=4", f"--output={folder}/%A_%a_0_log.out",
                 f"--error={folder}/%A_%a_0_log.err", "--job-name=fairkd"):
        assert f"#SBATCH {line}\n" in script, line
    assert [s.job_id for s in subs] == ["4242_0", "4242_1", "4242_2"]
    assert subs[1].paths.stderr == folder / "4242_1_0_log.err"
    submitted = DelayedSubmission.load(subs[2].paths.submitted_pickle)
    job, device = submitted.args
    assert (job.name, job.threads, device, job.run._splits) == ("student-kd-x-seed2", 4, "cuda", None)


def test_options_are_checked_before_anything_runs():
    assert jobs.parse_time("90") == jobs.parse_time("1:30:00") == jobs.parse_time("0-1:30") == 90
    assert jobs.parse_time("1:30") == 2 and jobs.parse_time("2-00") == 2880   # M:S rounds up
    with pytest.raises(ValueError, match="SLURM's forms"):
        jobs.parse_time("1h")
    with pytest.raises(ValueError, match="apply to --executor slurm only"):
        jobs.options("local", slurm={"partition": "gpu"})
    with pytest.raises(ValueError, match="--workers 0"):
        jobs.options("local", workers=0)
    with pytest.raises(ValueError, match="choose one of"):
        jobs.options("dask")
    assert jobs.options("slurm").slurm == {"time": jobs.SLURM_TIMEOUT_MIN}
    assert executors.slurm_parameters(jobs.options("slurm", workers=3, slurm={"partition": "p", "cpus": 2})) == {
        "name": "fairkd", "timeout_min": 240, "gpus_per_node": 0, "cpus_per_task": 2,
        "slurm_partition": "p", "slurm_array_parallelism": 3}


def test_local_slots_give_each_worker_one_gpu_or_none(monkeypatch):
    import torch

    assert executors.local_slots(2, "cpu") == [("cpu", {"gpus_per_node": 0, "visible_gpus": ()})] * 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    slots = executors.local_slots(None, "cuda")
    assert slots == [("cuda", {"gpus_per_node": 1, "visible_gpus": (0,)}),
                     ("cuda", {"gpus_per_node": 1, "visible_gpus": (1,)})]
    assert [p["visible_gpus"] for _, p in executors.local_slots(3, "cuda")] == [(0,), (1,), (0,)]


def test_a_stamp_counts_only_with_its_fingerprint_its_records_and_no_retrain(tmp_path, monkeypatch):
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", device="cpu")
    job = jobs.Job(name="student-kd-c1-seed0", kind="student", run=run,
                   config=losses.default_config("kd"), seed=0, fingerprint="abc",
                   checkpoint="student-kd-seed0", ckpt_dir=run.path("checkpoints"))
    assert not jobs.finished(job)
    records.write_text(run.path("records", "metrics", "r.csv"), "x\n")
    records.write_json(job.stamp, {"fingerprint": "abc", "records": ["records/metrics/r.csv"],
                                   "run": "earlier"})
    assert jobs.finished(job)
    assert not jobs.finished(job.__class__(**{**job.__dict__, "fingerprint": "other"}))
    monkeypatch.setenv(checkpoints.RETRAIN_ENV, "student-kd-")
    assert not jobs.finished(job)                 # --retrain asks for it (not yet in this run)
    monkeypatch.setenv(checkpoints.RETRAIN_RUN_ENV, "earlier")
    assert jobs.finished(job)                     # ...and this run has retrained it already
    monkeypatch.delenv(checkpoints.RETRAIN_ENV)
    run.path("records", "metrics", "r.csv").unlink()
    assert not jobs.finished(job)                 # a record is missing


def test_collect_writes_and_the_lock(tmp_path):
    with records.collect_writes() as written:
        records.write_text(tmp_path / "a.txt", "a")
        records.write_json(tmp_path / "b.json", {})
    records.write_text(tmp_path / "c.txt", "c")
    assert written == [tmp_path / "a.txt", tmp_path / "b.json"]
    with records.exclusive(tmp_path / "x.lock", "the thing"):
        assert f"pid {os.getpid()}" in (tmp_path / "x.lock").read_text()
        with pytest.raises(records.Locked, match=rf"the thing is in use by another run \(pid {os.getpid()}"):
            with records.exclusive(tmp_path / "x.lock", "the thing"):
                pass
    with records.exclusive(tmp_path / "x.lock", "the thing"):   # released
        pass


def test_the_sweep_runs_as_jobs_and_a_rerun_skips_them(smoke_run, tmp_path, monkeypatch):
    """The sweep's rounds as jobs (training replaced by known validation scores: the
    plumbing, not the training, which the grid tests cover): one row file and stamp per
    configuration and seed, the same choice as ``sweep.sweep`` makes, nothing rerun."""
    run = _prefix(smoke_run, tmp_path)
    calls = []

    def fake_row(run_, cfg, seed, teacher=None):
        calls.append(cfg.config_id)
        score = {"kd": 0.6 if (cfg.lam, cfg.T) == (0.9, 2.0) else 0.4}.get(cfg.method, 0.5 + cfg.beta / 10)
        return {"method": cfg.method, "config_id": cfg.config_id, "seed": seed, "lam": cfg.lam,
                "T": cfg.T, "beta": cfg.beta, "score": cfg.score, "val_worst_group_acc": score,
                "val_avg_acc": 0.9, "reused": False}

    monkeypatch.setattr(sweep, "sweep_row", fake_row)
    table, chosen = jobs.run_sweep(run, [0, 1], methods=["kd", "dedier_both"], show=False)
    assert chosen == {"kd": {"lam": 0.9, "T": 2.0}, "dedier_both": {"beta": 4.0}}
    assert len(table) == len(calls) == 9 * 2 + 3 * 2
    rows = sorted((run.run_dir / "sweep" / "records" / "rows").glob("sweep-*.csv"))
    stamps = sorted((run.run_dir / "sweep" / "records" / "done").glob("sweep-*.json"))
    assert len(rows) == len(stamps) == 24
    again, chosen_again = jobs.run_sweep(run, [0, 1], methods=["kd", "dedier_both"], show=False)
    assert len(calls) == 24 and chosen_again == chosen        # every job skipped
    assert again.to_csv() == table.to_csv()


def test_dfr_runs_after_the_grid_on_kds_student_and_a_rerun_skips_it(smoke_run, tmp_path):
    """DFR trains no student: notebook 05's grid runs it in a second phase, on kd's
    checkpoint (reused, not trained again), with the same records as students.run_method;
    changing DFR's own configuration reruns only the DFR job."""
    run = _prefix(smoke_run, tmp_path)
    table = jobs.run_grid(run, _configs(run, ("kd", "dfr")), jobs.options("inline", threads=1),
                          show=False)
    assert set(table.status) == {"done"}, table
    dfr = table[table.job.str.startswith("student-dfr-")]
    assert len(dfr) == 1 and not dfr.reused.isna().any() and bool(dfr.reused.iloc[0])
    kd_ckpts = list((run.run_dir / "checkpoints").glob("student-kd-seed0-*.pt"))
    assert len(kd_ckpts) == 1 and not list((run.run_dir / "checkpoints").glob("student-dfr-*"))
    stamp = _stamp(run, dfr.job.iloc[0])
    assert stamp["fingerprint"].startswith(kd_ckpts[0].stem.rsplit("-", 1)[-1])
    assert any("/dfr/" in f for f in stamp["records"]) and any("/metrics/" in f for f in stamp["records"])
    metrics = records.assemble(run.run_dir, "metrics")
    assert {"kd", "dfr"} <= set(metrics.method)
    again = jobs.run_grid(run, _configs(run, ("kd", "dfr")), jobs.options("inline", threads=1),
                          show=False)
    assert set(again.status) == {"skipped"}
    configs = _configs(run, ("kd", "dfr"))
    configs["dfr"] = configs["dfr"].replace(dfr_penalty="l2" if configs["dfr"].dfr_penalty != "l2" else "l1")
    third = jobs.run_grid(run, configs, jobs.options("inline", threads=1), show=False)
    assert dict(zip(third.job.str.split("-").str[1], third.status)) == {"kd": "skipped", "dfr": "done"}


def test_jtt_runs_in_the_grid_and_two_jtt_configs_write_apart(smoke_run, tmp_path):
    """A JTT job reads its error set twice (training, final weights): its files count
    once. Two JTT configurations of one seed (the sweep's lambda_up grid) share the
    identification model but write separate timing records, so their jobs never write
    one file."""
    run = _prefix(smoke_run, tmp_path)
    configs = _configs(run, ("jtt",))
    table = jobs.run_grid(run, configs, jobs.options("inline", threads=1), show=False)
    assert set(table.status) == {"done"}, table
    stamp = _stamp(run, table.job.iloc[0])
    assert len(stamp["files"]) == len(set(stamp["files"]))
    other = configs["jtt"].replace(jtt_upweight=configs["jtt"].jtt_upweight + 1.0)
    errors = students.jtt_error_set(run, other, 0)
    assert errors.dtype == torch.bool and errors.shape == (len(run.splits()["train"]),)
    timings = sorted(p.name for p in (run.run_dir / "records" / "timings").glob("jtt-identification-*"))
    assert timings == sorted(f"jtt-identification-{c.config_id}-seed0.csv"
                             for c in (configs["jtt"], other))


def test_under_augmentation_a_teacher_model_given_is_kept_not_loaded_again(tmp_path, monkeypatch):
    """With training augmentation the students distil from the teacher model; the grid
    resolves it once and hands it to DFR's phase, which must not load it a second time."""
    run = rundir.setup(tmp_path / "run", tmp_path / "fig", "smoke", "synthetic", None, [0], "cpu",
                       profile_overrides={"augment": True})
    online = losses.OnlineTeacher(torch.nn.Linear(2, 2), fingerprint="given")
    calls = []
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: calls.append(a))
    configs = [hparams.method_config(run, "kd"), hparams.method_config(run, "dfr")]
    assert jobs._teacher(run, configs, online) is online and not calls
    assert jobs._teacher(run, [hparams.method_config(run, "erm")], online) is None   # nothing distils


@pytest.mark.parametrize("where", ["partition", "run_dir"])
def test_a_control_character_never_reaches_the_sbatch_script(tmp_path, monkeypatch, where):
    """A newline would end the #SBATCH comment and run the next line as a command: a
    value that would reach the script with one is refused before sbatch is called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {tmp_path}/sbatch-script.sh\necho "Submitted batch job 4242"'),
                       ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    partition = "gpu\ntouch /tmp/pwned" if where == "partition" else "gpu"
    run_dir = tmp_path / ("run\ntouch x" if where == "run_dir" else "run")
    run = rundir.setup(run_dir, tmp_path / "fig", "smoke", device="cpu")
    todo = [jobs.Job(name="student-kd-x-seed0", kind="student", run=run,
                     config=losses.default_config("kd"), seed=0, fingerprint="f", checkpoint="c",
                     ckpt_dir=run.path("checkpoints"))]
    opts = jobs.options("slurm", slurm={"partition": partition})
    with pytest.raises(ValueError, match=r"control character.*\\n" if where == "partition"
                       else r"(?s)the job folder.*control character"):
        executors.submit_array(executors.slurm_executor(opts, jobs.submission_folder(run, "grid")), todo, opts)
    assert not (tmp_path / "sbatch-script.sh").exists()


def test_the_runner_refuses_a_partition_with_a_newline_before_any_kernel(tmp_path, monkeypatch, capsys):
    from fairkd_utils import pipeline

    monkeypatch.setattr(pipeline, "run_notebook", lambda *a, **k: pytest.fail("a kernel was started"))
    assert pipeline.main(["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--only", "01",
                          "--executor", "slurm", "--slurm-partition", "gpu\ntouch /tmp/pwned"]) == 1
    err = capsys.readouterr().err
    assert "--slurm-partition 'gpu\\ntouch /tmp/pwned' holds the control character(s) '\\n'" in err
    assert not (tmp_path / "synthetic-smoke").exists()
