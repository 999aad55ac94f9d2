"""Where a set of jobs runs (``jobs.run_jobs`` picks one by ``--executor``): one after
another in the notebook's process (``inline``), local worker processes (``local``,
submitit's LocalExecutor, one GPU or a share of the cores per slot) or a SLURM job array
(``slurm``): the options' submitit parameters, the refusal of control characters that
would break the sbatch script, and a worker's tie to the process that started it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from . import jobs

logger = logging.getLogger("fairkd")

#: A local worker's environment: "<pid>:<start>" of the process that started it (the
#: notebook's kernel); the worker ends itself once that process is gone.
OWNER_ENV = "FAIRKD_JOBS_OWNER"


def _process_start(pid: int) -> str | None:
    """An id of the process ``pid`` that a later process with the same pid does not
    share (its start time, from ``/proc``), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:   # no /proc (not Linux): the pid alone
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    return None if fields[0] in ("Z", "X") else fields[19]


def owner() -> str:
    """This process as :data:`OWNER_ENV` names it."""
    return f"{os.getpid()}:{_process_start(os.getpid())}"


def _end_with_owner(value: str, every_s: float = 1.0) -> None:
    """In a local worker: a daemon thread that ends this process (``os._exit``) once the
    process that started it (:data:`OWNER_ENV`) is gone, so that a runner killed with
    ``kill -9`` (its kernel exits with it) leaves no worker training behind into the run
    directory. Its files are written atomically: nothing is left half-written."""
    import threading

    pid, _, start = value.partition(":")

    def watch():
        while _process_start(int(pid)) == start:
            time.sleep(every_s)
        print(f"[fairkd] the process that started this job (pid {pid}) is gone: stopping",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="fairkd-owner-watch", daemon=True).start()


def _tail(path, n: int = 8) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def _for_worker(job: jobs.Job, threads: int | None, local: bool = False) -> jobs.Job:
    """The job as it travels to a worker: its run without the data (nor the pretrained
    student encoder, which the worker reloads from its checkpoint), its threads; a
    ``local`` worker is told to end with this process (:data:`OWNER_ENV`)."""
    env = {**dict(job.env), OWNER_ENV: owner()} if local else dict(job.env)
    return dataclasses.replace(job, run=dataclasses.replace(job.run, _splits=None, _student_encoder=None),
                               threads=threads, env=tuple(sorted(env.items())))


def _result(sub) -> dict:
    """A finished submission's result: its stamp, or its failure with the last lines
    of its log (or of the error)."""
    try:
        out = sub.result()
    except Exception as err:  # the job raised, was killed or timed out
        last = (str(err).strip().splitlines() or [""])[-1]
        tail = _tail(sub.paths.stderr) or [f"{type(err).__name__}: {last}"]
        return {"status": "failed", "log": str(Path(sub.paths.stderr)), "error": tail}
    return {"status": "done", "log": str(sub.paths.stdout), **out}


