"""Artifacts on disk: atomic writes, per-run record files and the tables
assembled from them.

Each training or evaluation run writes its own file under
``<run_dir>/records/<kind>/<name>.csv``; a table (``metrics.csv``,
``predictions.csv``, ``weights.csv``) is the concatenation of its kind's
records, so a rerun replaces exactly its own rows and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

TABLE_KINDS = ("metrics", "predictions", "weights", "laplace_effect", "timings", "dfr")
_UMASK = os.umask(0)
os.umask(_UMASK)
#: Columns read as text whatever they look like (an id such as "0123" or "1e5"
#: must not become a number).
TEXT_COLUMNS = {"config_id": str, "id": str, "group_name": str}
#: Lists that :func:`collect_writes` fills with every path :func:`atomic_write` writes.
_COLLECTORS: list[list[Path]] = []


@contextlib.contextmanager
def collect_writes():
    """While the block runs, the list it yields receives every path written through
    :func:`atomic_write` in this process (records, checkpoints): what one job wrote."""
    written: list[Path] = []
    _COLLECTORS.append(written)
    try:
        yield written
    finally:
        _COLLECTORS.remove(written)


class Locked(RuntimeError):
    """Another process holds the lock (:func:`exclusive`); the message names it."""


class LockFailed(RuntimeError):
    """The lock could not be taken for another reason than another holder (e.g. a file
    system without ``flock``); the message names the error."""


@contextlib.contextmanager
def exclusive(path, what: str, hint: str = ""):
    """Hold an exclusive lock on the file ``path`` while the block runs, or raise
    :class:`Locked` at once, naming the process that holds it (pid, host, command, start:
    written into the file by the holder). The lock is the operating system's
    (``flock``): it goes with the process, so a killed run leaves none behind."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        hint = f", or {hint}" if hint else ""
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockFailed(f"cannot lock {path} for {what}: flock failed ({err}); the file "
                             "system may not support locks (some network mounts do not): put "
                             f"the run directory on a local disk{hint}") from None
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "a process that did not say"
        raise Locked(f"{what} is in use by another run ({holder}); wait for it to finish{hint} "
                     f"(lock file {path})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {' '.join(sys.argv)}").encode())
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` by calling ``write(fh)`` on a temporary file in the same
    folder, then renaming it into place: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        for written in _COLLECTORS:
            written.append(path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path, df: pd.DataFrame) -> Path:
    return write_text(path, df.to_csv(index=False))


def torch_save(path, obj) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def _check_kind(kind: str) -> None:
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {TABLE_KINDS}")


def record_path(run_dir, kind: str, name: str) -> Path:
    _check_kind(kind)
    safe = "".join(c if (c.isalnum() or c in "-_.=") else "_" for c in name)
    return Path(run_dir) / "records" / kind / f"{safe}.csv"


def write_record(run_dir, kind: str, name: str, rows) -> Path:
    """Write one run's rows (DataFrame or list of dicts) as its own record file,
    replacing only an earlier record of the same name."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return write_csv(record_path(run_dir, kind, name), df)


#: Per table kind: the columns every record has.
RECORD_COLUMNS = {
    "metrics": ("dataset", "profile", "seed", "config_id", "model", "method", "predictive",
                "split", "group", "group_name", "n", "acc", "ece", "nll"),
    "predictions": ("id", "split", "group", "y", "seed", "model", "method", "config_id",
                    "predictive", "prob", "margin", "correct", "weight", "variance"),
    "weights": ("seed", "method", "config_id", "epoch", "group", "n", "term", "weight", "group_name"),
    "laplace_effect": ("seed", "method", "config_id", "epoch"),
    "timings": ("stage", "name", "seconds", "reused"),
    # DFR's strengths per seed (students.run_dfr): accuracies on the selection half of val
    "dfr": ("seed", "method", "config_id", "base_config_id", "penalty", "C",
            "val_half2_worst_group_acc", "val_half2_avg_acc", "chosen"),
}
#: The columns of :data:`RECORD_COLUMNS` that may have missing values; every other one
#: is a key, never missing.
MAY_BE_MISSING = {"acc", "ece", "nll", "weight", "variance", "val_half2_worst_group_acc",
                  "val_half2_avg_acc"}


class RecordError(ValueError):
    """A record file that is damaged or incomplete; the message names the file and
    the notebook that writes it."""


#: Record names (of metrics, predictions and timings) -> the notebook that writes them;
#: any other: notebook 05.
_WRITERS = {("teacher",): "02_teacher", ("student-erm-", "exit-erm-"): "03_early_exit_student",
            ("exit_laplace-",): "04_laplace_early_exit"}


def writer_notebook(kind: str, name: str) -> str:
    """The notebook that writes the record ``<kind>/<name>.csv``."""
    if kind in ("weights", "laplace_effect", "dfr"):  # <method>-<config_id>-seed<seed>
        return "03_early_exit_student" if name.startswith("erm-") else "05_distillation_comparison"
    return next((nb for prefixes, nb in _WRITERS.items() if name.startswith(prefixes)),
                "05_distillation_comparison")


def _damaged(path: Path, kind: str, problem: str) -> RecordError:
    nb = writer_notebook(kind, path.stem)
    return RecordError(
        f"record {path} {problem}: delete it and rerun notebook {nb}, which writes it "
        f"(e.g. `python -m fairkd_utils.pipeline --only {nb[:2]}` with the same "
        "--profile/--dataset/--seeds)")


def read_record(path, kind: str) -> pd.DataFrame:
    """One record file, checked: written whole (ends with a newline), parses, has the
    kind's columns (:data:`RECORD_COLUMNS`) and no missing key values, and has rows
    (``laplace_effect`` may have none). Raises :class:`RecordError` otherwise."""
    path = Path(path)
    if not path.read_bytes().endswith(b"\n"):
        raise _damaged(path, kind, "is cut short (empty, or no newline at its end)")
    try:
        df = read_table(path)
    except (ValueError, pd.errors.ParserError) as err:
        raise _damaged(path, kind, f"does not parse as CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in RECORD_COLUMNS[kind] if c not in df.columns]
    if missing:
        raise _damaged(path, kind, f"lacks the columns {missing} of a {kind} record")
    gaps = [c for c in RECORD_COLUMNS[kind] if c not in MAY_BE_MISSING and df[c].isna().any()]
    if gaps:
        raise _damaged(path, kind, f"has missing values in {gaps}")
    if not len(df) and kind != "laplace_effect":
        raise _damaged(path, kind, "has no rows")
    return df


def _read_groups(run_dir) -> pd.DataFrame | None:
    path = Path(run_dir) / "groups.csv"
    if not path.is_file():
        return None
    try:
        groups = read_table(path)
    except (ValueError, pd.errors.ParserError) as err:
        raise RecordError(f"{path} does not parse ({str(err).splitlines()[0]}): delete it and "
                          "rerun notebook 01_data_and_groups") from None
    needed = ["split", "group", "n"]
    if not set(needed) <= set(groups.columns) or groups[needed].isna().any().any():
        raise RecordError(f"{path} is damaged (it needs split, group and n on every row): delete "
                          "it and rerun notebook 01_data_and_groups")
    return groups


def _sizes(rows: pd.DataFrame) -> pd.Series:
    """``n`` of each group (the group as text) of ``rows``."""
    return rows.set_index(rows.group.astype(str))["n"].astype(int)


def check_rows(path, kind: str, df: pd.DataFrame, groups: pd.DataFrame | None,
               group_ids: set[str]) -> None:
    """Whole-record checks: a metrics record has exactly one row per group plus "all"
    (``group_ids``: the groups, from ``groups.csv`` when present), the overall ``n``
    their sum and, with ``groups.csv``, each group's ``n``; a predictions record one row
    per instance of its split; a weights record every group for each (epoch, term)."""
    path = Path(path)
    n_of = None if groups is None else {split: _sizes(d).to_dict() for split, d in groups.groupby("split")}
    if kind == "metrics":
        for (split, *_), d in df.groupby(["split", "model", "method", "config_id", "seed",
                                          "predictive"], sort=False):
            got = d.group.astype(str).tolist()
            if sorted(got) != sorted(group_ids | {"all"}):
                raise _damaged(path, kind, f"has groups {sorted(got)} for split {split!r}, not one "
                               f"row per group {sorted(group_ids)} plus 'all'")
            n = _sizes(d)
            parts = n.drop("all")
            if n["all"] != parts.sum():
                raise _damaged(path, kind, f"has n={n['all']} overall but {parts.sum()} summed over groups")
            if n_of is not None and split in n_of and parts.to_dict() != n_of[split]:
                raise _damaged(path, kind, f"has group sizes {parts.to_dict()} on "
                               f"{split!r}, groups.csv {n_of[split]} (another data version?)")
    elif kind == "predictions" and n_of is not None:
        for split, d in df.groupby("split"):
            if split in n_of and len(d) != sum(n_of[split].values()):
                raise _damaged(path, kind, f"has {len(d)} rows for split {split!r}, which has "
                               f"{sum(n_of[split].values())} instances (groups.csv)")
    elif kind == "weights":
        for (epoch, term), d in df.groupby(["epoch", "term"]):
            if sorted(d.group.astype(str)) != sorted(group_ids):
                raise _damaged(path, kind, f"has groups {sorted(d.group.astype(str))} for epoch "
                               f"{epoch}, term {term!r}; expected each of {sorted(group_ids)} once")
        if len({tuple(sorted(d.epoch)) for _, d in df.groupby("term")}) > 1:
            raise _damaged(path, kind, "has different epochs for its terms")


def assemble(run_dir, kind: str, write: bool = True) -> pd.DataFrame:
    """Concatenate every record of ``kind`` into ``<run_dir>/<kind>.csv``, each record
    checked first (:func:`read_record`, :func:`check_rows`): a damaged one stops with a
    :class:`RecordError` naming the file and the notebook that writes it."""
    _check_kind(kind)
    folder = Path(run_dir) / "records" / kind
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    frames = [read_record(f, kind) for f in files]
    groups = _read_groups(run_dir) if kind in ("metrics", "predictions", "weights") else None
    group_ids = (set(groups.group.astype(str)) if groups is not None   # else every group a record names
                 else {str(g) for f in frames for g in f.get("group", [])} - {"all"})
    for f, df in zip(files, frames):
        check_rows(f, kind, df, groups, group_ids)
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if write:
        write_csv(Path(run_dir) / f"{kind}.csv", df)
    return df


def read_table(path) -> pd.DataFrame:
    """A table or record CSV, with id-like columns kept as text."""
    return pd.read_csv(path, dtype=TEXT_COLUMNS)


def require(path, notebook: str) -> Path:
    """Return ``path`` if it exists, else stop with which notebook makes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook {notebook} first (e.g. `python -m "
                                f"fairkd_utils.pipeline --only {notebook[:2]}` with the same "
                                "--profile/--dataset)")
    return path
