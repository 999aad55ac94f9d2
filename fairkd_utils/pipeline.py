"""Run the study's numbered notebooks in order through papermill.

    python -m fairkd_utils.pipeline --profile smoke
    python -m fairkd_utils.pipeline --dataset waterbirds --data-root /data/waterbird_complete95_forest2water2 --profile paper --device cuda

Each notebook receives the same parameters (absolute paths, profile, dataset,
seeds, device); notebooks share nothing but the files of the run directory
``<out>/<dataset>-<profile>/``. Figures go to ``<run_dir>/figures/`` unless
``--figures`` says otherwise (with the default ``--out results/``: the repository's
``figures/<dataset>-<profile>/``). ``--methods extended`` adds JTT, DFR and the
final-head DeDiER ablation to the profile's methods (notebook 05 receives it as its
``methods`` parameter) in a run directory of its own, ``<dataset>-<profile>-extended``;
``--methods laplace`` likewise adds the Laplace-KD variants (``profiles.LAPLACE_METHODS``)
in ``<dataset>-<profile>-laplace``; such a run starts from the plain run's checkpoint
files, where they exist (:func:`share_base_checkpoints`), so only the set's own methods train.
Before any kernel starts, the runner checks (``runner_checks``) the
folders, the seeds and the files the selected notebooks read from earlier ones. A
failing cell stops the run with a non-zero exit naming the notebook and the cell;
the failed notebook is kept as ``executed/NN_name.failed.ipynb`` beside the last good
one. Training progress (one line per epoch, and "reused checkpoint <file>" for each
checkpoint reused) is appended to ``<run_dir>/run.log`` and echoed to the terminal
unless ``--quiet``. Checkpoints are reused when their fingerprint (config, data and the
library's source) matches; ``--retrain [PREFIX ...]`` retrains them all, or those whose
name starts with a prefix (``teacher``, ``warmup``, ``student-kd``, ...), once per run.
``--executor local|slurm`` runs notebook 05's method x seed students and the sweep as
jobs (``fairkd_utils.jobs``: worker processes, or a SLURM job array through submitit).
One runner at a time per run directory (``<run_dir>/runner.lock``): a second one stops
at once, naming the first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from unittest import mock

from . import records, runner_checks
from .profiles import (BUILT_IN_DATASETS, DATASETS, DEVICES, METHOD_SETS, PROFILES, apply_overrides,
                       get_profile, parse_overrides, resolve_device, resolve_methods)
from .rundir import JOBS_ENV, REPO_ROOT, run_name

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")
#: Packages whose versions go into manifest.json.
MANIFEST_PACKAGES = ("torch", "torchvision", "laplace-torch", "numpy", "pandas",
                     "matplotlib", "seaborn", "papermill", "jupytext")


class PipelineError(RuntimeError):
    """A notebook failed; the message names the notebook and the cell."""


class Interrupted(RuntimeError):
    """Ctrl-C: the message names what was interrupted."""


def discover_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered percent notebooks ``NN_name.py`` in order."""
    found = sorted(p for p in Path(folder).glob("*.py") if NOTEBOOK_PATTERN.match(p.name))
    if not found:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.py) in {folder}")
    return found