class _Progress:
    """The bar of jobs done / total, and one line per finished job in run.log."""

    def __init__(self, total: int, label: str, show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{label} jobs", unit="job", disable=not show)

    def done(self, job: jobs.Job, res: dict, seconds: float) -> None:
        res["seconds"] = round(seconds, 2)
        if res["status"] == "done":
            logger.info("job %s done in %.1f s", job.name, seconds)
        elif res["status"] == "failed":
            logger.info("job %s FAILED after %.1f s (log: %s)", job.name, seconds, res.get("log"))
        else:
            logger.info("job %s not run (%s)", job.name, res.get("error", [""])[0])
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _blocked(job: jobs.Job, results: dict, progress: _Progress) -> bool:
    """Whether ``job``'s warm-up failed or was not run; if so, ``job`` is recorded as not run."""
    if not (job.after and results.get(job.after, {}).get("status") in ("failed", "not run")):
        return False
    results[job.name] = {"status": "not run", "error": [f"its warm-up {job.after} failed"]}
    progress.done(job, results[job.name], 0.0)
    return True


def _collect(running: dict, results: dict, progress: _Progress) -> list:
    """Record the jobs of ``running`` (name -> job, submission, start, slot) that have
    finished, and take them out; the slots they free."""
    freed = []
    for name, (job, sub, t0, slot) in list(running.items()):
        if sub.done():
            results[name] = _result(sub)
            progress.done(job, results[name], time.perf_counter() - t0)
            freed.append(slot)
            del running[name]
    return freed


def _run_inline(batch: list[jobs.Job], opts: jobs.Options, progress: _Progress, results: dict) -> None:
    """One after another in this process, on the run's device (a failure stops here
    with its traceback, as the notebook's loop did)."""
    for job in batch:
        t0 = time.perf_counter()
        results[job.name] = {"status": "done", **jobs.execute(
            dataclasses.replace(job, threads=opts.threads), job.run.device, worker=False)}
        progress.done(job, results[job.name], time.perf_counter() - t0)


def local_slots(workers: int | None, device: str) -> list[tuple[str, dict]]:
    """Per local worker slot: the device string its jobs get and the submitit
    parameters that go with it. On CUDA one GPU per slot (``CUDA_VISIBLE_DEVICES`` set to
    that GPU by submitit's ``visible_gpus``; slots beyond the GPUs share them in turn);
    on CPU no GPU is visible."""
    if str(device).startswith("cuda"):
        import torch

        n_gpus = torch.cuda.device_count()
        if n_gpus < 1:
            raise ValueError(f"device {device!r} but torch sees no GPU")
        return [("cuda", {"gpus_per_node": 1, "visible_gpus": (k % n_gpus,)})
                for k in range(workers or n_gpus)]
    return [("cpu", {"gpus_per_node": 0, "visible_gpus": ()}) for _ in range(workers or jobs.cores())]


def _run_local(batch: list[jobs.Job], opts: jobs.Options, folder: Path, device: str, progress: _Progress,
               results: dict, handles: dict) -> None:
    """At most ``workers`` jobs at once, each a process of its own (submitit's
    LocalExecutor); a student starts once its warm-up is done."""
    import submitit

    slots = local_slots(opts.workers, device)
    threads = opts.threads or max(1, jobs.cores() // len(slots))
    executor = (opts.executor_factory or submitit.LocalExecutor)(folder=folder)
    free, queue, running = list(range(len(slots))), list(batch), {}
    while queue or running:
        for job in list(queue):
            if _blocked(job, results, progress):
                queue.remove(job)
                continue
            if not free:
                break
            if job.after and results.get(job.after, {}).get("status") != "done":
                continue  # its warm-up is still running
            slot = free.pop(0)
            job_device, params = slots[slot]
            executor.update_parameters(timeout_min=jobs.LOCAL_TIMEOUT_MIN, **params)
            sub = executor.submit(jobs.execute, _for_worker(job, threads, local=True), job_device)
            handles[job.name] = sub
            running[job.name] = (job, sub, time.perf_counter(), slot)
            queue.remove(job)
        free += _collect(running, results, progress)
        if queue or running:
            time.sleep(opts.poll_s)


def slurm_parameters(opts: jobs.Options) -> dict:
    """``AutoExecutor.update_parameters`` arguments of ``--slurm-*`` and ``--workers``."""
    s = opts.slurm or {}
    params = {"name": "fairkd", "timeout_min": int(s.get("time", jobs.SLURM_TIMEOUT_MIN)),
              "gpus_per_node": int(s.get("gpus", 0)), "cpus_per_task": s.get("cpus"),
              "slurm_partition": s.get("partition"), "slurm_array_parallelism": opts.workers}
    return {k: v for k, v in params.items() if v is not None}


def refuse_control_characters(values: dict) -> None:
    """Stop if a value that reaches the sbatch script (``values``: its name in words ->
    the value) holds a control character: a newline would end its ``#SBATCH`` line and
    run the rest of the value as a command."""
    import unicodedata

    for what, value in values.items():
        bad = sorted({c for c in str(value) if unicodedata.category(c) == "Cc"})
        if bad:
            raise ValueError(f"{what} {str(value)!r} holds the control character(s) "
                             f"{', '.join(repr(c) for c in bad)}, which would break the sbatch "
                             "script (a newline ends its #SBATCH line and runs the rest as a "
                             "command); give it without them")


def slurm_executor(opts: jobs.Options, folder: Path):
    """A submitit executor for SLURM (``opts.executor_factory`` stands in for
    ``submitit.AutoExecutor`` in tests) with :func:`slurm_parameters` set; its files go
    to ``folder``."""
    import submitit

    params = slurm_parameters(opts)
    refuse_control_characters({
        **{f"--slurm-{k.removeprefix('slurm_')}": v for k, v in params.items() if isinstance(v, str)},
        "the job folder (in the run directory)": Path(folder).resolve(),
        "the Python executable": sys.executable})
    executor = (opts.executor_factory or submitit.AutoExecutor)(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    return executor


def submit_array(executor, batch: list[jobs.Job], opts: jobs.Options) -> list:
    """Submit the jobs ``batch`` as one job array (``map_array``); each task gets its device
    (``cuda`` with ``--slurm-gpus``, else ``cpu``) and threads (``--threads``, else
    ``--slurm-cpus``) as arguments."""
    s = opts.slurm or {}
    device = "cuda" if int(s.get("gpus", 0)) > 0 else "cpu"
    threads = opts.threads or s.get("cpus")
    return executor.map_array(jobs.execute, [_for_worker(j, threads) for j in batch], [device] * len(batch))


def _run_array(batch: list[jobs.Job], opts: jobs.Options, folder: Path, progress: _Progress, results: dict,
               handles: dict) -> None:
    """A SLURM job array per phase (the warm-ups, then the rest), each task on the GPUs
    and CPUs ``--slurm-*`` asks for."""
    executor = slurm_executor(opts, folder)
    for phase in ([j for j in batch if j.kind == "warmup"], [j for j in batch if j.kind != "warmup"]):
        todo = [job for job in phase if not _blocked(job, results, progress)]
        if not todo:
            continue
        subs = submit_array(executor, todo, opts)
        t0 = time.perf_counter()
        logger.info("submitted %d jobs as array %s (logs: %s)", len(subs),
                    str(subs[0].job_id).split("_")[0], folder)
        handles.update({j.name: sub for j, sub in zip(todo, subs)})
        waiting = {j.name: (j, sub, t0, None) for j, sub in zip(todo, subs)}
        while waiting:
            _collect(waiting, results, progress)
            if waiting:
                time.sleep(opts.poll_s)
