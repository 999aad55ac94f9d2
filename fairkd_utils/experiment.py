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
#: Goes into every checkpoint fingerprint: bump it when a change to the library
#: changes what training produces, so old checkpoints are not silently reused.
STUDY_VERSION = 1


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

    def fingerprint_extra(self) -> dict:
        """What identifies this run's data and code in checkpoint fingerprints."""
        return self.keys(data_root=self.data_root, study_version=STUDY_VERSION)


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


# --------------------------------------------------------------------------- teacher
#: One teacher per (dataset, profile), shared by all student seeds.
TEACHER_SEED = 0
TEACHER_LOGITS = "teacher_logits.pt"


def _n_classes(run: Run) -> int:
    return run.splits()["train"].n_classes


def train_config(run: Run, role: str, seed: int, **overrides):
    from . import train

    if role == "student":
        # Never keep a warm-up epoch: there every reweighting method is still kd.
        overrides.setdefault("select_after", run.profile.warmup_epochs)
    return train.TrainConfig.from_profile(run.profile, role, seed=seed, device=run.device,
                                          **overrides)


def train_teacher(run: Run, weights_path=None):
    """Train the ERM teacher, or reuse its checkpoint (same fingerprint)."""
    from . import models, train

    model = models.build_teacher(run.profile, _n_classes(run), weights_path, seed=TEACHER_SEED)
    config = train_config(run, "teacher", TEACHER_SEED, select_on=run.profile.teacher_select_on)
    return train.train_model(model, run.splits(), config,
                             train.ERMObjective(), ckpt_dir=run.path("checkpoints"),
                             name="teacher", fingerprint_extra=run.fingerprint_extra())


def save_teacher_logits(run: Run, result) -> dict:
    """Teacher logits on every split (eval mode, no augmentation), saved atomically
    with the teacher's fingerprint so students can check what they distil from."""
    from . import train

    from .train import _describe_data

    out = {"fingerprint": result.fingerprint,
           "train_data": str(_describe_data(run.splits()["train"]))}
    for split, ds in run.splits().items():
        out[split] = train.predict(result.model, ds, device=run.device).logits
    records.torch_save(run.path(TEACHER_LOGITS), out)
    return out


def load_teacher_logits(run: Run) -> dict:
    import torch

    from .train import _describe_data

    path = require(run, TEACHER_LOGITS, "02_teacher")
    logits = torch.load(path, map_location="cpu", weights_only=True)
    if logits.get("train_data") != str(_describe_data(run.splits()["train"])):
        raise ValueError(f"{path} holds the logits of a teacher trained on other data "
                         "(another --data-root or data version): rerun notebook 02_teacher")
    return logits


# --------------------------------------------------------------------------- students
HPARAMS_FILE = Path(__file__).with_name("hparams.json")


def method_config(run: Run, method: str):
    """The method's hyper-parameters: the committed choice for this run's
    ``<dataset>-<profile>`` (or ``synthetic-default`` as the fallback) from
    ``fairkd_utils/hparams.json`` over the library defaults, with the profile's
    warm-up (the same for every method)."""
    import json

    from . import losses

    table, _ = hparams_source(run)
    overrides = dict(table.get(method, {}))
    overrides["warmup_epochs"] = run.profile.warmup_epochs
    try:
        return losses.default_config(method, **overrides)
    except TypeError as err:
        raise ValueError(f"{HPARAMS_FILE}: bad entry for {method!r} ({err}); valid fields are "
                         f"{sorted(losses.MethodConfig.__dataclass_fields__)}") from None


def hparams_source(run: Run) -> tuple[dict, str]:
    """The committed hyper-parameter table that applies to ``run`` and where it came from."""
    import json

    from .profiles import METHODS

    if not HPARAMS_FILE.exists():
        return {}, "library defaults (no fairkd_utils/hparams.json)"
    chosen = json.loads(HPARAMS_FILE.read_text())
    key = run.name if run.name in chosen else "synthetic-default"
    table = chosen.get(key)
    if table is None:
        return {}, f"library defaults ({HPARAMS_FILE.name} has no entry for {run.name})"
    unknown = sorted(set(table) - set(METHODS) - {"_comment"})
    if unknown:
        raise ValueError(f"{HPARAMS_FILE}: unknown methods {unknown} under {key!r}; "
                         f"valid ones are {list(METHODS)}")
    return {k: v for k, v in table.items() if k != "_comment"}, f"{HPARAMS_FILE.name}[{key!r}]"


