"""The runner's checks before any kernel starts: the folders it writes, the seeds, the
files the selected notebooks read from earlier ones (with the command that makes them),
``--retrain``'s prefixes (and the variables that carry them to the kernels), the
hyper-parameter file notebook 05 will read, and in words how the hyper-parameters that
made a run's tables changed. ``pipeline`` runs them; each stops with what to do instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .profiles import TRAINED, missing_hparams, read_hparams_file, resolve_methods
from .rundir import REPO_ROOT

#: Seeds go to numpy and torch: 0 <= seed < SEED_LIMIT.
SEED_LIMIT = 2**31


#: What a notebook reads that an earlier one writes: (the reading notebooks, a glob
#: under the run directory, once per requested {seed} and profile {method}, the writer).
PREREQUISITES = (
    ("02 03 04 05 06", "groups.csv", "01"),
    ("05", "teacher_logits.pt", "02"),
    ("04 05", "records/metrics/student-erm-*-seed{seed}-map-test.csv", "03"),
    ("06", "summary.csv", "05"),
    ("06", "records/metrics/student-{method}-*-seed{seed}-map-test.csv", "05"),
)


#: The committed chosen hyper-parameters (``hparams.HPARAMS_FILE``), keyed by
#: ``<dataset>-<profile>``.
HPARAMS_FILE = Path(__file__).with_name("hparams.json")


#: What notebook 05 records of the hyper-parameters that made the run's tables
#: (``hparams.HPARAMS_USED``).
HPARAMS_USED = "hparams_used.json"


def check_seeds(seeds) -> list[int]:
    bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(f"--seeds {' '.join(map(str, bad))}: every seed must satisfy "
                         "0 <= seed < 2**31 (numpy and torch seeding)")
    return list(seeds)


def _default_out(args) -> bool:
    return Path(args.out).resolve() == (REPO_ROOT / "results").resolve()


def check_folder(path: Path, flag: str) -> None:
    """Stop unless ``path`` is, or can be made, a folder this process can write in."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; pass a folder "
                         "(it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {existing} (permission denied); "
                         "pass a folder you can write to")


def missing_prerequisites(run_dir: Path, selected: set[str], seeds, methods) -> list[tuple]:
    """(notebook, glob, writer) for each file a ``selected`` notebook reads that no
    selected notebook writes and ``run_dir`` lacks."""
    return [(nb, g, writer) for readers, pattern, writer in PREREQUISITES if writer not in selected
            for nb in sorted(set(readers.split()) & selected)
            for g in sorted({pattern.format(seed=s, method=m) for s in seeds for m in methods})
            if not any(Path(run_dir).glob(g))]


def check_prerequisites(args, run_dir: Path, notebooks: list[Path], known: list[Path], seeds,
                        methods) -> None:
    """Stop before any kernel starts if a selected notebook would miss an earlier
    notebook's output, naming the files and the ``--only`` that makes them."""
    selected = {p.name[:2] for p in notebooks}
    needed = set(selected)   # with the writers of what is missing, and theirs in turn
    while more := missing_prerequisites(run_dir, needed, seeds, methods):
        needed |= {writer for _, _, writer in more}
    if needed == selected:
        return
    names = {p.name[:2]: p.stem for p in known}
    by_pair = {}
    for nb, glob, writer in missing_prerequisites(run_dir, selected, seeds, methods):
        by_pair.setdefault((nb, writer), []).append(glob)
    lines = [f"{names.get(nb, nb)} reads {', '.join(g[:3])}" + (f" and {len(g) - 3} more" if g[3:] else "")
             + f" (written by {names.get(w, w)})" for (nb, w), g in by_pair.items()]
    raise FileNotFoundError(
        f"{run_dir} lacks what the selected notebooks read:\n  " + "\n  ".join(lines)
        + f"\nrun {', '.join(names.get(n, n) for n in sorted(needed - selected))} too: "
        + suggest_command(args, sorted(needed)))


def suggest_command(args, only: list[str]) -> str:
    """The command line of this run with ``--only`` replaced."""
    parts = ["python -m fairkd_utils.pipeline", "--profile", args.profile, "--dataset", args.dataset]
    for flag, value in (("--methods", None if args.methods == "default" else args.methods),
                        ("--data-root", args.data_root),
                        ("--teacher-model", args.teacher_model),
                        ("--student-model", args.student_model),
                        ("--figures", args.figures),
                        ("--device", None if args.device == "auto" else args.device),
                        ("--out", None if _default_out(args) else args.out)):
        parts += [flag, str(value)] if value else []
    parts += ["--only", *only] + (["--seeds", *map(str, args.seeds)] if args.seeds else [])
    return " ".join(parts)


