"""fairkd_utils: the thin library under the fairkd notebooks.

One concept per module (README, "Where each formula lives"):

- ``profiles``: the vocabulary — datasets, methods and what each one weights
  (``METHOD_SPECS``), devices, scores — and the run profiles;
- ``data``: the datasets and their groups; ``models``: teacher and early-exit student;
- text: ``multinli`` (the text conventions, the negation groups, the MultiNLI reader),
  ``synthetic_text`` (the built-in miniature), ``text_models`` (BERT teachers and
  early-exit students, local Hugging Face folders);
- ``losses``: the student loss, every method's instance weight, the objectives;
- ``last_layer``: DFR — a student's last layer refit on balanced validation halves;
- ``exit_laplace``: the last-layer Laplace approximation at the early exit;
- ``train``: the one training loop; ``checkpoints``: fingerprints and checkpoint files;
- ``metrics``: group metrics and the statistics over seeds;
- ``rundir``: a run's directory and set-up; ``study``: the steps the notebooks share;
- ``records``: tidy record files and atomic writes; ``plots``: the figures;
- ``jobs``: notebook 05's students and sweep as jobs (inline, local processes, SLURM);
- ``pipeline``: the command line that runs the notebooks
  (``python -m fairkd_utils.pipeline``; not imported here, so that ``-m`` runs it
  as a fresh module).

Notebooks ``import fairkd_utils as fk`` and call small named functions.
"""

from . import (checkpoints, data, exit_laplace, jobs, last_layer, losses, metrics, models, multinli,
               plots, profiles, records, rundir, study, synthetic_text, text_models, train)

__version__ = "0.1.0"
__all__ = ["checkpoints", "data", "exit_laplace", "jobs", "last_layer", "losses", "metrics",
           "models", "multinli", "plots", "profiles", "records", "rundir", "study", "synthetic_text",
           "text_models", "train"]