def train_student(run: Run, config, seed: int, teacher=None, ckpt_dir=None, progress: bool = True):
    """Train (or reuse) one student with its early exit under ``config``.

    Every method starts from the same initialisation for a given seed. ``teacher``:
    the dict of :func:`load_teacher_logits` (needed when ``config.lam > 0``).
    With training augmentation (``paper`` profile) the teacher model itself is run
    on each augmented batch instead of the cached logits."""
    from . import losses, models, train

    splits = run.splits()
    ds = splits["train"]
    model = models.build_student(run.profile, ds.n_classes, seed=seed)
    teacher_train = None
    if config.lam > 0:
        if run.profile.augment:
            tres = train_teacher(run)
            teacher_train = losses.OnlineTeacher(tres.model.eval(), fingerprint=tres.fingerprint)
        else:
            teacher_train = (teacher or load_teacher_logits(run))["train"]
    objective = losses.make_objective(config, teacher_logits=teacher_train,
                                      group_counts=ds.group_counts(), n_train=len(ds),
                                      n_classes=ds.n_classes, model=model, seed=seed)
    return train.train_model(model, splits, train_config(run, "student", seed, progress=progress), objective,
                             ckpt_dir=ckpt_dir or run.path("checkpoints"),
                             name=f"student-{config.method}-seed{seed}",
                             fingerprint_extra=run.fingerprint_extra())


# --------------------------------------------------------------------------- records
def _record_name(model: str, method: str, config_id: str, seed: int, predictive: str, split: str) -> str:
    return f"{model}-{method}-{config_id}-seed{seed}-{predictive}-{split}"


def prediction_frame(probs, ds, *, keys: dict, weight=None, variance=None):
    """Per-instance rows of ``predictions.csv`` for one model on one split."""
    import numpy as np
    import pandas as pd

    from . import losses

    probs = probs.double()
    pred = probs.argmax(1)
    n = len(ds)
    df = pd.DataFrame({
        "id": list(ds.ids), "split": ds.split, "group": ds.g.numpy(), "y": ds.y.numpy(),
        "seed": keys["seed"], "model": keys["model"], "method": keys["method"],
        "config_id": keys["config_id"], "predictive": keys["predictive"],
        "prob": probs.max(1).values.numpy(), "margin": losses.confidence_margin(probs).numpy(),
        "correct": (pred == ds.y).numpy(),
        "weight": np.full(n, np.nan) if weight is None else np.asarray(weight, dtype=float),
        "variance": np.full(n, np.nan) if variance is None else np.asarray(variance, dtype=float),
    })
    return df


def record(run: Run, probs, ds, *, model: str, method: str, seed: int, config_id: str,
           predictive: str = "map", weight=None, variance=None, predictions: bool = True) -> list[dict]:
    """Write this model's metrics (per group and overall) and, optionally, its
    per-instance predictions on ``ds`` as record files of their own."""
    from . import metrics

    keys = dict(seed=seed, config_id=config_id, model=model, method=method,
                predictive=predictive, split=ds.split)
    rows = metrics.metric_rows(probs, ds.y, ds.g, ds.group_names, **run.keys(**keys))
    name = _record_name(model, method, config_id, seed, predictive, ds.split)
    records.write_record(run.run_dir, "metrics", name, rows)
    if predictions:
        records.write_record(run.run_dir, "predictions", name,
                             prediction_frame(probs, ds, keys=keys, weight=weight, variance=variance))
    return rows


def evaluate_student(run: Run, result, config, seed: int, splits=("val", "test")) -> dict:
    """Record the student's final head and its exit on ``splits`` (predictions on
    test only, to keep ``predictions.csv`` small); return the raw predictions."""
    from . import train

    preds = {}
    for split in splits:
        ds = run.splits()[split]
        p = train.predict(result.model, ds, device=run.device)
        preds[split] = p
        for model_name, probs in (("student", p.probs), ("exit", p.exit_probs)):
            record(run, probs, ds, model=model_name, method=config.method, seed=seed,
                   config_id=config.config_id, predictions=(split == "test"))
    return preds


