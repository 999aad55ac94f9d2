"""Checkpoints: what identifies a training (its fingerprint), where its file lives,
and how it is read back.

A checkpoint is ``<ckpt_dir>/<name>-<fingerprint>.pt``, written atomically, holding
only tensors and plain Python values (``torch.load(weights_only=True)`` reads it):
``format, name, fingerprint, fingerprint_payload, config, state_dict, best_epoch,
history`` (list of dicts), ``weights`` (list of dicts) and ``run`` (the run that wrote
it, see :func:`must_retrain`). The fingerprint hashes the config, the model's
architecture and initial weights, the data, the objective and the code (not the
prose) of the library modules that train (:func:`code_fingerprint`), so a changed input retrains instead of
reusing a checkpoint of something else.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .records import torch_save

logger = logging.getLogger("fairkd")

#: The library modules that do not shape a checkpoint (figures and their palette, the
#: runner, the job engine, table writing): every other module of the package goes into every
#: checkpoint fingerprint (:func:`code_fingerprint`), so a code change to any of them
#: retrains instead of reusing checkpoints of the old code. A new module counts by
#: default. (``metrics`` counts: its validation metrics choose the kept epoch.)
NOT_TRAINING_MODULES = ("__init__", "plots", "palette", "pipeline", "runner_checks", "jobs", "executors",
                        "records")
#: A model checkpoint (:func:`save_model`) and a warm-up state (``train.train_warmup``).
CHECKPOINT_FORMAT = "fairkd-checkpoint-v1"
WARMUP_FORMAT = "fairkd-warmup-v1"


def code_modules(folder=None) -> list[str]:
    """The modules whose code :func:`code_fingerprint` hashes (names without ``.py``)."""
    folder = Path(folder) if folder else Path(__file__).resolve().parent
    return sorted(p.stem for p in folder.glob("*.py") if p.stem not in NOT_TRAINING_MODULES)


def code_text(source: str) -> str:
    """The code of a module without its docstrings and comments: its syntax tree,
    docstrings removed, dumped without line numbers. Editing prose leaves it equal;
    any change to what runs does not."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and ast.get_docstring(node, clean=False) is not None):
            node.body = node.body[1:]
    return ast.dump(tree)


@functools.lru_cache(maxsize=None)
def code_fingerprint(folder=None) -> str:
    """A hash (16 hex digits) of the code (:func:`code_text`: no docstrings or
    comments) of :func:`code_modules` in ``folder`` (default: this package's),
    computed once per process."""
    folder = Path(folder) if folder else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for module in code_modules(folder):
        code = code_text((folder / f"{module}.py").read_text(encoding="utf-8")).encode()
        h.update(f"{module}.py {len(code)}\n".encode())
        h.update(code)
    return h.hexdigest()[:16]


#: Set by the runner's ``--retrain`` for its kernels: checkpoint name prefixes to
#: retrain, separated by spaces ("*": every checkpoint). Unset: reuse by fingerprint.
RETRAIN_ENV = "FAIRKD_RETRAIN"
#: Set by the runner with RETRAIN_ENV: an id of this run of the runner. Every checkpoint
#: records the run that wrote it, so one retrained in this run (by an earlier notebook,
#: or an earlier call) is reused, not retrained again.
RETRAIN_RUN_ENV = "FAIRKD_RETRAIN_RUN"
_PROCESS_RUN = f"process-{os.getpid()}-{time.time_ns()}"


def current_run() -> str:
    return os.environ.get(RETRAIN_RUN_ENV) or _PROCESS_RUN


def retrain_requested(name: str) -> bool:
    """Whether ``FAIRKD_RETRAIN`` asks to retrain the checkpoint called ``name``."""
    prefixes = os.environ.get(RETRAIN_ENV, "").split()
    return "*" in prefixes or any(name.startswith(p) for p in prefixes)


def must_retrain(path: Path, name: str) -> bool:
    """Whether the existing checkpoint ``path`` of ``name`` is to be retrained: its name
    is asked for by ``FAIRKD_RETRAIN`` and it was not written in this run (or cannot be
    read: retraining replaces it anyway)."""
    if not retrain_requested(name):
        return False
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return True
    return not isinstance(stored, dict) or stored.get("run") != current_run()


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable or from another config)."""


def _hash_tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return hashlib.sha256(t.numpy().reshape(-1).view(np.uint8)).hexdigest()[:16]  # no copy


def _plain(obj):
    """A JSON-able description of ``obj`` (tensors by shape + content hash)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype), "sha": _hash_tensor(obj)}
    if isinstance(obj, np.ndarray):
        return _plain(torch.from_numpy(np.ascontiguousarray(obj)))
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    return f"<{type(obj).__qualname__}>"


