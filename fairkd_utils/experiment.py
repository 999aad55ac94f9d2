"""The study's steps as named functions, shared by the notebooks: set up a run,
load its data, and (later sections) train or reuse teacher and students and
record what they predict.

Notebooks stay short and narrate; everything two notebooks need lives here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import records
from .profiles import Profile, get_profile

REPO_ROOT = Path(__file__).resolve().parents[1]


def configure_threads(n: int | None = None) -> int:
    """Use the cores this process may run on (``os.sched_getaffinity``), or ``n``."""
    import torch

    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


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
    _splits: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.profile.name}"

    def splits(self) -> dict:
        """train/val/test datasets for this run (built once per process)."""
        if self._splits is None:
            from . import data

            p = self.profile
            self._splits = data.load_splits(self.dataset, self.data_root, image_size=p.image_size,
                                            scale=p.data_scale, seed=0, augment=p.augment)
        return self._splits

    def path(self, *parts) -> Path:
        return self.run_dir.joinpath(*parts)

    def figure(self, slug: str) -> Path:
        return self.figures_dir / slug

    def keys(self, **extra) -> dict:
        return {"dataset": self.dataset, "profile": self.profile.name, **extra}


def setup(run_dir=None, figures_dir=None, profile: str = "smoke", dataset: str = "synthetic",
          data_root=None, seeds=None, device: str = "auto") -> Run:
    """Resolve a notebook's parameters into a :class:`Run` (creating its folders)."""
    from .pipeline import DATASETS, resolve_device

    prof = get_profile(profile)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    run_dir = Path(run_dir) if run_dir else REPO_ROOT / "results" / f"{dataset}-{profile}"
    figures_dir = Path(figures_dir) if figures_dir else REPO_ROOT / "figures" / f"{dataset}-{profile}"
    run_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    if device == "cpu":
        configure_threads()
    return Run(run_dir=run_dir, figures_dir=figures_dir, profile=prof, dataset=dataset,
               data_root=data_root, seeds=list(seeds) if seeds else list(prof.seeds), device=device)


def require(run: Run, relpath: str, notebook: str) -> Path:
    """A prerequisite file of the run, or a clear stop naming the notebook to run."""
    return records.require(run.path(relpath), notebook)
