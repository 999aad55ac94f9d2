"""Artifacts on disk: atomic writes, per-run record files and the tables
assembled from them.

Each training or evaluation run writes its own file under
``<run_dir>/records/<kind>/<name>.csv``; a table (``metrics.csv``,
``predictions.csv``, ``weights.csv``) is the concatenation of its kind's
records, so a rerun replaces exactly its own rows and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

TABLE_KINDS = ("metrics", "predictions", "weights", "laplace_effect", "timings")
_UMASK = os.umask(0)
os.umask(_UMASK)
#: Columns read as text whatever they look like (an id such as "0123" or "1e5"
#: must not become a number).
TEXT_COLUMNS = {"config_id": str, "id": str, "group_name": str}


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
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return write_text(path, buf.getvalue())


def torch_save(path, obj) -> Path:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def record_path(run_dir, kind: str, name: str) -> Path:
    if kind not in TABLE_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {TABLE_KINDS}")
    safe = "".join(c if (c.isalnum() or c in "-_.=") else "_" for c in name)
    return Path(run_dir) / "records" / kind / f"{safe}.csv"


def write_record(run_dir, kind: str, name: str, rows) -> Path:
    """Write one run's rows (DataFrame or list of dicts) as its own record file,
    replacing only an earlier record of the same name."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return write_csv(record_path(run_dir, kind, name), df)


def assemble(run_dir, kind: str, write: bool = True) -> pd.DataFrame:
    """Concatenate every record of ``kind`` into ``<run_dir>/<kind>.csv``."""
    folder = Path(run_dir) / "records" / kind
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    frames = [read_table(f) for f in files]
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
        raise FileNotFoundError(
            f"{path} is missing: run notebook {notebook} first "
            f"(e.g. `python -m fairkd_utils.pipeline --only {notebook[:2]}` with the same "
            "--profile/--dataset)"
        )
    return path