#: Checkpoint names: teacher-pretrained, teacher, warmup-seed<N> (the shared warm-ups and
#: JTT's identification models), student-<method>-seed<N> (DFR has none of its own).
CHECKPOINT_STEMS = ("teacher-pretrained", "teacher", "warmup-seed",
                    *(f"student-{m}-seed" for m in TRAINED))


def check_retrain(prefixes) -> list[str] | None:
    """``--retrain``'s prefixes (``[]``: every checkpoint), each refused unless some
    checkpoint name can start with it."""
    if prefixes is None:
        return None
    for p in prefixes:
        ok = p and not any(c.isspace() for c in p) and any(
            stem.startswith(p) or (p.startswith(stem) and stem.endswith("-seed")
                                   and p[len(stem):].isdigit())
            for stem in CHECKPOINT_STEMS)
        if not ok:
            raise ValueError(f"--retrain {p!r}: no checkpoint name starts with it; names are "
                             "teacher-pretrained, teacher, warmup-seed<N> and "
                             f"student-<method>-seed<N> (methods: {', '.join(TRAINED)}); "
                             "--retrain alone retrains every checkpoint")
    return list(prefixes)


def retrain_environment(prefixes) -> dict:
    """The variables that tell the kernels which checkpoints to retrain
    (``FAIRKD_RETRAIN``, read by ``train.train_model``/``train_warmup``) with an id of
    this run (``FAIRKD_RETRAIN_RUN``), so each is retrained once, not by every notebook
    that loads it; ``{}`` without ``--retrain``."""
    if prefixes is None:
        return {}
    import uuid

    return {"FAIRKD_RETRAIN": " ".join(prefixes) or "*", "FAIRKD_RETRAIN_RUN": uuid.uuid4().hex}


def check_hparams_file(args, profile) -> None:
    """Before any kernel starts: the hyper-parameter file notebook 05 will read
    (``--hparams``, else the committed one) is well formed, has an entry for
    ``<dataset>-<profile>`` when given with ``--hparams``, and that entry holds every value
    the run's methods read (with ``--sweep`` the sweep writes them: form only)."""
    sweep = args.sweep or profile.sweep
    path = Path(args.hparams) if args.hparams else HPARAMS_FILE
    if not args.hparams and not path.exists():
        return
    chosen, name = read_hparams_file(path), f"{args.dataset}-{args.profile}"
    if name not in chosen and args.hparams and not sweep:
        raise ValueError(f"{str(path)!r} has no entry for {name!r} (it has {sorted(chosen)}); "
                         "run the sweep for this dataset and profile")
    if name in chosen and not sweep and (
            missing := missing_hparams(chosen[name], resolve_methods(profile, args.methods))):
        raise ValueError(f"{path.name}[{name!r}] lacks {', '.join(missing)}: the methods this run "
                         "trains read them, and a file's entry is never completed from the "
                         "library's defaults; add them, choose them with --sweep, or give "
                         "--hparams FILE with a complete entry")


def read_hparams_used(run_dir: Path) -> dict | None:
    """The record of the hyper-parameters that made the run's tables (None if none)."""
    try:
        return json.loads((Path(run_dir) / HPARAMS_USED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def hparams_change(before: dict | None, after: dict | None) -> str | None:
    """In words, how the hyper-parameters of ``after`` differ from those of ``before``
    (records of :data:`HPARAMS_USED`), with the flag that brings the earlier ones back;
    None when neither record is missing and they agree."""
    if not before or not after or before.get("configs") == after.get("configs"):
        return None
    old, new = before.get("configs", {}), after.get("configs", {})
    fields = {m: [f"{k} {old[m].get(k)} -> {v}" for k, v in new[m].items() if old[m].get(k) != v]
              for m in new if m in old}
    changes = [f"{m}: {', '.join(f)}" for m, f in fields.items() if f]
    back = (f"; to use the earlier ones again: --hparams {before['file']}"
            if before.get("file") and before.get("file") != after.get("file") else "")
    return (f"hyper-parameters differ from those that made this run's tables: "
            f"{before.get('source')} before, {after.get('source')} now; "
            + ("; ".join(changes) or "other methods") + back)
