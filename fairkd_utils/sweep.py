"""The hyper-parameter sweep on validation worst-group accuracy: kd's lam and T
once, then each reweighting method's beta (and JTT's epochs and upweight) at kd's
choice, averaged over seeds; the choice is written whole as ``sweep/hparams.json``."""

from __future__ import annotations
import itertools
import pandas as pd
from . import losses, metrics, records, train
from .profiles import SWEPT_HPARAMS
from .rundir import Run
from .students import train_student
from .teacher import load_teacher_logits


#: One grid for every method: lam and T are chosen once, for kd, and shared by every
#: distillation method; beta is chosen per reweighting method (profiles.SWEPT_HPARAMS)
#: on the same grid, at kd's lam and T; jtt's identification epochs and lambda_up
#: likewise (profiles.SWEPT_HPARAMS). laplace_kd's score is the study's form (the
#: Laplace margin), not swept.
SWEEP_GRID = {"lam": (0.5, 0.9, 0.95), "T": (2.0, 4.0, 8.0), "beta": (1.0, 2.0, 4.0),
              "jtt_epochs": (1, 2, 3), "jtt_upweight": (5.0, 20.0, 100.0)}


def sweep_configs(run: Run, method: str, lam_T: dict | None = None) -> list:
    """The configurations the sweep tries for ``method``: kd's lam x T grid, or, at
    ``lam_T`` (kd's choice), the grid of the method's own swept hyper-parameters
    (``profiles.SWEPT_HPARAMS``: beta, or jtt's identification epochs x lambda_up)."""
    base = losses.default_config(method, warmup_epochs=run.profile.warmup_epochs)
    swept = {"kd": ("lam", "T"), **SWEPT_HPARAMS}
    if method not in swept:
        raise ValueError(f"the sweep chooses kd's lam and T and the hyper-parameters of "
                         f"{list(SWEPT_HPARAMS)}; {method!r} borrows its hyper-parameters")
    names = swept[method]
    return [base.replace(**{**(lam_T or {}), **dict(zip(names, values))})
            for values in itertools.product(*(SWEEP_GRID[n] for n in names))]


def sweep_row(run: Run, cfg, seed: int, teacher=None) -> dict:
    """Train (or reuse) one sweep student into ``<run_dir>/sweep/checkpoints/`` and
    return its row of ``sweep.csv``: validation worst-group and average accuracy, and
    every field the sweep chooses (lam, T, beta, score and the method's own)."""
    result = train_student(run, cfg, seed, teacher, ckpt_dir=run.path("sweep", "checkpoints"),
                           progress=False)
    val = run.splits()["val"]
    p = train.predict(result.model, val, device=run.device)
    s = metrics.summarize(p.probs, p.y, p.g, val.n_groups)
    return {"method": cfg.method, "config_id": cfg.config_id, "seed": seed,
            **{f: getattr(cfg, f) for f in _sweep_fields(cfg.method)},
            "val_worst_group_acc": s["worst_group_acc"], "val_avg_acc": s["avg_acc"],
            "reused": result.reused}


def _sweep_fields(method: str) -> list:
    """The columns of sweep.csv every sweep has, then the method's own swept fields."""
    return list(dict.fromkeys(("lam", "T", "beta", "score") + SWEPT_HPARAMS.get(method, ())))


def sweep(run: Run, seeds, teacher=None, methods=None, lam_T: dict | None = None, evaluate=None):
    """Choose the hyper-parameters on **validation** worst-group accuracy averaged
    over ``seeds`` (ties: validation average accuracy); test is never looked at.

    First kd's lam and T over the grid (or, with ``lam_T``, those given: kd's earlier
    choice, so that only the rest is swept); then, at those, the hyper-parameters of
    every method in ``methods`` that has its own (``profiles.SWEPT_HPARAMS``: beta;
    jtt's identification epochs and lambda_up). Students train into
    ``<run_dir>/sweep/``. Writes ``sweep/sweep.csv`` (one row per configuration and
    seed) and, whole, ``sweep/hparams.json`` — every field the methods read (lam, T,
    beta, score, jtt's) — which notebook 05 reads through its ``hparams_file``
    parameter. Returns (table, chosen).

    ``evaluate(method, pairs)``: the rows (:func:`sweep_row`) of the ``(config, seed)``
    pairs, in order; by default trained here one after another (``jobs.run_sweep``
    passes one that runs them as jobs)."""
    if len(seeds) < 2:
        raise ValueError(f"the sweep averages over at least two seeds, got {list(seeds)}")
    out = run.path("sweep")
    out.mkdir(parents=True, exist_ok=True)
    teacher = teacher or load_teacher_logits(run)
    evaluate = evaluate or (lambda method, pairs: [sweep_row(run, cfg, seed, teacher) for cfg, seed in pairs])
    rows = []

    def choose(method, configs):
        rows.extend(evaluate(method, [(cfg, seed) for cfg in configs for seed in seeds]))
        table = pd.DataFrame(rows)
        mine = table[table.method == method]
        means = mine.groupby(["config_id", *_sweep_fields(method)], as_index=False, sort=False)[
            ["val_worst_group_acc", "val_avg_acc"]].mean()
        return means.sort_values(["val_worst_group_acc", "val_avg_acc"],
                                 ascending=False, kind="stable").iloc[0]

    given = lam_T is not None
    lam_T = lam_T if given else choose("kd", sweep_configs(run, "kd"))
    lam_T = {"lam": float(lam_T["lam"]), "T": float(lam_T["T"])}
    how = (f"kd's lam and T given ({lam_T}, an earlier sweep's choice)" if given else
           f"kd's lam x T over {list(SWEEP_GRID['lam'])} x {list(SWEEP_GRID['T'])}")
    chosen = {"kd": lam_T}
    swept = [m for m in SWEPT_HPARAMS if methods is None or m in methods]
    for method in swept:
        best = choose(method, sweep_configs(run, method, lam_T))
        chosen[method] = {n: (int(best[n]) if n == "jtt_epochs" else float(best[n]))
                          for n in SWEPT_HPARAMS[method]}
        if method == "laplace_kd":
            chosen[method]["score"] = str(best["score"])
    table = pd.DataFrame(rows)
    records.write_csv(out / "sweep.csv", table)
    grids = "; ".join(f"{m}: " + " x ".join(f"{n} {list(SWEEP_GRID[n])}" for n in SWEPT_HPARAMS[m])
                      for m in swept if SWEPT_HPARAMS[m] != ("beta",))
    comment = (f"Chosen by the sweep of notebook 05 on validation worst-group accuracy averaged "
               f"over seeds {list(seeds)} (ties: validation average accuracy), never on test: "
               f"{how}, shared by every distillation method; then beta over "
               f"{list(SWEEP_GRID['beta'])} per method at those lam and T"
               + (f" ({grids})" if grids else "") + ". Table: sweep/sweep.csv.")
    records.write_json(out / "hparams.json", {run.name: {"_comment": comment, **chosen}})
    return table, chosen