def record_weights(run: Run, result, config, seed: int):
    """The per-epoch mean instance weight per group, tidy, as its own record."""
    import pandas as pd

    w = result.weights
    if w is None or not len(w):
        return pd.DataFrame()
    names = run.splits()["train"].group_names
    tidy = w.melt(id_vars=["epoch", "group", "n"], value_vars=["mean_weight_ce", "mean_weight_kd"],
                  var_name="term", value_name="weight")
    tidy["term"] = tidy["term"].str.replace("mean_weight_", "", regex=False)
    tidy.insert(0, "method", config.method)
    tidy.insert(0, "seed", seed)
    tidy.insert(2, "config_id", config.config_id)
    tidy["group_name"] = [names[g] for g in tidy["group"]]
    records.write_record(run.run_dir, "weights", f"{config.method}-{config.config_id}-seed{seed}", tidy)
    return tidy


def minority_groups(train_counts) -> list[int]:
    """Groups with fewer than half the mean training-group size (Waterbirds: the two
    background-mismatched groups; CelebA: blond men)."""
    import numpy as np

    counts = np.asarray(train_counts, dtype=float)
    return [int(k) for k in np.flatnonzero(counts < 0.5 * counts.mean())]


def exit_frame(pred, ds) -> "pd.DataFrame":
    """Per-instance exit confidence, margin and correctness on ``ds`` (for figures)."""
    import pandas as pd

    from . import losses

    probs = pred.exit_probs
    return pd.DataFrame({
        "group": ds.g.numpy(), "group_name": [ds.group_names[k] for k in ds.g.tolist()],
        "prob": probs.max(1).values.numpy(), "margin": losses.confidence_margin(probs).numpy(),
        "correct": (probs.argmax(1) == ds.y).numpy(),
    })


