"""One training loop for every model of the study: the teacher, the ERM student
and every distillation method.

What differs between methods lives in an *objective* (``Objective`` protocol);
the loop owns the optimiser, the cosine schedule, evaluation on val every epoch,
checkpoint selection on val (never test), the early exit's own cross-entropy,
logging of per-group instance weights, and checkpoints keyed by a fingerprint
of everything that produced them.

Checkpoints (fingerprints, files, reading them back) are ``checkpoints``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ck
from . import metrics as M
from .data import Batch, iterate_batches
from .models import StudentOutput
from .profiles import resolve_device
from .records import torch_save

__all__ = [
    "Objective", "CrossEntropyObjective", "TrainConfig", "TrainResult", "Predictions",
    "train_model", "train_warmup", "predict", "evaluate", "NonFiniteLossError",
    "WEIGHT_COLUMNS", "use_channels_last", "final_logits", "Forward",
]
#: One line per epoch; ``rundir.setup`` sends it to ``<run_dir>/run.log``.
logger = logging.getLogger("fairkd")

# weights DataFrame: one row per (epoch, group) of the epochs in which the objective
# returned weights (none for ERM: an empty frame); NaN for a term it did not return
WEIGHT_COLUMNS = ("epoch", "group", "n", "mean_weight_ce", "mean_weight_kd")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


# --------------------------------------------------------------------------- objectives
class Objective(Protocol):
    """What the loop needs from a training objective.

    ``loss(out, batch, epoch) -> (loss, weights)``: ``out`` is the model's output
    (a logits Tensor for the teacher, a :class:`StudentOutput` for a student),
    ``batch`` a :class:`fairkd_utils.data.Batch` (``batch.idx`` = positions in the
    training split, to look up teacher logits), ``epoch`` 0-based (for warm-up).
    ``weights`` is None or ``{"ce": Tensor(B), "kd": Tensor(B)}`` -- the
    per-instance weights used, logged per group by the loop.  The loop adds the
    exit head's cross-entropy itself for students.

    ``on_epoch_end(epoch)`` is called after each epoch's last step (e.g. refit a
    Laplace posterior).  Optional extras the loop uses when present:
    ``on_epoch_start(epoch)`` and ``describe() -> dict`` (plain values that
    identify the objective for the checkpoint fingerprint; without it the
    fingerprint uses the objective's class name and its plain/tensor attributes).
    """

    def loss(self, out, batch: Batch, epoch: int) -> tuple[torch.Tensor, dict | None]: ...

    def on_epoch_end(self, epoch: int) -> None: ...


def final_logits(out) -> torch.Tensor:
    """The final head's logits of a teacher (Tensor) or student (StudentOutput) output."""
    return out.logits if isinstance(out, StudentOutput) else out


class CrossEntropyObjective:
    """Cross-entropy on the final head, no weights: the teacher's objective (and the
    loop's default). The students' ``erm`` is ``losses.make_objective`` at lam = 0."""

    def loss(self, out, batch: Batch, epoch: int):
        return F.cross_entropy(final_logits(out).float(), batch.y), None

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def describe(self) -> dict:
        return {"objective": "erm"}


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything the loop does that is not the model, the data or the objective.

    ``device`` "cpu" | "cuda" | "auto"; ``amp`` None = bf16 autocast on CUDA only;
    ``channels_last`` None = auto (:func:`use_channels_last`); ``compile``: the training
    and validation forward passes under ``torch.compile`` (:class:`Forward`);
    ``num_workers`` None = 0 on CPU, min(8, cores) on CUDA (lazy datasets only)."""
    epochs: int
    batch_size: int = 128
    optimizer: str = "sgd"            # "sgd" (momentum, nesterov) | "adamw"
    lr: float = 0.05
    weight_decay: float = 5e-4        # not applied to BatchNorm parameters and biases
    momentum: float = 0.9
    nesterov: bool = True
    select_on: str = "worst_group_acc"  # or "avg_acc", on val
    select_after: int = 0             # epochs 1..select_after are never kept (warm-up)
    lr_warmup: float = 0.0            # share of the steps with a linear learning-rate warm-up
    seed: int = 0
    exit_loss_weight: float = 1.0     # weight of the early exit's CE (students)
    # The early exit head's learning rate as a multiple of ``lr`` (students; same schedule;
    # AdamW's decoupled decay scales with it). With detached exit features, objectives
    # that do not read the exit (ERM, kd, group-balanced) train every other weight exactly
    # as at 1; the reweighting methods read the exit, so their weights follow its fit.
    exit_lr_scale: float = 1.0
    eval_batch_size: int = 512
    device: str = "cpu"
    num_workers: int | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False             # torch.compile the forward passes (not bit-identical to eager)
    progress: bool = True             # tqdm bar per epoch

    # fields that do not change what is trained (excluded from the fingerprint)
    RUNTIME_FIELDS = ("device", "num_workers", "progress", "eval_batch_size")

    def __post_init__(self):
        for name, choices in (("optimizer", ("sgd", "adamw")), ("select_on", ("worst_group_acc", "avg_acc"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; use {' or '.join(map(repr, choices))}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not 0 <= self.lr_warmup < 1:
            raise ValueError(f"lr_warmup={self.lr_warmup} must lie in [0, 1): the share of the "
                             "training steps over which the learning rate rises linearly")
        if not self.exit_lr_scale > 0:
            raise ValueError(f"exit_lr_scale={self.exit_lr_scale} must be > 0: the exit head's "
                             "learning rate as a multiple of lr")
        if not 0 <= self.select_after < self.epochs:
            raise ValueError(f"select_after={self.select_after} must lie in [0, epochs={self.epochs}): "
                             "at least one epoch after the warm-up must be eligible")

    @classmethod
    def from_profile(cls, profile, role: str, seed: int = 0, device: str = "cpu",
                     **overrides) -> "TrainConfig":
        """The profile's budget for ``role`` ("teacher" | "student")."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role={role!r}; use 'teacher' or 'student'")
        teacher = role == "teacher"
        kw = dict(epochs=profile.teacher_epochs if teacher else profile.student_epochs,
                  batch_size=profile.batch_size, optimizer=profile.optimizer,
                  lr=(getattr(profile, "teacher_lr", None) if teacher else None) or profile.lr,
                  weight_decay=profile.weight_decay, select_on=profile.select_on, seed=seed,
                  device=device, lr_warmup=getattr(profile, "lr_warmup", 0.0),
                  exit_lr_scale=1.0 if teacher else getattr(profile, "exit_lr_scale", 1.0),
                  compile=getattr(profile, "compile", False))
        return cls(**{**kw, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- compiled forward
class Forward:
    """``model``'s forward pass, eager or (``compiled``) under ``torch.compile``.

    torch.compile caches its graphs on the forward's code, the input's shape and the
    mode (train or eval, with or without gradients), not on the model object: the
    parameters are graph inputs. So every student of one shape in a process (a
    notebook's kernel, a job worker) reuses one compile per mode. Batches of another
    size than the first (a split's last, smaller batch) run eagerly, so that they never
    recompile. The first step of each new (model class, shape, mode) logs
    ``compiled <key> in X s``: that step's wall time, the compile included (the backward
    is compiled at the first ``backward()``, so call :meth:`done` after the step)."""

    _seen: set = set()   # the keys compiled in this process
    backend = "inductor"  # torch.compile's backend (the tests set "eager": dynamo only)

    def __init__(self, model: nn.Module, compiled: bool = False):
        self.model, self.compiled = model, compiled
        self.fn = torch.compile(model, dynamic=False, backend=self.backend) if compiled else model
        self.full, self.pending = {}, None   # the first batch size of each mode

    def __call__(self, x: torch.Tensor):
        if not self.compiled:
            return self.model(x)
        mode = (self.model.training, torch.is_grad_enabled())
        if x.shape[0] != self.full.setdefault(mode, x.shape[0]):
            return self.model(x)
        key = (type(self.model).__name__, tuple(x.shape), *mode)
        if key not in Forward._seen:
            Forward._seen.add(key)
            self.pending = (key, time.perf_counter())
        return self.fn(x)

    def done(self) -> None:
        """Log the compile of the step that just ended, if it compiled."""
        if self.pending:
            key, t0 = self.pending
            logger.info("compiled %s in %.1f s", key, time.perf_counter() - t0)
            self.pending = None


# --------------------------------------------------------------------------- prediction
class Predictions(NamedTuple):
    """Model outputs on a split, float32 CPU tensors; exit_logits/phi None for a teacher."""
    logits: torch.Tensor
    exit_logits: torch.Tensor | None
    phi: torch.Tensor | None
    y: torch.Tensor
    a: torch.Tensor
    g: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.double().softmax(1)

    @property
    def exit_probs(self) -> torch.Tensor | None:
        return None if self.exit_logits is None else self.exit_logits.double().softmax(1)


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """The learning rate of ``step`` (0-based) as a share of the configured one: a linear
    rise over the first ``warmup`` steps (``(step + 1) / warmup``), then a cosine from 1
    to 0 over the remaining ``total - warmup`` steps. ``warmup = 0`` is the plain cosine
    ``(1 + cos(pi * step / total)) / 2``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def use_channels_last(model: nn.Module, device: torch.device, requested: bool | None = None) -> bool:
    """Whether to run ``model`` in channels_last: as requested, else always on CUDA
    and on the CPU only when every conv has >= 16 output channels.  (channels_last
    is ~30 % faster on this CPU for 16-128-wide ResNets -- bench/ -- but torch
    2.14.1's CPU backward segfaults for 8- and 12-channel ResNets in channels_last
    at some batch sizes, e.g. 31, with 2+ threads.)"""
    if requested is not None:
        return bool(requested)
    if device.type == "cuda":
        return True
    outs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(outs) and min(outs) >= 16


def _autocast(device: torch.device, amp: bool | None):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict(model: nn.Module, ds, *, batch_size: int = 512, device="cpu",
            amp: bool | None = None, channels_last: bool | None = None,
            num_workers: int | None = None, forward: Forward | None = None) -> Predictions:
    """Logits (and exit logits and phi for a student) on every item of ``ds``, in
    dataset order, in eval mode (the model's mode is restored afterwards).

    ``amp`` None = off: predictions (and phi, which the Laplace fit reads) are fp32
    even on CUDA; the training loop's per-epoch val pass uses bf16 there. ``forward``:
    the model's :class:`Forward` (the training loop's, compiled or not); None: eager."""
    forward = forward or Forward(model)
    dev = torch.device(resolve_device(device)) if isinstance(device, str) else torch.device(device)
    channels_last = use_channels_last(model, dev, channels_last)
    was_training, was_augmenting = model.training, getattr(ds, "augment", False)
    model.eval()
    ds.augment = False  # predictions (teacher logits, Laplace factors) see the plain images
    logits, exits, phis = [], [], []
    try:
        for batch in iterate_batches(ds, batch_size, shuffle=False, device=dev,
                                     num_workers=_workers(num_workers, dev), pin_memory=dev.type == "cuda"):
            x = batch.x.contiguous(memory_format=torch.channels_last) if channels_last else batch.x
            with _autocast(dev, amp):
                out = forward(x)
            forward.done()
            logits.append(final_logits(out).float().cpu())
            if isinstance(out, StudentOutput):
                exits.append(out.exit_logits.float().cpu())
                phis.append(out.phi.float().cpu())
    finally:
        model.train(was_training)
        ds.augment = was_augmenting
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    y, a = ds.y.clone(), ds.a.clone()
    return Predictions(cat(logits), cat(exits), cat(phis), y, a, y * ds.n_attrs + a)


def evaluate(model: nn.Module, ds, *, batch_size: int = 512, device="cpu",
             amp: bool | None = None, train_group_counts=None, forward: Forward | None = None) -> dict:
    """Scalar metrics of the final head (and ``exit_*`` of the exit) on ``ds``."""
    p = predict(model, ds, batch_size=batch_size, device=device, amp=amp, forward=forward)
    out = M.summarize(p.probs, p.y, p.g, ds.n_groups, train_group_counts)
    if p.exit_logits is not None:
        ex = M.summarize(p.exit_probs, p.y, p.g, ds.n_groups, train_group_counts)
        out.update({f"exit_{k}": v for k, v in ex.items()})
    return out


# --------------------------------------------------------------------------- training
class TrainResult(NamedTuple):
    model: nn.Module
    history: pd.DataFrame      # one row per epoch: train loss/acc, val metrics, lr, seconds
    weights: pd.DataFrame      # WEIGHT_COLUMNS: per-epoch mean instance weight per group
    checkpoint: Path | None
    reused: bool
    fingerprint: str
    best_epoch: int


def _workers(num_workers, dev: torch.device) -> int:
    if num_workers is not None:
        return int(num_workers)
    return min(8, os.cpu_count() or 1) if dev.type == "cuda" else 0


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with weight decay on the weight matrices only; with
    ``cfg.exit_lr_scale != 1`` the early exit head (``model.exit``) gets groups of its own
    at ``lr * exit_lr_scale`` (the schedule scales every group alike; AdamW's decoupled
    decay, lr x weight_decay per step, is that much stronger there too). Scale 1 gives
    exactly the two groups of before."""
    exit_head = getattr(model, "exit", None) if cfg.exit_lr_scale != 1.0 else None
    exit_ids = {id(p) for p in exit_head.parameters()} if isinstance(exit_head, nn.Module) else set()

    def groups_of(params, lr):
        return [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": lr},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = groups_of([p for p in trainable if id(p) not in exit_ids], cfg.lr)
    if exit_ids:
        groups += [g for g in groups_of([p for p in trainable if id(p) in exit_ids],
                                        cfg.lr * cfg.exit_lr_scale) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_model(model: nn.Module, splits: dict, config: TrainConfig, objective=None, *,
                ckpt_dir=None, name: str = "model", fingerprint_extra=None,
                branch_from=None) -> TrainResult:
    """Train ``model`` on ``splits["train"]`` with ``objective`` (ERM if None),
    evaluating on ``splits["val"]`` every epoch; keep the epoch best on val
    ``config.select_on`` (ties broken by the other metric).  ``splits["test"]`` is
    never looked at.

    With ``ckpt_dir``: the checkpoint ``<ckpt_dir>/<name>-<fingerprint>.pt`` is
    reused when present (no training; the ``fairkd`` log says "reused checkpoint
    <file>"), unless ``FAIRKD_RETRAIN`` asks to retrain ``name`` (``checkpoints.must_retrain``:
    then it is retrained once per run and replaced); the fingerprint covers the config (less
    runtime fields), the model's architecture and initial weights, the train and
    val data, the objective and ``fingerprint_extra``.  So build the model with a
    fixed seed (``build_student(..., seed=...)``) for reruns to reuse it.

    ``branch_from``: a :func:`train_warmup` state (or a function returning one, called
    only if there is no checkpoint to reuse) of the *same* initial model, config and data.
    Training continues from its epoch instead of recomputing the epochs before it — exact
    when those epochs are the same for this objective (the warm-up, in which every
    distillation method is kd). The result, and so the fingerprint, are those of a run
    from scratch.
    Raises :class:`NonFiniteLossError` (no checkpoint written) on a NaN/inf loss.
    """
    objective = CrossEntropyObjective() if objective is None else objective
    fp, payload = ck.fingerprint_payload(model, splits, config, objective, name, fingerprint_extra)
    path = ck.checkpoint_path(ckpt_dir, name, fp) if ckpt_dir is not None else None
    if path is not None and path.exists() and not ck.retraining(path, name):
        stored = ck.load_checkpoint(path, model, expected_fingerprint=fp)
        model.to(torch.device(resolve_device(config.device)))
        logger.info("reused checkpoint %s", path.name)
        return _result(model, stored, path, True, fp)
    if callable(branch_from):  # computed only when training is needed
        branch_from = branch_from()
    state = _fit(model, splits, config, objective, name, start=branch_from, stop=config.epochs)
    if state["best_state"] is None:
        raise RuntimeError(f"{name}: no epoch after select_after={config.select_after} was kept")
    model.load_state_dict(state["best_state"])
    for h in state["history"]:
        h["best"] = h["epoch"] == state["best_epoch"]
    if path is not None:
        ck.save_model(path, name=name, fp=fp, payload=payload, config=config, state=state)
    return _result(model, state, path, False, fp)


def warmup_checkpoint(model: nn.Module, splits: dict, config: TrainConfig, objective, epochs: int, *,
                      ckpt_dir=None, name: str = "warmup", fingerprint_extra=None) -> tuple[str, Path | None]:
    """The fingerprint of :func:`train_warmup`'s call with these arguments and its file
    ``<ckpt_dir>/<name>-<fingerprint>.pt`` (None without ``ckpt_dir``), computed without
    training."""
    fp, _ = ck.fingerprint_payload(model, splits, config, objective, name,
                                   {"extra": fingerprint_extra, "warmup_epochs": epochs})
    return fp, ck.checkpoint_path(ckpt_dir, name, fp) if ckpt_dir is not None else None


def train_warmup(model: nn.Module, splits: dict, config: TrainConfig, objective, epochs: int, *,
                 ckpt_dir=None, name: str = "warmup", fingerprint_extra=None) -> dict:
    """The first ``epochs`` epochs of ``config``'s schedule (the cosine runs over all
    ``config.epochs``), as a state that :func:`train_model` branches from
    (``branch_from=``): model, optimiser, schedule and data-order generator, the
    history and weight rows so far, and the objective's ``state()`` (e.g. the Laplace
    factors of the last warm-up epoch). ``model`` is left at its initial weights.
    Cached as ``<ckpt_dir>/<name>-<fingerprint>.pt`` like a checkpoint."""
    if not 0 < epochs < config.epochs:
        raise ValueError(f"a warm-up of {epochs} epochs must lie in (0, {config.epochs})")
    fp, path = warmup_checkpoint(model, splits, config, objective, epochs, ckpt_dir=ckpt_dir,
                                 name=name, fingerprint_extra=fingerprint_extra)
    if path is not None and path.exists() and not ck.retraining(path, name):
        state = ck.load_checkpoint(path, expected_fingerprint=fp, fmt=ck.WARMUP_FORMAT)
        logger.info("reused checkpoint %s", path.name)
        return state
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = _fit(model, splits, config, objective, name, start=None, stop=epochs)
    model.load_state_dict(initial)
    state.update(format=ck.WARMUP_FORMAT, fingerprint=fp, run=ck.current_run())
    if path is not None:
        torch_save(path, state)
    return state


def _fit(model: nn.Module, splits: dict, cfg: TrainConfig, objective, name: str, *,
         start: dict | None, stop: int) -> dict:
    """Epochs ``[start epoch, stop)`` of ``cfg``'s schedule; returns the loop's state
    (plain values and tensors: a :func:`train_warmup` state when ``stop`` is early)."""
    from tqdm import tqdm  # text bars: no ipywidgets needed in notebooks

    train_ds, val_ds = splits["train"], splits["val"]
    dev = torch.device(resolve_device(cfg.device))
    amp = (dev.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    channels_last = use_channels_last(model, dev, cfg.channels_last)
    workers = _workers(cfg.num_workers, dev)

    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(model, cfg)
    forward = Forward(model, cfg.compile)
    n_train = len(train_ds)
    drop_last = n_train % cfg.batch_size == 1 and n_train > 1  # a batch of 1 breaks BatchNorm
    steps_per_epoch = n_train // cfg.batch_size if drop_last else math.ceil(n_train / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.lr_warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    n_groups = train_ds.n_groups
    train_counts = train_ds.group_counts()
    # the kept epoch: best on val select_on, ties broken by the other metric
    other = "avg_acc" if cfg.select_on == "worst_group_acc" else "worst_group_acc"

    history, weight_rows = [], []
    best_key, best_state, best_epoch, first = None, None, -1, 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["scheduler"])
        gen.set_state(start["generator"])
        history = [dict(h) for h in start["history"]]
        weight_rows = [dict(w) for w in start["weights"]]
        first = int(start["epoch"])
        if start.get("best_state") is not None:
            best_key, best_epoch = tuple(start["best_key"]), int(start["best_epoch"])
            best_state = start["best_state"]
        if hasattr(objective, "load_state"):
            objective.load_state(start.get("objective_state"), first)
    for epoch in range(first, stop):
        t0 = time.perf_counter()
        model.train()
        if hasattr(objective, "on_epoch_start"):
            objective.on_epoch_start(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct, seen = 0, 0
        w_n = torch.zeros(n_groups, dtype=torch.float64)
        w_sum = {}  # per weighted term ("ce", "kd") the objective returned this epoch
        batches = iterate_batches(train_ds, cfg.batch_size, shuffle=True, generator=gen,
                                  device=dev, num_workers=workers,
                                  pin_memory=dev.type == "cuda", drop_last=drop_last)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not cfg.progress)
        for step, batch in enumerate(bar):
            x = batch.x.contiguous(memory_format=torch.channels_last) if channels_last else batch.x
            with _autocast(dev, amp):
                out = forward(x)
                loss, weights = objective.loss(out, batch, epoch)
                if isinstance(out, StudentOutput) and cfg.exit_loss_weight:
                    loss = loss + cfg.exit_loss_weight * F.cross_entropy(
                        out.exit_logits.float(), batch.y)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"{name}: loss is {loss_value} at epoch {epoch + 1}, step {step + 1} "
                    f"(of {steps_per_epoch}); no checkpoint was written. Lower the learning "
                    f"rate (now {cfg.lr}) or check the objective/data for NaNs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            forward.done()
            bsz = len(batch.y)
            loss_sum += loss_value * bsz
            seen += bsz
            correct += int((final_logits(out).detach().argmax(1) == batch.y).sum())
            g = (batch.y * train_ds.n_attrs + batch.a).cpu()
            w_n += torch.bincount(g, minlength=n_groups).double()
            for term in ("ce", "kd"):
                w = (weights or {}).get(term)
                if w is not None:
                    w = torch.as_tensor(w).detach().double().cpu().expand(bsz)
                    w_sum.setdefault(term, torch.zeros(n_groups, dtype=torch.float64)).index_add_(0, g, w)
            if cfg.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
        objective.on_epoch_end(epoch)
        train_seconds = time.perf_counter() - t0  # the epoch's training, without validation

        for k in range(n_groups if w_sum else 0):
            weight_rows.append({"epoch": epoch + 1, "group": k, "n": int(w_n[k]), **{
                f"mean_weight_{t}": float(w_sum[t][k] / w_n[k]) if t in w_sum and w_n[k] else float("nan")
                for t in ("ce", "kd")}})
        ev = evaluate(model, val_ds, batch_size=cfg.eval_batch_size, device=dev, amp=amp,
                      train_group_counts=train_counts, forward=forward)
        row = {"epoch": epoch + 1, "lr": float(sched.get_last_lr()[0]),
               "train_loss": float(loss_sum / max(seen, 1)), "train_acc": correct / max(seen, 1),
               **{f"val_{k}": float(v) for k, v in ev.items()},
               # e.g. how far Laplace-KD's weights are from DeDiER's
               **(objective.epoch_stats(epoch) if hasattr(objective, "epoch_stats") else {}),
               "train_seconds": train_seconds, "seconds": time.perf_counter() - t0}
        history.append(row)
        logger.info("%s epoch %d/%d loss %.3f val wga %.3f avg %.3f (%.1f s)", name, epoch + 1,
                    cfg.epochs, row["train_loss"], row["val_worst_group_acc"], row["val_avg_acc"],
                    row["seconds"])
        key = (row[f"val_{cfg.select_on}"], row[f"val_{other}"])
        if epoch + 1 > cfg.select_after and (best_key is None or key > best_key):
            best_key, best_epoch = key, epoch + 1
            best_state = _cpu(model.state_dict())

    return {"epoch": stop, "model": {k: v.contiguous() for k, v in _cpu(model.state_dict()).items()},
            "optimizer": _cpu(opt.state_dict()), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "history": history, "weights": weight_rows,
            "best_key": list(best_key) if best_key else None,
            "best_epoch": best_epoch, "best_state": best_state,
            "objective_state": objective.state() if hasattr(objective, "state") else None}


def _cpu(obj):
    """A state dict's tensors on the CPU (for saving a branch point)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _result(model: nn.Module, state: dict, path, reused: bool, fp: str) -> TrainResult:
    """The result of a checkpoint read back or of a finished :func:`_fit` state."""
    weights = pd.DataFrame(list(state.get("weights", [])), columns=list(WEIGHT_COLUMNS))
    return TrainResult(model, pd.DataFrame(state["history"]), weights, path, reused, fp,
                       int(state["best_epoch"]))
