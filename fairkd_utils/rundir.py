"""A run: its directory, its profile and device, and the set-up every notebook and
the runner share (folders, the ``run.log`` logger, CPU threads).

A run directory ``results/<dataset>-<profile>/`` holds everything a run writes;
notebooks share nothing but its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import records
from .checkpoints import code_fingerprint
from .profiles import (BUILT_IN_DATASETS, DATASETS, Profile, apply_overrides, get_profile,
                       method_set_tag, overrides_tag, resolve_device, synthetic_text_knobs)

#: Set by the runner for its kernels: where notebook 05's jobs run, as JSON
#: (``jobs.options``' arguments: executor, workers, threads, slurm). Unset: inline.
JOBS_ENV = "FAIRKD_JOBS"
#: The repository (default ``results/`` and ``figures/`` live here).
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_name(dataset: str, profile: str, methods=None, overrides=None) -> str:
    """A run directory's name: ``<dataset>-<profile>``, with ``-extended`` (or
    ``-laplace``) for a named method set and ``-set-<hash>`` for profile overrides, so
    that such a run never mixes its tables with the plain profile's."""
    return f"{dataset}-{profile}{method_set_tag(methods)}{overrides_tag(overrides)}"


@dataclass
class Run:
    """Where a run's files go and how it was configured (the parameters cell, resolved)."""
    run_dir: Path
    figures_dir: Path
    profile: Profile
    dataset: str
    data_root: str | None
    seeds: list[int]
    device: str
    hparams_file: str | None = None
    sweep: bool = False        # the hyper-parameters come from this run's own sweep (notebook 05)
    #: where notebook 05's jobs run (``jobs.options``' arguments), from the runner's
    #: ``--executor`` through :data:`JOBS_ENV`; {} runs them inline, one after another
    jobs: dict = field(default_factory=dict)
    teacher_model: str | None = None   # local weights file (images) or Hugging Face folder (text)
    student_model: str | None = None
    _splits: dict | None = field(default=None, repr=False)
    _student_encoder: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.profile.name}"

    def splits(self) -> dict:
        """train/val/test datasets for this run (built once per process): the built-in
        datasets at the profile's ``data_scale``, a local folder whole. MultiNLI is
        tokenised with the teacher model folder's tokenizer."""
        if self._splits is None:
            from . import data, multinli, synthetic_text, text_models

            p = self.profile
            scale = p.data_scale if self.dataset in BUILT_IN_DATASETS else 1.0
            if self.dataset == "synthetic_text":
                self._splits = synthetic_text.make_synthetic_text(scale=scale, seed=0,
                                                                  **synthetic_text_knobs(p))
            elif self.dataset == "multinli":
                if not self.teacher_model:
                    raise ValueError("--dataset multinli is tokenised with the teacher's "
                                     "tokenizer: pass --teacher-model DIR (a local Hugging Face "
                                     "model folder)")
                tokenizer = text_models.load_tokenizer(self.teacher_model)
                self._splits = multinli.read_multinli(self.data_root, tokenizer, max_length=p.max_length)
            else:
                self._splits = data.load_splits(self.dataset, self.data_root, image_size=p.image_size,
                                                scale=scale, seed=0, augment=p.augment)
        return self._splits

    def path(self, *parts) -> Path:
        return self.run_dir.joinpath(*parts)

    def require(self, relpath: str, notebook: str) -> Path:
        """A prerequisite file of the run, or a clear stop naming the notebook to run."""
        return records.require(self.path(relpath), notebook)

    def figure(self, slug: str) -> Path:
        return self.figures_dir / slug

    def keys(self, **extra) -> dict:
        return {"dataset": self.dataset, "profile": self.profile.name, **extra}

    def fingerprint_extra(self) -> dict:
        """What identifies this run's data and code in checkpoint fingerprints: the
        source of the library modules that produce checkpoints (:func:`code_fingerprint`)."""
        extra = self.keys(data_root=self.data_root, code=code_fingerprint(),
                          profile_fields=self.profile.to_dict())
        if self.teacher_model or self.student_model:  # absent for the built-in runs
            extra.update(teacher_model=self.teacher_model, student_model=self.student_model)
        return extra


def setup(run_dir=None, figures_dir=None, profile: str = "smoke", dataset: str = "synthetic",
          data_root=None, seeds=None, device: str = "auto", hparams_file=None,
          profile_overrides=None, teacher_model=None, student_model=None, methods=None,
          sweep=None) -> Run:
    """Resolve a notebook's parameters into a :class:`Run` (creating its folders), and
    append the ``fairkd`` logger's lines (training progress) to ``<run_dir>/run.log``.
    ``methods`` (a named method set such as ``"extended"``) only names the default run
    directory, as the runner does. ``sweep`` (None: the profile's setting): the run's
    hyper-parameters are those its own sweep writes, ``<run_dir>/sweep/hparams.json``
    (notebook 05 runs the sweep before it reads them); not with ``hparams_file``. Where
    notebook 05's jobs run comes from the runner (:data:`JOBS_ENV`)."""
    import logging

    prof = apply_overrides(get_profile(profile, dataset), profile_overrides)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    name = run_name(dataset, profile, methods, profile_overrides)
    run_dir = Path(run_dir) if run_dir else REPO_ROOT / "results" / name
    figures_dir = Path(figures_dir) if figures_dir else REPO_ROOT / "figures" / name
    for folder in (run_dir, figures_dir):
        folder.mkdir(parents=True, exist_ok=True)
    logger, log_file = logging.getLogger("fairkd"), str((run_dir / "run.log").resolve())
    for old in [h for h in logger.handlers if getattr(h, "fairkd_run_log", None) not in (None, log_file)]:
        logger.removeHandler(old)  # an earlier run of this process
        old.close()
    if not any(getattr(h, "fairkd_run_log", None) == log_file for h in logger.handlers):
        handler = logging.FileHandler(log_file, encoding="utf-8")  # appends
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.fairkd_run_log = log_file
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sweep = prof.sweep if sweep is None else bool(sweep)
    if sweep and hparams_file:
        raise ValueError("a sweep chooses the hyper-parameters itself: give either sweep or "
                         "hparams_file (--sweep or --hparams), not both")
    if sweep:
        hparams_file = run_dir / "sweep" / "hparams.json"
    device = resolve_device(device)
    if device == "cpu":   # use the cores this process may run on
        import torch

        from .jobs import cores
        torch.set_num_threads(cores())
    return Run(run_dir=run_dir, figures_dir=figures_dir, profile=prof, dataset=dataset,
               data_root=data_root, seeds=list(seeds) if seeds else list(prof.seeds), device=device,
               hparams_file=str(hparams_file) if hparams_file else None, sweep=sweep,
               jobs=json.loads(os.environ.get(JOBS_ENV) or "{}"),
               teacher_model=str(teacher_model) if teacher_model else None,
               student_model=str(student_model) if student_model else None)


def profile_note(run: Run) -> str | None:
    """A plain warning for a profile whose numbers mean nothing (``smoke``), else None."""
    if run.profile.name != "smoke":
        return None
    return ("NOTE: profile 'smoke' is a plumbing check (tiny data, 1-2 epochs): every number "
            "below is meaningless (students predict one class, intervals read 'nan'). For real "
            "results run `make reproduce` (the default profile), or read README, 'What the "
            "reference run shows', and results/reference/synthetic-default/summary.csv.")


def print_profile_note(run: Run) -> None:
    """Print :func:`profile_note` when there is one (each notebook, after setup)."""
    if note := profile_note(run):
        print(note)