def erm_outputs(run: Run, seed: int, splits=("train", "val", "test")) -> tuple:
    """The ERM student of notebook 03 (reused, never retrained here) and its
    predictions (logits, exit logits, phi) on ``splits``."""
    from . import train

    config = method_config(run, "erm")
    require(run, f"records/metrics/{_record_name('student', 'erm', config.config_id, seed, 'map', 'test')}.csv",
            "03_early_exit_student")
    result = train_student(run, config, seed)
    if not result.reused:
        raise FileNotFoundError(f"the ERM student of seed {seed} was not found (its checkpoint is "
                                "missing or from another configuration): rerun notebook "
                                "03_early_exit_student")
    return result, {s: train.predict(result.model, run.splits()[s], device=run.device) for s in splits}


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U,
    ties counted one half); NaN when a class is absent. Direction as given: no
    ``max(AUC, 1 - AUC)``."""
    import numpy as np
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


#: Scores that may single out hard instances, each oriented so that *larger* means
#: "upweight"; the expected direction (AUROC > 0.5) is stated in notebook 04.
SCORES = ("dedier_map_margin", "laplace_margin", "laplace_entropy", "laplace_variance")


def hardness_scores(map_probs, lap, y) -> dict:
    """The candidate scores per instance: DeDiER's ``cm·α`` of the MAP exit,
    the same from the Laplace predictive ``lap``, Laplace entropy and logit variance."""
    from . import losses

    wrong_map = (map_probs.argmax(1) != y).double()
    wrong_lap = (lap.probs.argmax(1) != y).double()
    return {
        "dedier_map_margin": (losses.confidence_margin(map_probs.double()) * wrong_map).numpy(),
        "laplace_margin": (lap.margin.double() * wrong_lap).numpy(),
        "laplace_entropy": lap.entropy.double().numpy(),
        "laplace_variance": lap.variance.double().numpy(),
    }


# --------------------------------------------------------------------------- distillation
REWEIGHTING = ("dedier", "dedier_both", "laplace_kd", "group_balanced")


def final_train_weights(run: Run, result, config, pred=None):
    """The instance weights the method assigns on the training split with the final
    student (before batch normalisation): what the weight-distribution figures show.
    ``None`` for methods that do not reweight."""
    import torch

    from . import losses, train
    from .exit_laplace import fit_exit_laplace

    ds = run.splits()["train"]
    if config.method not in REWEIGHTING:
        return None
    if config.method == "group_balanced":
        return losses.group_balanced_weight(ds.g, ds.group_counts())
    p = pred if pred is not None else train.predict(result.model, ds, device=run.device)
    if config.method in ("dedier", "dedier_both"):
        return losses.dedier_weight(p.exit_logits.double(), ds.y, config.beta, config.alpha)
    la = fit_exit_laplace(result.model.exit, p.phi.double(), p.exit_probs, y=ds.y,
                          prior=config.prior, tau=config.tau)
    pred = la.predict(p.phi.double(), generator=torch.Generator().manual_seed(0))
    return losses.laplace_weight(pred, ds.y, config.beta, config.score, config.alpha)


def run_method(run: Run, method: str, seed: int, teacher=None, config=None, progress: bool = False):
    """Train or reuse one student and write all its records (metrics, test
    predictions, per-epoch weights, final training weights). ``progress``: the
    per-epoch bars (off by default: the caller shows one bar over students)."""
    from . import train

    config = config or method_config(run, method)
    result = train_student(run, config, seed, teacher, progress=progress)
    evaluate_student(run, result, config, seed)
    record_weights(run, result, config, seed)
    if config.method in REWEIGHTING:
        ds = run.splits()["train"]
        p = train.predict(result.model, ds, device=run.device)
        w = final_train_weights(run, result, config, pred=p)
        keys = dict(seed=seed, config_id=config.config_id, model="exit", method=config.method,
                    predictive="map")
        records.write_record(run.run_dir, "predictions",
                             _record_name("exit", config.method, config.config_id, seed, "map", "train"),
                             prediction_frame(p.exit_probs, ds, keys=keys, weight=w.numpy()))
    return result


# --------------------------------------------------------------------------- summary
SUMMARY_METRICS = ("worst_group_acc", "avg_acc", "train_weighted_acc", "group_gap", "ece")


def per_seed_metrics(metrics, groups, model: str = "student", split: str = "test"):
    """One row per (method, config_id, seed): the study's scalar metrics of
    ``model`` on ``split``, from ``metrics.csv`` and ``groups.csv`` alone."""
    import pandas as pd

    from . import metrics as M

    m = metrics[(metrics.model == model) & (metrics.split == split) & (metrics.predictive == "map")]
    train_n = groups[groups.split == "train"].set_index("group_name")["n"]
    rows = []
    for (method, cid, seed), d in m.groupby(["method", "config_id", "seed"], sort=True):
        overall = d[d.group_name == "all"]
        acc = d[d.group_name != "all"].set_index("group_name")["acc"]
        counts = train_n.reindex(acc.index).to_numpy(dtype=float)
        rows.append({"method": method, "config_id": cid, "seed": int(seed),
                     "worst_group_acc": M.worst_group_acc(acc), "avg_acc": float(overall["acc"].iloc[0]),
                     "train_weighted_acc": M.train_weighted_acc(acc.to_numpy(), counts),
                     "group_gap": M.group_gap(acc), "ece": float(overall["ece"].iloc[0])})
    return pd.DataFrame(rows)


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the Student-t interval of the mean."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(np.mean(v))
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(np.std(v, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    return mean, sd, mean - half, mean + half


def summary_table(per_seed, baseline: str = "kd"):
    """``summary.csv``: per (method, config_id, metric) the mean, std and 95 %
    interval over seeds, and the paired per-seed difference against ``baseline``
    (same seed), with its own interval."""
    import pandas as pd

    base = per_seed[per_seed.method == baseline]
    if base.config_id.nunique() > 1:
        raise ValueError(f"{baseline} has several configurations {sorted(base.config_id.unique())}: "
                         "filter per_seed to the chosen configurations first")
    base = base.set_index("seed") if len(base) else None
    rows = []
    for (method, cid), d in per_seed.groupby(["method", "config_id"], sort=False):
        d = d.set_index("seed")
        for metric in SUMMARY_METRICS:
            mean, sd, lo, hi = mean_interval(d[metric])
            row = {"method": method, "config_id": cid, "metric": metric, "n_seeds": len(d),
                   "mean": mean, "std": sd, "ci95_lo": lo, "ci95_hi": hi}
            if base is not None and method != baseline:
                common = d.index.intersection(base.index)
                diff = d.loc[common, metric] - base.loc[common, metric]
                dm, dsd, dlo, dhi = mean_interval(diff) if len(diff) else (float("nan"),) * 4
                row.update({f"diff_vs_{baseline}_mean": dm, f"diff_vs_{baseline}_std": dsd,
                            f"diff_vs_{baseline}_ci95_lo": dlo, f"diff_vs_{baseline}_ci95_hi": dhi,
                            "paired_seeds": len(common)})
            rows.append(row)
    order = {m: i for i, m in enumerate(("erm", "kd", "dedier", "dedier_both", "laplace_kd", "group_balanced"))}
    out = pd.DataFrame(rows)
    return out.sort_values(["metric", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
                           kind="stable").reset_index(drop=True)


def paired_differences(per_seed, metric: str = "worst_group_acc", baseline: str = "kd"):
    """Per-seed differences against ``baseline`` with the interval of their mean."""
    import pandas as pd

    base = per_seed[per_seed.method == baseline].set_index("seed")[metric]
    rows = []
    for method, d in per_seed[per_seed.method != baseline].groupby("method"):
        diff = d.set_index("seed")[metric] - base
        diff = diff.dropna()
        _, _, lo, hi = mean_interval(diff)
        rows += [{"method": method, "seed": s, "diff": v, "lo": lo, "hi": hi} for s, v in diff.items()]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- sweep
#: The same grid for every distillation method (kd has no beta); laplace_kd's score
#: is decided by notebook 04, not swept, so all reweighting methods get equal grids.
SWEEP_GRID = {"lam": (0.5, 0.9), "T": (2.0, 4.0), "beta": (1.0, 3.0)}


def sweep_configs(run: Run, method: str) -> list:
    """The configurations a sweep tries for ``method`` (erm has none)."""
    import itertools

    base = method_config(run, method)
    if method == "erm":
        return [base]
    betas = SWEEP_GRID["beta"] if method in ("dedier", "dedier_both", "laplace_kd") else (base.beta,)
    return [base.replace(lam=lam, T=T, beta=beta)
            for lam, T, beta in itertools.product(SWEEP_GRID["lam"], SWEEP_GRID["T"], betas)]


def sweep(run: Run, methods, seed: int, teacher=None):
    """Train every grid configuration of ``methods`` on one seed into
    ``<run_dir>/sweep/`` and pick, per method, the best validation worst-group
    accuracy (ties: validation average accuracy). Test is never looked at."""
    import dataclasses

    import pandas as pd

    from . import metrics as M
    from . import train

    sub = dataclasses.replace(run, run_dir=run.path("sweep"))
    sub.run_dir.mkdir(parents=True, exist_ok=True)
    teacher = teacher or load_teacher_logits(run)
    rows = []
    val = run.splits()["val"]
    for method in methods:
        for cfg in sweep_configs(run, method):
            result = train_student(run, cfg, seed, teacher, ckpt_dir=sub.path("checkpoints"),
                                   progress=False)
            p = train.predict(result.model, val, device=run.device)
            s = M.summarize(p.probs, p.y, p.g, val.n_groups)
            rows.append({"method": method, "config_id": cfg.config_id, "seed": seed,
                         **{k: v for k, v in cfg.to_dict().items() if k in ("lam", "T", "beta", "score")},
                         "val_worst_group_acc": s["worst_group_acc"], "val_avg_acc": s["avg_acc"]})
    table = pd.DataFrame(rows)
    records.write_csv(sub.path("sweep.csv"), table)
    best = (table.sort_values(["method", "val_worst_group_acc", "val_avg_acc"], ascending=[True, False, False])
            .groupby("method").head(1))
    chosen = {r.method: {"lam": r.lam, "T": r.T, "beta": r.beta} for r in best.itertuples()}
    records.write_json(sub.path("hparams_chosen.json"), {run.name: chosen})
    return table, chosen
