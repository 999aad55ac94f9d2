"""Notebook 05's method × seed grid and the sweep as jobs: one after another in the
notebook's process (``inline``, the default), as worker processes on this machine
(``local``) or as a SLURM job array (``slurm``), the last two through submitit
(the executors themselves: ``executors``).

**What a job is.** One student: train it (or reuse its checkpoint) and write its
own records, or — for the sweep — its row of ``sweep.csv``. Every distillation method
of a seed branches from one shared warm-up (``students.StudentPlan``), so students that
are going to be trained and share a missing warm-up wait for a *warm-up job*, one per
warm-up file (a warm-up only one student needs is trained by that student's job). The
teacher is not a job: notebook 02 trains it first, in its own process.

**Skipping what is done.** A finished job writes, last, a stamp
``<run_dir>/records/done/<job>.json`` (sweep jobs: ``<run_dir>/sweep/records/done/``)
holding its fingerprint and the files it wrote. *A job's fingerprint is the
fingerprint its student's checkpoint gets* (``students.StudentPlan.fingerprint``: the
method's and the loop's configs, the model's initialisation, the train and val data,
the objective with the teacher's logits, and the run's data and code identity, i.e. the
source of the modules that train and evaluate). A job whose stamp holds the same
fingerprint and whose record files are all there is skipped, so rerunning after a
failed or pre-empted job runs only what is missing; ``--retrain`` runs again a job
whose checkpoint it asks to retrain (once per run). Warm-up jobs are marked done by
their checkpoint file.

**Safety.** No two jobs write the same file (each writes its own records and
checkpoint; a warm-up is written by its warm-up job only; checked after every set of
jobs); one set of jobs per run directory at a time (``<run_dir>/jobs/.lock``).
Workers get their device, threads and ``--retrain`` settings explicitly from the
job, never from the notebook's kernel. Per-job logs (stdout and stderr) and an index
``jobs.csv`` go to ``<run_dir>/jobs/<time>-<label>/``; a job that fails is named with
its log and the last lines of its error after the others have finished.

**Threads and numbers.** On CPU torch's training is not bitwise the same for different
thread counts (summation order), so results are identical across executors when each
job uses the same number of threads (``threads``): ``inline`` keeps the process's
threads unless told, ``local`` gives each of its ``workers`` ``cores // workers``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from . import checkpoints, executors, records, students, sweep
from .teacher import load_teacher_logits, teacher_for_students
from .profiles import METHOD_SPECS, resolve_device
from .rundir import Run

logger = logging.getLogger("fairkd")

EXECUTORS = ("inline", "local", "slurm")
#: SLURM settings a user changes (``--slurm-partition/-time/-gpus/-cpus``).
SLURM_KEYS = ("partition", "time", "gpus", "cpus")
#: A job's time limit when none is given: local jobs (a week: they are not queued),
#: SLURM jobs (four hours; ``--slurm-time``).
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
SLURM_TIMEOUT_MIN = 4 * 60


class JobsFailed(RuntimeError):
    """Some jobs failed (the others finished); the message names each with its log."""


# --------------------------------------------------------------------------- options
def parse_time(value) -> int:
    """A time limit in whole minutes (seconds round up), read as SLURM's ``--time``
    reads it: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(value).strip())
    if not m:
        raise ValueError(f"--slurm-time {value!r}: expected SLURM's forms M, M:S, H:M:S, D-H, "
                         "D-H:M or D-H:M:S (e.g. 90 or 1:30:00 or 2-00)")
    days, clock = m.groups()
    parts = [int(x) for x in clock.split(":")]
    if days is None and len(parts) < 3:   # M or M:S: no hours
        parts.insert(0, 0)
    h, mi, sec = (parts + [0, 0])[:3]     # H[:M[:S]]
    seconds = ((int(days or 0) * 24 + h) * 60 + mi) * 60 + sec
    minutes = -(-seconds // 60)           # seconds round up
    if minutes < 1:
        raise ValueError(f"--slurm-time {value!r}: a job needs at least one minute")
    return minutes


@dataclass(frozen=True)
class Options:
    """How jobs run (:func:`options` checks and completes them)."""
    executor: str = "inline"
    workers: int | None = None      # local: processes at once; slurm: array tasks at once
    threads: int | None = None      # torch threads per job
    slurm: dict | None = None       # partition, time (minutes), gpus, cpus
    poll_s: float = 0.2             # how often a waiting notebook looks at its jobs
    #: stands in for ``submitit.AutoExecutor`` / ``submitit.LocalExecutor`` (tests)
    executor_factory: Callable | None = None


def options(executor: str = "inline", workers=None, threads=None, slurm=None,
            executor_factory=None, poll_s: float | None = None) -> Options:
    """Checked :class:`Options` from notebook 05's parameters (``slurm``: a dict with
    any of ``partition``, ``time``, ``gpus``, ``cpus``)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: choose one of {EXECUTORS}")
    workers, threads = _whole("--workers", workers), _whole("--threads", threads)
    slurm = {k: v for k, v in (slurm or {}).items() if v is not None}
    unknown = sorted(set(slurm) - set(SLURM_KEYS))
    if unknown:
        raise ValueError(f"SLURM settings {unknown}: known ones are {list(SLURM_KEYS)}")
    if slurm and executor != "slurm":
        raise ValueError(f"--slurm-{'/--slurm-'.join(sorted(slurm))} apply to --executor slurm only "
                         f"(the executor is {executor!r})")
    if executor == "slurm":
        slurm["time"] = parse_time(slurm.get("time", SLURM_TIMEOUT_MIN))
        _whole("--slurm-gpus", slurm.get("gpus"), least=0)
        _whole("--slurm-cpus", slurm.get("cpus"))
    if executor != "inline" and executor_factory is None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError(f"--executor {executor} runs jobs through submitit, which is not "
                             "installed: pip install -e . (it is a dependency)") from None
    poll = poll_s if poll_s is not None else (10.0 if executor == "slurm" else 0.2)
    return Options(executor, workers, threads, slurm or None, poll, executor_factory)


def _whole(flag: str, n, least: int = 1) -> int | None:
    """``n`` (the value of ``flag``) as an int, None if None; stop unless it is a whole
    number >= ``least``."""
    if n is not None and (int(n) != n or n < least):
        raise ValueError(f"{flag} {n}: expected a whole number >= {least}")
    return None if n is None else int(n)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One unit of work (see the module's docstring). ``run`` travels to the worker
    without its data (the worker builds it); ``env``: the ``--retrain`` variables the
    worker sets; ``after``: the warm-up job it waits for."""
    name: str
    kind: str                 # "warmup" | "student" | "sweep"
    run: Run
    config: object            # losses.MethodConfig
    seed: int
    fingerprint: str
    checkpoint: str           # the checkpoint's name: student-<method>-seed<N> | warmup-seed<N>
    ckpt_dir: Path
    after: str | None = None
    threads: int | None = None
    env: tuple = ()

    @property
    def root(self) -> Path:
        """Where its records live: the run directory, or its ``sweep/`` folder."""
        return self.run.path("sweep") if self.kind == "sweep" else self.run.run_dir

    @property
    def stamp(self) -> Path | None:
        """The record that says the job finished (warm-ups: their checkpoint says it)."""
        return None if self.kind == "warmup" else self.root / "records" / "done" / f"{self.name}.json"

    @property
    def row(self) -> Path:
        """A sweep job's row of ``sweep.csv``."""
        return self.root / "records" / "rows" / f"{self.name}.csv"


def _student_jobs(plans: list, kind: str = "student", refits=None) -> tuple[list, dict]:
    """A ``kind`` (student or sweep) job per plan, ``<kind>-<method>-<config_id>-seed<N>``,
    and the plans keyed by job name (what :func:`run_jobs` reads). ``refits``: per plan,
    the configuration of the method that retrains its student's last layer, which the
    job runs (its config id joins the student's fingerprint)."""
    env = {checkpoints.RETRAIN_RUN_ENV: checkpoints.current_run()}
    if os.environ.get(checkpoints.RETRAIN_ENV):
        env[checkpoints.RETRAIN_ENV] = os.environ[checkpoints.RETRAIN_ENV]
    jobs = []
    for plan, refit in zip(plans, refits or itertools.repeat(None)):
        cfg = refit or plan.config
        jobs.append(Job(name=f"{kind}-{cfg.method}-{cfg.config_id}-seed{plan.seed}", kind=kind,
                        run=plan.run, config=cfg, seed=plan.seed,
                        fingerprint=f"{plan.fingerprint}-{refit.config_id}" if refit else plan.fingerprint,
                        checkpoint=plan.name, ckpt_dir=plan.ckpt_dir, env=tuple(sorted(env.items()))))
    return jobs, {j.name: p for j, p in zip(jobs, plans)}


def _teacher(run: Run, configs, teacher):
    """What every plan of ``configs`` distils from, read once (not once per job): the
    teacher's logits or, with augmentation, the teacher itself (reused, never trained
    here when notebook 02 has run); None when no config distils."""
    if not any(c.lam > 0 for c in configs):
        return None
    if run.profile.augment:
        return teacher_for_students(run, teacher)   # a teacher model given is kept
    return teacher or load_teacher_logits(run)


def plan_grid(run: Run, configs: dict, teacher=None, seeds=None) -> list:
    """One :class:`students.StudentPlan` per seed and method (``configs``: method -> config)."""
    teacher = _teacher(run, configs.values(), teacher)
    return [students.plan_student(run, cfg, seed, teacher, progress=False)
            for seed in (run.seeds if seeds is None else seeds) for cfg in configs.values()]


def finished(job: Job) -> bool:
    """Whether ``job`` is done already: its stamp holds its fingerprint, every record
    file it wrote is there, and ``--retrain`` does not ask for its checkpoint again."""
    if job.stamp is None or not job.stamp.is_file():
        return False
    try:
        stamp = json.loads(job.stamp.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return (stamp.get("fingerprint") == job.fingerprint
            and all((job.run.run_dir / f).is_file() for f in stamp.get("records", []))
            and not (checkpoints.retrain_requested(job.checkpoint)
                     and stamp.get("run") != checkpoints.current_run()))


def _will_train(path: Path, name: str) -> bool:
    return not path.is_file() or checkpoints.must_retrain(path, name)


def with_warmups(jobs: list[Job], plans: dict) -> list[Job]:
    """``jobs`` preceded by the warm-up jobs they wait for: one per warm-up file that two
    or more students about to be trained branch from and that is missing (or to be
    retrained). A warm-up only one of them needs is trained by that student's job."""
    users = {}   # warm-up file -> the jobs about to train that branch from it
    for job in jobs:
        plan = plans[job.name]
        if plan.shares_warmup and _will_train(plan.checkpoint, plan.name):
            path = plan.warmup_checkpoint()
            if _will_train(path, f"warmup-seed{plan.seed}"):
                users.setdefault(path, []).append(job)
    shared = {path.stem: waiting for path, waiting in users.items() if len(waiting) > 1}
    after = {job.name: stem for stem, waiting in shared.items() for job in waiting}
    warmups = [dataclasses.replace(waiting[0], name=stem, kind="warmup", checkpoint=stem.rsplit("-", 1)[0],
                                   fingerprint=stem.rsplit("-", 1)[1]) for stem, waiting in shared.items()]
    return warmups + [dataclasses.replace(j, after=after.get(j.name)) for j in jobs]


# --------------------------------------------------------------------------- the job itself
def _log_to_stdout() -> None:
    """In a worker: the ``fairkd`` logger's lines (epochs, reused checkpoints) go to the
    job's own log, not to the run's ``run.log`` (the notebook writes one line per job there)."""
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def execute(job: Job, device: str, worker: bool = True) -> dict:
    """Run one job on ``device`` (given by the scheduler: never the kernel's) and write,
    last, its stamp. ``worker``: in a process of its own (sets the job's ``--retrain``
    variables and threads, logs to stdout) rather than in the notebook's."""
    import torch

    t0 = time.perf_counter()
    if worker:
        env = dict(job.env)
        for key in (checkpoints.RETRAIN_ENV, checkpoints.RETRAIN_RUN_ENV):
            os.environ.pop(key, None)
        os.environ.update(env)
        if env.get(executors.OWNER_ENV):
            executors._end_with_owner(env[executors.OWNER_ENV])
        _log_to_stdout()
    threads_before = torch.get_num_threads()
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        run = dataclasses.replace(job.run, device=resolve_device(device))
        if worker:
            print(f"[fairkd] job {job.name} ({job.kind}) on {run.device} with {torch.get_num_threads()} "
                  f"threads, host {socket.gethostname()}, pid {os.getpid()}", flush=True)
        run.splits()
        teacher = load_teacher_logits(run) if job.config.lam > 0 and not run.profile.augment else None
        setup_s = time.perf_counter() - t0
        reused = None
        with records.collect_writes() as written:
            if job.kind == "warmup":
                students.plan_student(run, job.config, job.seed, teacher, job.ckpt_dir,
                                   progress=False).train_warmup()
            elif job.kind == "student":
                result = students.run_method(run, job.config.method, job.seed, teacher, job.config)
                reused = bool(result.reused)
            elif job.kind == "sweep":
                row = sweep.sweep_row(run, job.config, job.seed, teacher)
                reused = bool(row["reused"])
                records.write_csv(job.row, pd.DataFrame([row]))
            else:
                raise ValueError(f"unknown job kind {job.kind!r}")
        # a file this job wrote twice (e.g. a timing record) is listed once
        files = list(dict.fromkeys(os.path.relpath(p, job.run.run_dir) for p in written))
        out = {"job": job.name, "kind": job.kind, "fingerprint": job.fingerprint, "reused": reused,
               "files": files, "records": [f for f in files if not f.endswith(".pt")],
               "run": checkpoints.current_run(), "device": run.device, "threads": torch.get_num_threads(),
               "host": socket.gethostname(), "setup_seconds": round(setup_s, 3),
               "work_seconds": round(time.perf_counter() - t0 - setup_s, 3),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if job.stamp is not None:
            records.write_json(job.stamp, out)
        if worker:
            print(f"[fairkd] job {job.name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        return out
    finally:
        if job.threads:
            torch.set_num_threads(threads_before)


# --------------------------------------------------------------------------- running them
def submission_folder(run: Run, label: str) -> Path:
    """``<run_dir>/jobs/<time>-<label>-<pid>/``: this call's job files and logs."""
    return run.path("jobs", f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{os.getpid()}")


def run_jobs(run: Run, jobs: list[Job], plans: dict, opts: Options | None = None,
             label: str = "grid", show: bool = True) -> pd.DataFrame:
    """Run the ``jobs`` not :func:`finished` (with the warm-ups they need) on
    ``opts.executor``, wait with a progress bar, and return one row per job (``status``:
    skipped, done, failed or not run). Raises :class:`JobsFailed` naming each failed
    job, its log and its error's last lines once every other job has finished."""
    opts = opts or options(**run.jobs)   # the runner's --executor, through the run's configuration
    todo = with_warmups([j for j in jobs if not finished(j)], plans)
    skipped = [j for j in jobs if j.name not in {t.name for t in todo}]
    n_warm = sum(j.kind == "warmup" for j in todo)
    logger.info("%s: %d jobs, %d done already (same fingerprint), %d to run%s on %s", label,
                len(jobs), len(skipped), len(todo) - n_warm,
                f" after {n_warm} warm-up job{'s' if n_warm > 1 else ''}" if n_warm else "", opts.executor)
    results = {j.name: {"status": "skipped"} for j in skipped}
    handles, folder = {}, None
    progress = executors._Progress(len(todo), label, show)
    try:
        if opts.executor == "inline" or not todo:
            executors._run_inline(todo, opts, progress, results)
        else:
            folder = submission_folder(run, label)
            folder.mkdir(parents=True, exist_ok=True)
            if opts.executor == "local":
                executors._run_local(todo, opts, folder, run.device, progress, results, handles)
            else:
                executors._run_array(todo, opts, folder, progress, results, handles)
    finally:
        progress.close()
        for name, sub in handles.items():  # interrupted: stop what still runs
            if name not in results:
                sub.cancel(check=False)
    table = _table([*todo, *skipped], results, handles)
    if folder is not None:
        records.write_csv(folder / "jobs.csv", table)
    _check_disjoint(results)
    failed = table[table.status.isin(["failed", "not run"])]
    if len(failed):
        raise JobsFailed(_failure_report(failed, results, len(todo), label))
    return table


def _table(jobs, results, handles) -> pd.DataFrame:
    rows = []
    for job in jobs:
        r, sub = results.get(job.name, {}), handles.get(job.name)
        row = {"job": job.name, "kind": job.kind, "method": job.config.method, "seed": job.seed,
               "status": r.get("status", "not run"),
               **{k: r.get(k) for k in ("reused", "seconds", "work_seconds", "device")},
               "job_id": None, "stdout": None, "stderr": None}
        if sub is not None:   # a worker's: its id and logs
            row.update(job_id=str(sub.job_id), stdout=str(sub.paths.stdout), stderr=str(sub.paths.stderr))
        rows.append(row)
    return pd.DataFrame(rows)


def _check_disjoint(results: dict) -> None:
    owner = {}
    for name, r in results.items():
        for f in r.get("files", []) if r.get("status") == "done" else []:
            if f in owner:
                raise RuntimeError(f"jobs {owner[f]} and {name} both wrote {f}: a bug in how "
                                   "the jobs were split; please report it")
            owner[f] = name


def _failure_report(failed: pd.DataFrame, results: dict, n: int, label: str) -> str:
    lines = [f"{len(failed)} of {n} {label} jobs did not finish (the others did; rerun the "
             "same command to run only what is missing):"]
    for row in failed.itertuples():
        r = results.get(row.job, {})
        if r.get("status") == "failed":
            lines.append(f"  {row.job}: failed; log {r.get('log')}")
            lines += [f"    | {ln}" for ln in r.get("error", [])]
        else:
            lines.append(f"  {row.job}: not run, {' '.join(r.get('error', []))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- notebook 05
def _locked(run: Run):
    return records.exclusive(run.path("jobs", ".lock"), f"the jobs of {run.run_dir}",
                             hint="give this run another --out")


def run_grid(run: Run, configs: dict, opts: Options | None = None, teacher=None, seeds=None,
             show: bool = True) -> pd.DataFrame:
    """Train (or reuse) every method × seed student of notebook 05 as jobs and write
    their records (see the module's docstring); the table of jobs. Methods that train
    no student of their own (``METHOD_SPECS[m].last_layer_of``: DFR) run in a second
    phase, once the students whose last layer they retrain are done."""
    trained = {m: c for m, c in configs.items() if not METHOD_SPECS[m].last_layer_of}
    refits = {m: c for m, c in configs.items() if METHOD_SPECS[m].last_layer_of}
    teacher = _teacher(run, configs.values(), teacher)   # read once for both phases
    jobs, by_name = _student_jobs(plan_grid(run, trained, teacher, seeds))
    with _locked(run):
        table = run_jobs(run, jobs, by_name, opts, "grid", show)
        if refits:
            jobs, by_name = last_layer_jobs(run, refits, teacher, seeds)
            table = pd.concat([table, run_jobs(run, jobs, by_name, opts, "grid-last-layer", show)],
                              ignore_index=True)
        return table


def last_layer_jobs(run: Run, configs: dict, teacher=None, seeds=None) -> tuple[list, dict]:
    """One job per seed of each method that retrains another method's last layer (DFR:
    kd's), and the plans :func:`run_jobs` reads, keyed by job name. A job's plan is
    the base student's (its checkpoint, reused here, never trained again once the grid
    has run); its fingerprint joins the base student's with the method's own
    configuration, so changing either reruns it."""
    bases = {m: students.base_config(run, c) for m, c in configs.items()}
    return _student_jobs(plan_grid(run, bases, teacher, seeds), refits=itertools.cycle(configs.values()))


def run_sweep(run: Run, seeds, teacher=None, methods=None, opts: Options | None = None,
              show: bool = True):
    """``sweep.sweep`` with each round's students (kd's lam x T grid, then each swept
    method's beta grid) run as jobs; returns (table, chosen) like ``sweep.sweep``."""
    opts = opts or options(**run.jobs)   # the runner's --executor, through the run's configuration
    teacher = teacher or load_teacher_logits(run)
    shared = teacher_for_students(run) if run.profile.augment else teacher

    def evaluate(method, pairs):
        plans = [students.plan_student(run, cfg, seed, shared if cfg.lam > 0 else None,
                                    ckpt_dir=run.path("sweep", "checkpoints"), progress=False)
                 for cfg, seed in pairs]
        jobs, by_name = _student_jobs(plans, "sweep")
        run_jobs(run, jobs, by_name, opts, f"sweep-{method}", show)
        return [records.read_table(j.row).iloc[0].to_dict() for j in jobs]

    with _locked(run):
        return sweep.sweep(run, seeds, teacher, methods, evaluate=evaluate)