def fingerprint(obj) -> str:
    """A short stable hash (16 hex digits) of a plain-value / tensor structure."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_objective(objective) -> dict:
    if hasattr(objective, "describe"):
        return {"class": type(objective).__qualname__, **_plain(objective.describe())}
    attrs = {k: _plain(v) for k, v in sorted(vars(objective).items())
             if isinstance(v, (str, int, float, bool, type(None), torch.Tensor, tuple, list, dict))}
    return {"class": type(objective).__qualname__, **attrs}


def describe_data(ds) -> dict:
    """Identity of a split: name, size, labels, groups, and every value of its ``x``
    (in memory: every token of a text split, every pixel of an image split) or every
    file's path, size and modification time (lazy). Hashing all of ``x`` costs 0.23 s
    per 400 MB on this 2-core CPU (a 200k x 2 x 128 token split; up to ~1 s with the cores
    shared), the default synthetic_text splits 4 ms, so nothing is sampled: an edited
    pair retrains."""
    d = {"name": getattr(ds, "name", None), "split": getattr(ds, "split", None), "n": len(ds),
         "y": _plain(ds.y), "a": _plain(ds.a),
         "ids": hashlib.sha256("\n".join(map(str, ds.ids)).encode()).hexdigest()[:16],
         "image_size": getattr(ds, "image_size", None), "augment": getattr(ds, "augment", None)}
    if getattr(ds, "x", None) is not None:
        d["x"] = _plain(ds.x)
    elif getattr(ds, "paths", None) is not None:  # regenerated images change it (os.stat only)
        files = hashlib.sha256()
        for p in ds.paths:
            st = os.stat(p)
            files.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        d["files"] = files.hexdigest()[:16]
    return d


def describe_model(model: nn.Module) -> dict:
    return {"class": type(model).__qualname__,
            "exit_stage": getattr(model, "exit_stage", None),
            "detach_exit": getattr(model, "detach_exit", None),
            "initial_state": _plain(dict(model.state_dict()))}


def checkpoint_path(ckpt_dir, name: str, fp: str) -> Path:
    return Path(ckpt_dir) / f"{name}-{fp}.pt"


def load_checkpoint(path, model: nn.Module | None = None,
                    expected_fingerprint: str | None = None, fmt: str | None = None) -> dict:
    """Read a checkpoint (``weights_only=True``) of format ``fmt`` (default: a model
    checkpoint; ``WARMUP_FORMAT`` for a warm-up state); optionally check its fingerprint
    and load its weights into ``model``.  Clear errors, never a pickle traceback."""
    fmt = fmt or CHECKPOINT_FORMAT
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train the model first "
                                "(run the notebook that produces it)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fairkd checkpoint "
                              f"({type(exc).__name__}: {first}); delete it and rerun to retrain") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise CheckpointError(f"checkpoint {path} is not a {fmt} file; delete it and rerun to retrain")
    if expected_fingerprint is not None and ck.get("fingerprint") != expected_fingerprint:
        raise CheckpointError(f"checkpoint {path} was produced by another config (fingerprint "
                              f"{ck.get('fingerprint')}, expected {expected_fingerprint}); delete it, or "
                              "rerun with the config that produced it, or train into a new file")
    if model is not None:
        try:
            model.load_state_dict(ck["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model ({str(exc).splitlines()[0]}); "
                                  "delete it and rerun to retrain") from None
    return ck


def retraining(path: Path, name: str) -> bool:
    """:func:`must_retrain`, said in the log when true."""
    retrain = must_retrain(path, name)
    if retrain:
        logger.info("retraining %s (%s)", path.name, RETRAIN_ENV)
    return retrain


def fingerprint_payload(model, splits, config, objective, name, extra) -> tuple[str, dict]:
    """The fingerprint of a training call and what it hashes: the config (less its
    runtime fields), the model's class and initial weights, the train and val data,
    the objective and ``extra`` (e.g. the run's data and code identity)."""
    cfg_fp = {k: v for k, v in config.to_dict().items() if k not in getattr(config, "RUNTIME_FIELDS", ())}
    payload = {"name": name, "config": cfg_fp, "model": describe_model(model),
               "train": describe_data(splits["train"]), "val": describe_data(splits["val"]),
               "objective": describe_objective(objective), "extra": _plain(extra)}
    return fingerprint(payload), payload


def save_model(path, *, name: str, fp: str, payload: dict, config, state: dict) -> Path:
    """Write a model checkpoint of a finished :func:`train._fit` ``state`` atomically."""
    return torch_save(path, {
        "format": CHECKPOINT_FORMAT, "name": name, "fingerprint": fp,
        "fingerprint_payload": json.dumps(_plain(payload), sort_keys=True)[:100_000],
        "config": _plain(config.to_dict()),
        "state_dict": {k: v.contiguous() for k, v in state["best_state"].items()},
        "best_epoch": state["best_epoch"], "history": state["history"], "weights": state["weights"],
        "run": current_run(),
    })