def select_notebooks(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    known = {p.name[:2] for p in notebooks}
    bad = [n for n in only if not re.fullmatch(r"\d{1,2}", n)]
    if bad:
        raise ValueError(f"--only {' '.join(bad)}: expected notebook numbers such as 04 or 4; "
                         f"known: {' '.join(sorted(known))}")
    wanted = {f"{int(n):02d}" for n in only}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such notebook; known: {sorted(known)}")
    return [p for p in notebooks if p.name[:2] in wanted]


def notebook_parameters(args, run_dir: Path, figures_dir: Path, device: str) -> dict:
    """The parameters every notebook's ``parameters`` cell defines (JSON-like values only)."""
    overrides = parse_overrides(args.set)
    profile = apply_overrides(get_profile(args.profile, args.dataset), overrides)
    seeds = list(args.seeds) if args.seeds else list(profile.seeds)
    return {
        "run_dir": str(run_dir),
        "figures_dir": str(figures_dir),
        "profile": args.profile,
        "dataset": args.dataset,
        "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
        "seeds": seeds,
        "device": device,
        "profile_overrides": overrides or None,
        "teacher_model": _local_path(args.teacher_model),
        "student_model": _local_path(args.student_model),
    }


def _local_path(path) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def run_folders(args) -> tuple[Path, Path]:
    """The run directory and the figures folder: ``<run_dir>/figures/`` unless
    ``--figures`` is given or ``--out`` is the default ``results/`` (then the
    repository's ``figures/<dataset>-<profile>/``, with the run's suffixes). The run
    directory's name is :func:`rundir.run_name`'s, so that a ``--methods`` or ``--set``
    run never mixes its tables with the plain profile's."""
    name = run_name(args.dataset, args.profile, args.methods, parse_overrides(args.set))
    run_dir = (Path(args.out) / name).resolve()
    if args.figures:
        return run_dir, Path(args.figures).resolve()
    if runner_checks._default_out(args):
        return run_dir, (REPO_ROOT / "figures" / name).resolve()
    return run_dir, run_dir / "figures"


def jobs_environment(args) -> dict:
    """Where notebook 05's jobs run — ``--executor``, ``--workers``, ``--threads`` and
    ``--slurm-*``, checked (by ``jobs.options``) before any kernel starts — as the
    kernels' :data:`rundir.JOBS_ENV` (the run's configuration, never a notebook
    parameter); {} for the default (inline)."""
    from . import jobs

    if args.workers is not None and args.executor == "inline":
        raise ValueError("--workers applies to --executor local or slurm (inline runs one job at a time)")
    opts = jobs.options(args.executor, args.workers, args.threads,
                        {k: getattr(args, f"slurm_{k}") for k in jobs.SLURM_KEYS})
    out = {"executor": opts.executor, "workers": opts.workers, "threads": opts.threads, "slurm": opts.slurm}
    out = {k: v for k, v in out.items() if v is not None and (k, v) != ("executor", "inline")}
    return {JOBS_ENV: json.dumps(out, sort_keys=True)} if out else {}


def optional_parameters(args) -> dict:
    """Parameters only the notebooks that declare them receive (notebook 05): the sweep
    switch, a hyper-parameter file and a named method set other than the profile's."""
    optional = {"methods": args.methods} if args.methods != "default" else {}
    if args.sweep:
        optional["sweep"] = True
    if args.hparams:
        path = Path(args.hparams).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--hparams {args.hparams}: no such file (a sweep writes "
                                    "<run_dir>/sweep/hparams.json)")
        optional["hparams_file"] = str(path)
    return optional


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in MANIFEST_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def declared_parameters(nb) -> set[str]:
    """Names assigned in a notebook's cell tagged ``parameters``."""
    import ast

    return {target.id for cell in nb.cells if "parameters" in cell.get("metadata", {}).get("tags", [])
            for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def run_notebook(src: Path, out_path: Path, parameters: dict, cwd: Path, progress: bool = True,
                 optional: dict | None = None):
    """Execute one percent notebook with papermill into ``out_path``; raise PipelineError
    naming the cell, keeping the failed notebook as ``NN_name.failed.ipynb`` and an earlier
    good ``out_path``. ``optional`` parameters go only to notebooks whose parameters cell
    defines them."""
    import jupytext
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb = jupytext.read(src)
    if optional:
        declared = declared_parameters(nb)
        parameters = {**parameters, **{k: v for k, v in optional.items() if k in declared}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    running, failed = (out_path.with_name(f"{Path(out_path).stem}.{s}.ipynb") for s in ("running", "failed"))
    try:  # the kernel's own log level ERROR hides its "running over TCP without encryption"
        pm.execute_notebook(nb, str(running), parameters=parameters, kernel_name="python3",
                            language="python", cwd=str(cwd), progress_bar=progress,
                            log_output=False, extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except Exception as err:  # a cell raised, or the kernel died (e.g. out of memory) or a cell timed out
        if isinstance(err, PapermillExecutionError):
            what = (f"cell {err.cell_index} (execution count {err.exec_count}): {err.ename}: "
                    f"{err.evalue}\nthe executed notebook with the traceback")
        else:
            what = f"cell {_running_cell(running)}: {type(err).__name__}: {err}\nthe partly executed notebook"
        if running.exists():
            os.replace(running, failed)
        raise PipelineError(f"notebook {src.name} failed in {what} is {failed}") from None
    clean_executed(running)
    os.replace(running, out_path)
    failed.unlink(missing_ok=True)


def clean_executed(path: Path) -> None:
    """Drop the progress-bar redraws (stderr stream outputs that carry a carriage
    return, or hold only the newline a closing bar leaves) from an executed notebook,
    so that it reads as results; the bars are for a person watching the run, and the
    run's log keeps one line per epoch."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (
                o.get("output_type") == "stream" and o.get("name") == "stderr"
                and ("\r" in o.get("text", "") or not o.get("text", "").strip()))]
    records.write_text(path, nbformat.writes(nb))


#: What ``--reference`` copies from a finished run into ``results/reference/<run>/``.
REFERENCE_FILES = ("summary.csv", "manifest.json", "sweep/sweep.csv")


def write_reference(run_dir: Path, notebooks: list[Path],
                    reference_root: Path = REPO_ROOT / "results" / "reference",
                    root: Path = REPO_ROOT) -> Path:
    """Make the finished run ``run_dir`` its configuration's committed reference:
    copy :data:`REFERENCE_FILES` (those present) and the executed notebooks of
    ``notebooks`` into ``<reference_root>/<run name>/`` (``executed/NN_name.ipynb``),
    each written atomically. Files of the reference this run does not make are
    left as they are (e.g. a calibration table made by its bench).

    The copies name paths relative to the repository: the runner passes the notebooks
    absolute paths (``run_dir = "/home/you/fairkd/results/..."``), and a committed
    reference should read the same on every clone, so a quoted string that starts with
    ``<root>/`` loses that prefix (``run_dir = "results/synthetic-default"``). Only the
    start of a quoted string is rewritten: the same characters inside an image's base64
    data are left alone."""
    ref = Path(reference_root) / Path(run_dir).name
    prefix = re.compile(rb'(?<=["\'])' + re.escape(f"{Path(root)}/".encode()))

    def copy(src: Path, dst: Path) -> None:
        records.write_bytes(dst, prefix.sub(b"", src.read_bytes()))

    for rel in REFERENCE_FILES:
        if (src := Path(run_dir) / rel).exists():
            copy(src, ref / Path(rel).name)
    for nb in notebooks:
        copy(Path(run_dir) / "executed" / f"{nb.stem}.ipynb", ref / "executed" / f"{nb.stem}.ipynb")
    return ref


def _running_cell(out_path: Path) -> str:
    """Index of the cell papermill marked as running when execution broke off."""
    import nbformat

    try:
        cells = nbformat.read(str(out_path), as_version=4).cells
    except Exception:
        return "?"
    return next((str(i) for i, cell in enumerate(cells)
                 if cell.get("metadata", {}).get("papermill", {}).get("status") == "running"), "?")


def load_manifest(path: Path) -> dict:
    """An earlier run's manifest.json ({} if none), its entries left "running" (the
    runner was killed) marked "interrupted"."""
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); move it away to start a new one") from None
    for entry in manifest.get("notebooks", {}).values():
        if entry.get("status") == "running":
            entry["status"] = "interrupted"
    return manifest


def _tail(path: Path, pos: int, stop: threading.Event) -> None:
    """Print the complete lines appended to ``path`` after byte ``pos`` until ``stop``."""
    while True:
        done = stop.wait(0.5)
        if path.exists():
            with open(path, "rb") as fh:
                start = pos if os.fstat(fh.fileno()).st_size >= pos else 0  # truncated: from the top
                fh.seek(start)
                data = fh.read()
            data = data[:data.rfind(b"\n") + 1]
            pos = start + len(data)
            for line in data.decode("utf-8", "replace").splitlines():
                print(f"  {line}", flush=True)
        if done:
            return


@contextlib.contextmanager
def echo_log(path: Path, enabled: bool = True):
    """While the block runs, print the lines appended to ``path`` (a background thread)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    start = path.stat().st_size if path.exists() else 0
    thread = threading.Thread(target=_tail, args=(path, start, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run(args) -> Path:
    # fails early on an unknown profile or a bad --set
    profile = apply_overrides(get_profile(args.profile, args.dataset), parse_overrides(args.set))
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; choose one of {DATASETS}")
    if args.dataset not in BUILT_IN_DATASETS and not args.data_root:
        raise ValueError(f"--dataset {args.dataset} reads a local folder: pass --data-root PATH "
                         "(see README, 'Your own data')")
    for role, arch in (("teacher", profile.teacher_arch), ("student", profile.student_arch)):
        path = getattr(args, f"{role}_model")
        if arch == "hf" and not path:
            raise ValueError(f"--profile {args.profile} on {args.dataset} loads the {role} from a "
                             f"local Hugging Face folder: pass --{role}-model DIR (nothing is "
                             "downloaded; see README, 'MultiNLI with BERT')")
        if path and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"--{role}-model {path}: no such file or folder")
    if args.dataset in ("synthetic_text", "multinli"):  # both model folders, before any kernel
        from .text_models import check_model_folders
        check_model_folders(profile, args.dataset, args.teacher_model, args.student_model)
    seeds = runner_checks.check_seeds(args.seeds or profile.seeds)
    if (args.sweep or profile.sweep) and len(seeds) < 2:
        raise ValueError(f"the sweep averages over at least two seeds, got {seeds}: give "
                         "--seeds with two or more, or leave --sweep out")
    runner_checks.check_hparams_file(args, profile)
    if args.reference and not runner_checks._default_out(args):
        raise ValueError("--reference writes the committed reference of a run in results/: "
                         "leave out --out")
    retrain = runner_checks.check_retrain(args.retrain)
    known = discover_notebooks(NOTEBOOKS_DIR)
    notebooks = select_notebooks(known, args.only)
    run_dir, figures_dir = run_folders(args)
    for flag, path in (("--out", Path(args.out).resolve()), ("--out", run_dir), ("--figures", figures_dir)):
        runner_checks.check_folder(path, flag)
    runner_checks.check_prerequisites(args, run_dir, notebooks, known, seeds,
                                      resolve_methods(profile, args.methods))
    optional = optional_parameters(args)
    jobs_env = jobs_environment(args)   # --executor and its options, checked before any kernel starts
    if args.executor == "slurm":   # what reaches the sbatch script
        from . import executors

        executors.refuse_control_characters({"--slurm-partition": args.slurm_partition or "",
                                             "the run directory": run_dir})
    device = resolve_device(args.device)
    params = notebook_parameters(args, run_dir, figures_dir, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    with records.exclusive(run_dir / RUN_LOCK, f"run directory {run_dir}",
                           hint="give this run another --out"):
        return _run_locked(args, profile, seeds, retrain, notebooks, run_dir, figures_dir,
                           optional, jobs_env, device, params)


#: While a runner works in a run directory it holds this file's lock: a second runner
#: into the same directory stops at once, naming the first.
RUN_LOCK = "runner.lock"


def share_base_checkpoints(args, run_dir: Path) -> tuple[int, Path]:
    """A named method set's run (``--methods extended|laplace``) starts from the plain
    run's checkpoints: every checkpoint file of ``<out>/<dataset>-<profile>[-set-...]/``
    that this run directory lacks is hard-linked into it (copied where links fail).
    Checkpoint names carry their fingerprint, so only a model trained with the same
    config, data and code is reused (the teacher, the ERM students, the warm-ups and the
    shared methods' students); the set's own methods train. Saves are atomic renames,
    so a retrain here never touches the plain run's file. Not with ``--retrain``.
    Returns the number of files shared and the plain run's folder."""
    base = run_dir.parent / run_name(args.dataset, args.profile, None, parse_overrides(args.set))
    if not args.methods or args.retrain is not None or not (base / "checkpoints").is_dir():
        return 0, base
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    shared = 0
    for src in sorted((base / "checkpoints").glob("*.pt")):
        if not (dst := run_dir / "checkpoints" / src.name).exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            shared += 1
    return shared, base


def _run_locked(args, profile, seeds, retrain, notebooks, run_dir, figures_dir, optional,
                jobs_env, device, params) -> Path:
    manifest_path, log_path = run_dir / "manifest.json", run_dir / "run.log"
    earlier = load_manifest(manifest_path)
    figures_dir.mkdir(parents=True, exist_ok=True)
    shared, base = share_base_checkpoints(args, run_dir)

    argv = getattr(args, "argv", None)
    command = " ".join([Path(sys.executable).name, "-m", "fairkd_utils.pipeline",
                        *(sys.argv[1:] if argv is None else argv)])
    this_run = {
        "git_sha": _git_sha(),
        "versions": _versions(),
        "command": command,
        "config": {"profile": profile.to_dict(), "parameters": {**params, **optional},
                   "jobs": jobs_env},
        "device": device,
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the top level describes the last whole run; an --only run changes only its notebooks' entries
    manifest = {**(earlier if args.only and earlier else this_run), "notebooks": earlier.get("notebooks", {})}

    def say(message: str) -> None:
        print(f"[fairkd] {message}", flush=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} [fairkd] {message}\n")

    if shared:
        say(f"{shared} checkpoint files of the plain run {run_dir.parent.name}/{base.name} shared "
            "(reused where their fingerprint matches)")
    total = time.perf_counter()
    kernel_env = {**runner_checks.retrain_environment(retrain), **jobs_env}
    if retrain is not None:
        which = " ".join(f"{p}*" for p in retrain) if retrain else "every checkpoint"
        say(f"--retrain: retraining {which} (once in this run)")
    for src in notebooks:
        say(f"{src.stem}  ({args.dataset}, {args.profile}, seeds={seeds}, device={device})")
        t0 = time.perf_counter()
        entry = {"status": "running", "command": command, "seeds": seeds, "device": device,
                 "git_sha": this_run["git_sha"], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest["notebooks"][src.stem] = entry
        records.write_json(manifest_path, manifest)
        hparams_before = runner_checks.read_hparams_used(run_dir)
        # the kernels inherit os.environ: it holds kernel_env while the notebook runs
        try:
            with echo_log(log_path, enabled=not args.quiet), mock.patch.dict(os.environ, kernel_env):
                run_notebook(src, run_dir / "executed" / f"{src.stem}.ipynb", params, cwd=run_dir,
                             progress=not args.quiet, optional=optional)
        except (PipelineError, KeyboardInterrupt) as err:
            entry.update(status="failed" if isinstance(err, PipelineError) else "interrupted",
                         seconds=round(time.perf_counter() - t0, 2))
            records.write_json(manifest_path, manifest)
            if isinstance(err, KeyboardInterrupt):
                raise Interrupted(f"interrupted during {src.stem}: rerun the same command to "
                                  "resume (finished checkpoints and jobs are reused)") from None
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 2))
        say(f"{src.stem} done in {entry['seconds']:.1f} s")
        if change := runner_checks.hparams_change(hparams_before, runner_checks.read_hparams_used(run_dir)):
            say(change)
    if not args.only:
        manifest["total_seconds"] = round(time.perf_counter() - total, 2)
    manifest["training"] = training_times(run_dir)
    records.write_json(manifest_path, manifest)
    if args.reference:
        say(f"reference written: {write_reference(run_dir, notebooks)}")
    say(f"all done in {time.perf_counter() - total:.1f} s -> {run_dir} (figures: {figures_dir}, "
        f"log: {log_path})")
    return run_dir


def training_times(run_dir: Path) -> dict:
    """Per training stage (teacher, student, sweep), from the run's timing records
    (assembled, checked, into ``timings.csv``): seconds spent training the models of
    this run directory, how many were trained, and how many were only ever reused."""
    t = records.assemble(run_dir, "timings")
    if t.empty:
        return {}
    return {stage: {"seconds_trained": round(float(d.seconds[~d.reused].sum()), 1),
                    "models_trained": int((~d.reused).sum()), "models_reused": int(d.reused.sum())}
            for stage, d in t.groupby("stage")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairkd_utils.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="models and budgets (default: %(default)s)")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="the data (default: %(default)s, built in)")
    p.add_argument("--data-root", help="local folder of a real dataset")
    p.add_argument("--teacher-model", metavar="PATH",
                   help="local pretrained teacher: a torchvision state_dict file (images) or a "
                        "Hugging Face model folder (text; its tokenizer tokenises MultiNLI)")
    p.add_argument("--student-model", metavar="PATH",
                   help="local pretrained student backbone: a state_dict file or a Hugging Face model folder")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: the profile's)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", default=str(REPO_ROOT / "results"),
                   help="parent of the run directory (default: results/)")
    p.add_argument("--figures", help="figures folder (default: <run_dir>/figures/; with the default --out, "
                                     "figures/<dataset>-<profile>/)")
    p.add_argument("--only", nargs="+", metavar="NN",
                   help="run only these notebooks, e.g. --only 04 05 (their prerequisites must exist)")
    p.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                   help="override profile fields, e.g. --set student_epochs=5 seeds=[0,1]; the run "
                        "goes to its own run directory <dataset>-<profile>-set-<hash>")
    p.add_argument("--methods", default="default", choices=METHOD_SETS,
                   help="the methods compared: the profile's (default); 'extended', which adds "
                        "JTT, DFR and DeDiER read from the final head; or 'laplace', which adds the "
                        "Laplace-KD variants (entropy, variance, Meronen's exit Laplace, a subset "
                        "posterior). Such a run goes to its own run directory "
                        "<dataset>-<profile>-extended or -laplace")
    p.add_argument("--sweep", action="store_true",
                   help="rerun the hyper-parameter sweep on validation worst-group accuracy "
                        "(notebook 05; writes sweep/hparams.json and uses it)")
    p.add_argument("--hparams", metavar="FILE",
                   help="chosen hyper-parameters (default: fairkd_utils/hparams.json's entry "
                        "for <dataset>-<profile>)")
    p.add_argument("--reference", action="store_true",
                   help="when the run succeeds, copy its summary, manifest, sweep table and the "
                        "executed notebooks it ran into results/reference/<run>/ (how the "
                        "committed references are made; with --only, just those notebooks' "
                        "copies are renewed; needs the default --out)")
    p.add_argument("--retrain", nargs="*", metavar="PREFIX",
                   help="retrain checkpoints instead of reusing them: all of them, or those whose "
                        "name starts with a PREFIX (teacher, warmup, student-kd, ...)")
    jobs = p.add_argument_group(
        "jobs", "where notebook 05's method x seed students and the sweep train (the teacher and "
        "notebook 03's ERM students always train inline). A job whose records exist with the "
        "same fingerprint is skipped, so rerunning finishes only what is missing")
    jobs.add_argument("--executor", default="inline", choices=("inline", "local", "slurm"),
                      help="inline: one after another in the notebook (default); local: worker "
                           "processes on this machine; slurm: a SLURM job array (submitit)")
    jobs.add_argument("--workers", type=int, metavar="N",
                      help="local: jobs at once (default: one per GPU, or one per core on CPU); "
                           "slurm: array tasks running at once (default: no limit)")
    jobs.add_argument("--threads", type=int, metavar="N",
                      help="torch threads per job (default: all cores inline, cores // workers "
                           "locally, --slurm-cpus on SLURM)")
    jobs.add_argument("--slurm-partition", metavar="NAME")
    jobs.add_argument("--slurm-time", metavar="TIME",
                      help="time limit per job, as sbatch --time: minutes or H:M:S, D-H:M:S "
                           "(default: 4:00:00)")
    jobs.add_argument("--slurm-gpus", type=int, metavar="N",
                      help="GPUs per job (default 0: CPU jobs); >0 trains on cuda")
    jobs.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per job")
    p.add_argument("--quiet", action="store_true",
                   help="no per-cell progress bar and no training lines (they still go to run.log)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)  # the command line, for manifest.json
    try:
        run(args)
    except (PipelineError, ValueError, FileNotFoundError, records.Locked, records.LockFailed) as err:
        print(f"[fairkd] error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"[fairkd] {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("[fairkd] interrupted before any notebook started: nothing was changed; rerun "
              "the same command", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
