"""fairkd_utils: the thin library under the fairkd notebooks.

One concept per module (README, "Where each formula lives"):

- ``profiles``: the vocabulary — datasets, methods and what each one weights
  (``METHOD_SPECS``), devices, scores — and the run profiles;
- ``data``: the datasets and their groups; ``models``: teacher and early-exit student;
- text: ``multinli`` (the text conventions, the negation groups, the MultiNLI reader),
  ``synthetic_text`` (the built-in miniature), ``text_models`` (BERT teachers and
  early-exit students, local Hugging Face folders);
- ``losses``: the student loss, every method's instance weight, the objectives;
  ``laplace_source``: Laplace-KD's stateful weight (factors from the batches, refits,
  the diagnostics of laplace_effect.csv);
- ``last_layer``: DFR — a student's last layer refit on balanced validation halves;
- ``exit_laplace``: the last-layer Laplace approximation at the early exit;
  ``kron_factors``: its Kronecker factors A and B, accumulated batch by batch;
- ``train``: the one training loop; ``checkpoints``: fingerprints and checkpoint files;
- ``metrics``: group metrics and the statistics over seeds;
- ``rundir``: a run's directory and set-up; ``build``: the run's teacher and student
  models and corpora; ``teacher``: the teacher trained and its logits; ``hparams``: the
  chosen hyper-parameters; ``students``: one student's plan, training and records;
  ``sweep``: choosing the hyper-parameters on validation;
- ``records``: tidy record files and atomic writes; ``plots``: the figures;
  ``palette``: their colours, labels, markers and style, one palette per concept;
- ``jobs``: notebook 05's students and sweep as jobs (inline, local processes, SLURM);
- ``pipeline``: the command line that runs the notebooks
  (``python -m fairkd_utils.pipeline``; not imported here, so that ``-m`` runs it
  as a fresh module).

Notebooks ``import fairkd_utils as fk`` and call small named functions.
"""

import warnings

# Libraries the text study imports (transformers, laplace-torch) reach for tqdm.auto, which
# in a notebook kernel without ipywidgets warns once and falls back to the text bars this
# package uses anyway: the warning says nothing to a reader of the executed notebooks.
warnings.filterwarnings("ignore", message="IProgress not found")

from . import (build, checkpoints, data, exit_laplace, hparams, jobs, laplace_regime, last_layer, losses,
               metrics, models, multinli, plots, profiles, records, rundir, students, sweep,
               synthetic_text, teacher, text_models, train)

__version__ = "0.1.0"
__all__ = ["build", "checkpoints", "data", "exit_laplace", "hparams", "jobs", "laplace_regime",
           "last_layer", "losses", "metrics", "models", "multinli", "plots", "profiles", "records",
           "rundir", "students", "sweep", "synthetic_text", "teacher", "text_models", "train"]
