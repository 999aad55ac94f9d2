"""The chosen hyper-parameters of a run: read from a hyper-parameter file (a
sweep's, ``--hparams``, or the committed ``fairkd_utils/hparams.json``), checked, and
turned into each method's :class:`~fairkd_utils.losses.MethodConfig`."""

from __future__ import annotations
from pathlib import Path
from . import losses, records
from .profiles import METHOD_SPECS, check_hparams, missing_hparams, read_hparams_file
from .rundir import Run
# The committed hyper-parameter file, and the record record_hparams writes into the run
# directory (the hyper-parameters that made its tables; the runner says so when a later
# run's differ): one definition each, the runner's.
from .runner_checks import HPARAMS_FILE, HPARAMS_USED


#: A hyper-parameter file ``{"<dataset>-<profile>": {method: {field: value}}}``,
#: checked (``profiles.check_hparams``: known methods, fields each method reads, values
#: of their types), or a clear error naming the file: ``profiles.read_hparams_file``
#: itself, no wrapper.
read_hparams = read_hparams_file


def _hparams_entry(run: Run) -> tuple[dict | None, str, Path | None]:
    """The chosen hyper-parameters that apply to ``run``: (the file's entry or None for
    the library defaults, where it came from in words, the file). The file named by
    ``run.hparams_file`` (it must have an entry for this run), else the committed
    ``fairkd_utils/hparams.json``'s entry for ``<dataset>-<profile>``, else the library
    defaults. Never another dataset's or profile's entry."""
    path = Path(run.hparams_file) if run.hparams_file else HPARAMS_FILE
    if not run.hparams_file and not path.exists():
        return None, "library defaults (no fairkd_utils/hparams.json)", None
    chosen = read_hparams(path)
    table = chosen.get(run.name)
    if table is None:
        if run.hparams_file:
            raise ValueError(f"{str(path)!r} has no entry for {run.name!r} (it has "
                             f"{sorted(chosen)}); run the sweep for this dataset and profile")
        return None, (f"library defaults ({path.name} has no entry for {run.name}; "
                      "choose them with --sweep)"), None
    return ({k: v for k, v in table.items() if k != "_comment"}, f"{path.name}[{run.name!r}]",
            path.resolve())


def hparams_for(table: dict, method: str, source: str = "hyper-parameter table",
                complete: bool = True) -> dict:
    """The overrides ``method`` takes from a chosen table: lam and T from ``kd``'s entry
    (shared by every distillation method), beta from the method it borrows it from
    (``METHOD_SPECS[method].beta_from``), other fields (e.g. ``score``) from its own.
    ``complete``: the table must hold every field the method takes from it
    (``profiles.required_hparams``), else a ValueError naming what is missing (a file's
    entry is never completed from the library defaults)."""
    check_hparams({"": table}, source)
    if complete and (missing := missing_hparams(table, [method])):
        raise ValueError(f"{source} lacks {', '.join(missing)}; give every value the method reads "
                         "(or rerun the sweep: --sweep)")
    spec = METHOD_SPECS[method]
    # check_hparams has refused lam and T outside kd's entry and a borrowed beta in the
    # method's own, so its own entry adds only what is the method's.
    out = {k: v for k, v in table.get("kd", {}).items() if spec.distils and k in ("lam", "T")}
    if spec.beta_from and "beta" in table.get(spec.beta_from, {}):
        out["beta"] = table[spec.beta_from]["beta"]
    return {**out, **table.get(method, {})}


def method_config(run: Run, method: str, entry: tuple | None = None):
    """The method's hyper-parameters: the run's chosen ones (:func:`_hparams_entry`)
    over the library defaults (``losses.DEFAULT_HPARAMS``), with the profile's warm-up
    (the same for every method).
    A file's entry must hold every value the method reads from it. ``entry``: the file's
    entry for the run as :func:`method_configs` read it (read here when None)."""
    table, source, _ = entry or _hparams_entry(run)
    overrides = hparams_for(table or {}, method, source, complete=table is not None)
    overrides["warmup_epochs"] = run.profile.warmup_epochs
    try:
        return losses.default_config(method, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: bad entry for {method!r} ({err}); valid fields are "
                         f"{sorted(losses.MethodConfig.__dataclass_fields__)}") from None


def method_configs(run: Run, methods) -> tuple[dict, str]:
    """Every method's configuration (:func:`method_config`) from one read of the run's
    hyper-parameter file, recorded as the ones that make the run's tables
    (:func:`record_hparams`), and where they came from in words: notebook 05's set-up."""
    entry = _hparams_entry(run)
    configs = {m: method_config(run, m, entry) for m in methods}
    record_hparams(run, configs, entry)
    return configs, entry[1]


def hparams_source(run: Run) -> str:
    """Where :func:`method_config` takes ``run``'s hyper-parameters from, in words."""
    return _hparams_entry(run)[1]


def record_hparams(run: Run, configs: dict, entry: tuple | None = None) -> dict:
    """Write ``<run_dir>/hparams_used.json``: every method's configuration of
    ``configs`` (method -> ``losses.MethodConfig``), where they came from and the file."""
    _, source, path = entry or _hparams_entry(run)
    used = {"source": source, "file": str(path) if path else None,
            "configs": {m: c.to_dict() for m, c in configs.items()}}
    records.write_json(run.path(HPARAMS_USED), used)
    return used
