"""Distillation losses, per-instance weights and the training objective of every
method (README, "The maths").

Student loss over a batch, per instance i::

    L = mean_i[(1-lam) * w_ce_i * CE(s_i, y_i) + lam * w_kd_i * T^2 * KL(softmax(t_i/T) || softmax(s_i/T))]

Weights never carry gradient, start after the same warm-up (epochs 0 ..
warmup_epochs-1, counted from 0 as the loop passes them, use unit weights) for every
reweighting method and are normalised to mean 1 over the batch by default
(``MethodConfig.normalise``, the same for every method).

The pure functions come first, then ``MethodConfig`` with ``DEFAULT_HPARAMS``, then
one table, :data:`WEIGHTS`, from a method's weight source
(``profiles.METHOD_SPECS[method].weight``) to its raw weight, dispatched by
:func:`instance_weight` for training and for the figures alike (Laplace-KD's source
is stateful: ``laplace_source.LaplaceSource``); last the one training :class:`Objective` and its
factories ``make_objective`` and ``warmup_objective``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .profiles import (ALPHAS, LAPLACE_PRIORS, LAPLACE_SCORES, METHOD_SPECS, METHODS,
                       WEIGHTED_TERMS)

if TYPE_CHECKING:  # laplace_source imports this module: it is imported where it is used
    from .laplace_source import LaplaceSource


# -------------------------------------------------------------------------- pure functions

def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Hinton's distillation term per instance, ``T^2 * KL(softmax(t/T) || softmax(s/T))``
    (the ``T^2`` keeps the gradient's scale independent of T): a (B,) tensor, gradient to
    the student only."""
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / T, dim=-1)
    return (T * T) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def confidence_margin(probs: Tensor) -> Tensor:
    """``p_max - max_{k != argmax} p_k`` per row of a (B, C) probability matrix."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _margin_score(probs: Tensor, cm: Tensor, y: Tensor, alpha: str) -> Tensor:
    """``u = cm * alpha``: alpha is 1 where the readout is wrong else 0 (``"wrong"``),
    or +1/-1 (``"signed"``)."""
    wrong = (probs.argmax(-1) != y.to(probs.device)).to(torch.get_default_dtype())
    if alpha not in ALPHAS:
        raise ValueError(f"unknown alpha {alpha!r}; choose one of {list(ALPHAS)}")
    return cm * (wrong if alpha == "wrong" else wrong * 2.0 - 1.0).to(cm)


@torch.no_grad()
def dedier_weight(readout_logits: Tensor, y: Tensor, beta: float, alpha: str = "wrong") -> Tensor:
    """DeDiER's weight ``exp(beta * u)`` with ``u = cm * alpha`` of an early readout's
    MAP softmax: its confidence margin where it is wrong (``alpha="wrong"``: 0 where
    right; ``"signed"``: ``-cm`` where right). A confidently wrong readout gets
    ``exp(beta * cm)``, a right one 1. No gradient; not normalised (see ``normalise``)."""
    probs = F.softmax(_full(readout_logits), dim=-1)
    return torch.exp(beta * _margin_score(probs, confidence_margin(probs), y, alpha))


@torch.no_grad()
def laplace_score(pred: Any, y: Tensor, score: str = "margin", alpha: str = "wrong") -> Tensor:
    """Laplace-KD's score ``u`` in [0, 1] from the exit's Laplace predictive (an
    ``exit_laplace.LaplacePrediction``: ``probs``, ``margin``, ``entropy``, ``variance``), one per
    instance; the weight is ``exp(beta * u)`` (:func:`laplace_weight`),
    so ``beta`` bounds the log-ratio between the most and least weighted
    instance identically for every score and for DeDiER:

    * ``margin``: ``u = cm * alpha`` with the predictive's margin and
      correctness, exactly DeDiER's form with the Laplace predictive in place
      of the MAP softmax (``alpha`` as in ``dedier_weight``).
    * ``entropy``: ``u = H(p) / log C``, the predictive entropy as a fraction of its
      maximum (0 = certain, 1 = uniform): needs no reference, comparable across C.
    * ``variance``: ``u = v / (v + v_ref)`` with ``v`` the variance of the top-2 logit
      difference and ``v_ref`` the batch's mean variance: scale-free (the variance has no
      maximum and shrinks like 1/N_train, so a fixed map would make ``beta`` mean
      something different per dataset), bounded, monotone, and 1/2 at the reference.

    ``entropy`` and ``variance`` use no label: they upweight uncertain
    instances, right or wrong; ``alpha`` applies to ``margin`` only.
    """
    if score not in LAPLACE_SCORES:
        raise ValueError(f"unknown Laplace score {score!r}; choose one of {list(LAPLACE_SCORES)}")
    probs = pred.probs.detach()
    if score == "margin":
        return _margin_score(probs, pred.margin.detach(), y, alpha)
    if score == "entropy":
        return pred.entropy.detach() / math.log(probs.shape[-1])
    v = pred.variance.detach().clamp_min(0)
    return v / (v + v.mean()).clamp_min(torch.finfo(v.dtype).tiny)


@torch.no_grad()
def laplace_weight(pred: Any, y: Tensor, beta: float, score: str = "margin",
                   alpha: str = "wrong") -> Tensor:
    """Laplace-KD's weight ``exp(beta * u)`` with ``u`` = :func:`laplace_score`; with
    ``score="margin"`` exactly DeDiER's form, the Laplace predictive in place of the
    MAP softmax."""
    return torch.exp(beta * laplace_score(pred, y, score, alpha))


def group_balanced_weight(g: Tensor, group_counts: Tensor) -> Tensor:
    """Inverse frequency of each instance's true group, normalised so that the
    weights' mean over the training set is 1: ``w_g = N / (G * n_g)`` with G the
    number of non-empty groups. Groups absent from training get weight 0."""
    counts = torch.as_tensor(group_counts, dtype=torch.float64)
    present = counts > 0
    per_group = torch.zeros_like(counts)
    per_group[present] = counts.sum() / (present.sum() * counts[present])
    return per_group.to(g.device)[g].to(torch.get_default_dtype())


def jtt_weight(error_set: Tensor, upweight: float) -> Tensor:
    """JTT's weight (Liu et al., ICML 2021): ``upweight`` (lambda_up) on the instances of
    the error set (those an ERM identification model gets wrong), 1 elsewhere.

    JTT *upsamples* the error set lambda_up times; weighting gives the same expected
    loss: upsampling's epoch mean ``sum_i c_i l_i / sum_i c_i`` (``c_i`` = lambda_up on the
    error set, else 1) is the weighted loss normalised by the weights' training-set mean
    (per batch: up to the batch's estimate of it). No gradient; not normalised."""
    if not (upweight >= 1 and math.isfinite(upweight)):
        raise ValueError(f"JTT's upweight (lambda_up) must be a finite number >= 1, got {upweight}")
    err = torch.as_tensor(error_set).bool()
    return torch.where(err, torch.full(err.shape, float(upweight)), torch.ones(err.shape))


def _float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it came in half precision (autocast), else as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _full(t: Tensor) -> Tensor:
    """Detached, and float32 if it came in half precision (autocast)."""
    return _float32(t.detach())


def normalise(w: Tensor) -> Tensor:
    """``w / mean(w)`` over the batch, detached: weights carry no gradient."""
    w = w.detach()
    return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)


def hardness_scores(map_probs: Tensor, lap: Any, y: Tensor) -> dict:
    """The candidate scores of notebook 04 per instance (``dedier_map_margin``,
    ``laplace_margin``, ``laplace_entropy``, ``laplace_variance``),
    each the ``u`` a weight ``exp(beta * u)`` would use: DeDiER's ``cm * alpha`` of the
    MAP exit, and the Laplace-KD scores (:func:`laplace_score`) margin, entropy and
    variance of the Laplace predictive ``lap``."""
    probs = map_probs.double()
    return {
        "dedier_map_margin": _margin_score(probs, confidence_margin(probs), y, "wrong").numpy(),
        **{f"laplace_{score}": laplace_score(lap, y, score).double().numpy()
           for score in LAPLACE_SCORES},
    }


def student_loss(logits: Tensor, y: Tensor, teacher_logits: Tensor | None = None,
                 w_ce: Tensor | None = None, w_kd: Tensor | None = None,
                 lam: float = 0.0, T: float = 1.0) -> Tensor:
    """``mean_i[(1-lam) w_ce_i CE(s_i, y_i) + lam w_kd_i T^2 KL(t_i || s_i)]`` (README, "The maths").

    ``lam = 0`` is plain cross-entropy and needs no teacher; ``None`` weights
    are 1. Weights are detached here, so they never carry gradient.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    per = logits.new_zeros(logits.shape[0])
    if lam < 1.0:
        ce = F.cross_entropy(logits, y, reduction="none")
        per = per + (1.0 - lam) * (ce if w_ce is None else w_ce.detach().to(ce) * ce)
    if lam > 0.0:
        if teacher_logits is None:
            raise ValueError("lam > 0 needs teacher_logits (the distillation term); "
                             "pass the teacher's logits for the batch or use lam=0")
        kd = kd_loss(logits, teacher_logits, T)
        per = per + lam * (kd if w_kd is None else w_kd.detach().to(kd) * kd)
    return per.mean()


# -------------------------------------------------------------------------- hyper-parameters

@dataclass(frozen=True)
class MethodConfig:
    """One method's hyper-parameters (README, "The maths").

    ``lam`` mixes CE (0) and KD (1); ``T`` is the distillation temperature; ``beta`` the
    reweighting strength (weights in [1, e^beta] before normalisation); ``score`` the
    Laplace-KD score; ``alpha`` the margin weights' sign rule; ``normalise`` divides each
    batch's weights by their mean; epochs before ``warmup_epochs`` use unit weights.
    Laplace-KD only: ``refit_every`` (None = refit at each epoch's end, k = also every k
    steps), ``tau`` (None = marginal likelihood at each refit), ``prior`` ("exact",
    "kron", or "meronen": Meronen et al.'s recipe, var0 and a temperature chosen on
    validation NLL at each refit); ``laplace_subset`` (laplace_kd_subset only: the
    number of each epoch's instances the posterior is fit on). JTT only: ``jtt_epochs``
    (T_id) and ``jtt_upweight`` (lambda_up). DFR only: ``dfr_penalty`` ("l1" or "l2";
    its strength is chosen per seed on half of val, ``last_layer.dfr``). Fields only one
    method reads are ``None`` for the others and then left out of ``config_id``.
    """

    method: str
    lam: float = 0.0
    T: float = 1.0
    beta: float = 0.0
    score: str = "margin"
    alpha: str = "wrong"
    normalise: bool = True
    warmup_epochs: int = 0
    refit_every: int | None = None
    tau: float | None = None
    prior: str = "exact"
    jtt_epochs: int | None = None
    jtt_upweight: float | None = None
    dfr_penalty: str | None = None
    laplace_subset: int | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MethodConfig({self.method!r}): {msg}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        for name, choices in (("score", LAPLACE_SCORES), ("alpha", ALPHAS), ("prior", LAPLACE_PRIORS)):
            if getattr(self, name) not in choices:
                bad(f"unknown {name} {getattr(self, name)!r}; choose one of {list(choices)}")
        for name, value in METHOD_SPECS[self.method].fixed:
            if getattr(self, name) != value:
                bad(f"{self.method} is Laplace-KD with {name}={value!r}: that is what makes it "
                    f"{self.method}, got {name}={getattr(self, name)!r} (use method='laplace_kd' "
                    "for other values)")
        if not 0.0 <= self.lam <= 1.0:
            bad(f"lam must lie in [0, 1], got {self.lam}")
        if not METHOD_SPECS[self.method].distils and self.lam != 0.0:
            bad(f"{self.method} does not distil: lam must be 0, got {self.lam} "
                "(use method='kd' or 'group_balanced')")
        if not (self.T > 0 and math.isfinite(self.T)):
            bad(f"T must be a positive number, got {self.T}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            bad(f"beta must be finite and >= 0, got {self.beta} (alpha='signed' downweights right readouts)")
        if int(self.warmup_epochs) != self.warmup_epochs or self.warmup_epochs < 0:
            bad(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs}")
        if self.refit_every is not None and (int(self.refit_every) != self.refit_every
                                             or self.refit_every < 1):
            bad(f"refit_every must be None (epoch end) or an integer >= 1, got {self.refit_every}")
        if self.tau is not None and not (self.tau > 0 and math.isfinite(self.tau)):
            bad(f"tau must be None (marginal likelihood) or a positive number, got {self.tau}")
        if self.prior == "kron" and self.tau is None:
            bad("prior='kron' is not evidence-based, so tau cannot come from the marginal "
                "likelihood during training: give tau (e.g. notebook 04's validation choice)")
        if self.prior == "meronen" and self.tau is not None:
            bad("prior='meronen' chooses tau = 1/var0 on validation NLL at each refit: leave tau "
                "None (or use prior='kron' with a fixed tau)")
        for name, method in _ONE_METHOD_FIELDS.items():
            if (getattr(self, name) is None) != (self.method != method):
                bad(f"{name} is {method}'s alone: set it for {method} and leave it None otherwise")
        if self.method == "jtt":
            if int(self.jtt_epochs) != self.jtt_epochs or self.jtt_epochs < 1:
                bad(f"jtt_epochs (the identification model's epochs) must be an integer >= 1, "
                    f"got {self.jtt_epochs}")
            if not (self.jtt_upweight >= 1 and math.isfinite(self.jtt_upweight)):
                bad(f"jtt_upweight (lambda_up) must be a finite number >= 1, got {self.jtt_upweight}")
        if self.method == "laplace_kd_subset" and (
                int(self.laplace_subset) != self.laplace_subset or self.laplace_subset < 2):
            bad(f"laplace_subset (the instances each epoch's posterior is fit on) must be an "
                f"integer >= 2, got {self.laplace_subset}")
        if self.method == "dfr" and self.dfr_penalty not in DFR_PENALTIES:
            bad(f"dfr_penalty must be one of {list(DFR_PENALTIES)}, got {self.dfr_penalty!r}")

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field; those of :data:`_SET_ONLY_FIELDS` only when set, so that the
        other methods' dicts (checkpoint fingerprints, ``hparams_used.json``) stay what
        they were before such fields existed."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in _SET_ONLY_FIELDS and v is None)}

    @property
    def config_id(self) -> str:
        """A short stable id of every field, the method included, so that two
        methods never share one (for the tables; always starts with a letter so
        that a CSV reader never takes it for a number). A field only one method reads
        enters the id only when set, so the ids of the other methods stay what they
        were before such fields existed."""
        d = {k: v for k, v in self.to_dict().items() if not (k in _ONE_METHOD_FIELDS and v is None)}
        return "c" + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:7]


#: MethodConfig fields that only one method reads (None for every other method) -> that method.
_ONE_METHOD_FIELDS = {"jtt_epochs": "jtt", "jtt_upweight": "jtt", "dfr_penalty": "dfr",
                      "laplace_subset": "laplace_kd_subset"}
#: MethodConfig fields added after checkpoints of other methods existed: in ``to_dict``
#: only when set.
_SET_ONLY_FIELDS = ("laplace_subset",)
#: DFR's regularisation of the retrained last layer (``last_layer.fit_logistic``).
DFR_PENALTIES = ("l1", "l2")

# Unswept defaults (the sweep replaces them on validation worst-group accuracy).
# Shared lam/T across the distillation methods so that only the weights differ;
# beta = 3 lets a confidently wrong readout weigh up to e^3 ~ 20 times a right one,
# the order of Waterbirds' majority/minority ratio. laplace_kd's score is the
# study's form, the Laplace margin; entropy and variance are ablations.
_LAM, _T, _BETA = 0.5, 2.0, 3.0
#: laplace_kd_subset's default subset, read off notebook 04's regime map where the
#: posterior's median logit variance is about 1: on the image reference run's exits a fit
#: on 47 instances (N/100) gives 1.10 (128 instances: 0.52; all 4,795: 0.027).
LAPLACE_SUBSET = 48
DEFAULT_HPARAMS: dict[str, MethodConfig] = {c.method: c for c in (
    MethodConfig("erm", lam=0.0, T=1.0, beta=0.0),
    MethodConfig("kd", lam=_LAM, T=_T, beta=0.0),
    MethodConfig("dedier", lam=_LAM, T=_T, beta=_BETA),
    MethodConfig("dedier_both", lam=_LAM, T=_T, beta=_BETA),
    MethodConfig("laplace_kd", lam=_LAM, T=_T, beta=_BETA, score="margin"),
    MethodConfig("shuffled", lam=_LAM, T=_T, beta=_BETA),
    MethodConfig("group_balanced", lam=_LAM, T=_T, beta=0.0),
    MethodConfig("group_balanced_erm", lam=0.0, T=1.0, beta=0.0),
    MethodConfig("dedier_final", lam=_LAM, T=_T, beta=_BETA),
    # JTT: the identification model is the ERM student after 1 of its epochs (JTT's own
    # choice on CelebA; any profile has more); its errors count 20 times (between JTT's
    # own choices, 4-6 on text and 20-100 on images).
    MethodConfig("jtt", lam=_LAM, T=_T, beta=0.0, jtt_epochs=1, jtt_upweight=20.0),
    # DFR: L1, as Kirichenko et al. use on Waterbirds and CelebA.
    MethodConfig("dfr", lam=_LAM, T=_T, beta=0.0, dfr_penalty="l1"),
    # The laplace method set's variants of laplace_kd (profiles.LAPLACE_METHODS), at its beta.
    MethodConfig("laplace_kd_entropy", lam=_LAM, T=_T, beta=_BETA, score="entropy"),
    MethodConfig("laplace_kd_variance", lam=_LAM, T=_T, beta=_BETA, score="variance"),
    MethodConfig("laplace_kd_meronen", lam=_LAM, T=_T, beta=_BETA, prior="meronen"),
    # A posterior fit on LAPLACE_SUBSET instances is wide (README, "The maths").
    MethodConfig("laplace_kd_subset", lam=_LAM, T=_T, beta=_BETA, laplace_subset=LAPLACE_SUBSET),
)}


def default_config(method: str, **overrides) -> MethodConfig:
    """``DEFAULT_HPARAMS[method]`` with ``overrides`` (e.g. ``warmup_epochs`` from the profile)."""
    if method not in DEFAULT_HPARAMS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return DEFAULT_HPARAMS[method].replace(**overrides)


class OnlineTeacher:
    """A teacher run on each (augmented) training batch instead of cached logits.

    With training augmentation the student sees a different crop every epoch, so
    the teacher must see the same one; ``fingerprint`` identifies the teacher
    for the student's checkpoint."""

    def __init__(self, model: torch.nn.Module, fingerprint: str):
        self.model = model.eval()
        self.fingerprint = fingerprint
        self.device = None

    @torch.no_grad()
    def __call__(self, batch, device) -> Tensor:
        if self.device != device:
            self.model.to(device)
            self.device = device
        return self.model(batch.x.to(device)).float()


# -------------------------------------------------------------------------- weights: one table

@dataclass
class WeightInputs:
    """What a weight reads besides config and batch: ``generator`` (shuffled's
    permutations), ``error_set`` (jtt: (N_train,) bool, dataset order), ``group_weights``
    per group ``g = y * n_attrs + a`` (true_group), ``laplace`` (``laplace_source.LaplaceSource``)."""
    generator: torch.Generator | None = None
    error_set: Tensor | None = None
    group_weights: Tensor | None = None
    n_attrs: int | None = None
    laplace: "LaplaceSource | None" = None


def _exit_logits(out) -> Tensor:
    exit_logits = getattr(out, "exit_logits", None)
    if exit_logits is None:
        raise ValueError("this method reads the student's early exit: the model must return "
                         "a StudentOutput with exit_logits (build it with models.build_student)")
    return _full(exit_logits)


def _exit_map(config, out, batch, inputs):
    return dedier_weight(_exit_logits(out), batch.y, config.beta, config.alpha)


def _exit_map_shuffled(config, out, batch, inputs):
    w = _exit_map(config, out, batch, inputs)
    return w[torch.randperm(len(w), generator=inputs.generator).to(w.device)]


def _final_map(config, out, batch, inputs):
    return dedier_weight(_full(out.logits), batch.y, config.beta, config.alpha)


def _error_set(config, out, batch, inputs):
    return jtt_weight(inputs.error_set[batch.idx.cpu()], config.jtt_upweight).to(batch.y.device)


def _true_group(config, out, batch, inputs):
    g = batch.y * inputs.n_attrs + batch.a.to(batch.y.device)
    return inputs.group_weights.to(g.device)[g]


#: A method's weight source (``METHOD_SPECS[method].weight``, each described by
#: ``profiles.MethodSpec``) -> its raw weight ``fn(config, out, batch, inputs)`` (None = 1).
WEIGHTS = {
    "none": lambda config, out, batch, inputs: None,
    "exit_map": _exit_map,
    "exit_map_shuffled": _exit_map_shuffled,
    "final_map": _final_map,
    "error_set": _error_set,
    "true_group": _true_group,
    "exit_laplace": lambda config, out, batch, inputs: inputs.laplace.weight(out, batch),
}


def instance_weight(config: MethodConfig, out, batch, inputs: WeightInputs) -> Tensor | None:
    """A method's raw (unnormalised) instance weight, the one dispatch over :data:`WEIGHTS`:
    ``out`` the student's ``StudentOutput`` (None for sources that do not read it),
    ``batch`` a ``data.Batch`` (``idx`` positions in the training split, ``y``, ``a``). Used
    by training (:class:`Objective`) and the figures (``students.final_train_weights``)."""
    return WEIGHTS[METHOD_SPECS[config.method].weight](config, out, batch, inputs)


#: Per-epoch columns of a Laplace-KD history (``laplace_source.LaplaceSource.epoch_stats``), before
#: one ``weight_share_g<k>`` column per group.
LAPLACE_EFFECT = ("laplace_rank_corr", "laplace_max_abs_dp", "laplace_mean_abs_dp", "laplace_n_wrong",
                  "laplace_wrong_spearman", "laplace_wrong_kendall", "laplace_topk_overlap",
                  "laplace_mc_wrong_spearman", "laplace_mc_wrong_kendall")


# -------------------------------------------------------------------------- the objective

class Objective:
    """The student loss of one method: CE + KD with :func:`instance_weight`'s weights after
    the warm-up on the terms ``WEIGHTED_TERMS[method]``. ``loss`` returns the loss and the
    (B,) detached weights used, ``{"ce": w_ce, "kd": w_kd}`` (ones where unweighted). A
    ``laplace_source.LaplaceSource`` in ``inputs`` sees every batch and the loop's hooks;
    ``describe_extra`` identifies the method's inputs in :meth:`describe`."""

    def __init__(self, config: MethodConfig, teacher_logits: Tensor | None = None,
                 n_classes: int | None = None, inputs: WeightInputs | None = None,
                 describe_extra: dict | None = None):
        self.config = config
        if config.lam > 0 and teacher_logits is None:
            raise ValueError(f"method {config.method!r} with lam={config.lam} needs teacher_logits "
                             "(N_train, C), indexed by batch.idx; pass the saved teacher logits")
        if teacher_logits is not None and not isinstance(teacher_logits, OnlineTeacher):
            if teacher_logits.ndim != 2:
                raise ValueError("teacher_logits must be (N_train, C), got shape "
                                 f"{tuple(teacher_logits.shape)}")
            if n_classes is not None and teacher_logits.shape[1] != n_classes:
                raise ValueError(f"teacher_logits has {teacher_logits.shape[1]} classes, "
                                 f"the data {n_classes}: logits of another dataset?")
            teacher_logits = teacher_logits.detach().float()
        self._teacher = teacher_logits
        self._weighted = WEIGHTED_TERMS[config.method]
        self.inputs = inputs or WeightInputs()
        self._extra = describe_extra or {}

    def _teacher_for(self, batch, device) -> Tensor:
        if isinstance(self._teacher, OnlineTeacher):
            return self._teacher(batch, device)
        if self._teacher.device != device:  # moved once, then cached
            self._teacher = self._teacher.to(device)
        return self._teacher[batch.idx.to(device)]

    def describe(self) -> dict:
        """What identifies this objective for the loop's checkpoint fingerprint: every
        hyper-parameter, the teacher logits (by content hash) and the method's inputs."""
        return {"objective": self.config.method, **self.config.to_dict(),
                "teacher_logits": (None if self._teacher is None else
                                   f"online:{self._teacher.fingerprint}"
                                   if isinstance(self._teacher, OnlineTeacher)
                                   else self._teacher.cpu()), **self._extra}

    def loss(self, out, batch, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, laplace = self.config, self.inputs.laplace
        logits = _float32(getattr(out, "logits", out))  # float32 under the loop's CUDA autocast
        batch = batch._replace(y=batch.y.to(logits.device))
        ones = torch.ones(batch.y.shape[0], device=logits.device,
                          dtype=torch.promote_types(logits.dtype, torch.float32))
        w = None
        # weights and factors in full precision, whatever autocast the loop runs under
        with torch.autocast(logits.device.type, enabled=False):
            if self._weighted and epoch >= cfg.warmup_epochs:
                w = instance_weight(cfg, out, batch, self.inputs)
            if laplace is not None:
                laplace.observe(out, batch, epoch)
        w = ones if w is None else w.detach().to(ones)
        if w is not ones and cfg.normalise:
            w = normalise(w)
        used = {term: w if term in self._weighted else ones for term in ("ce", "kd")}
        teacher = self._teacher_for(batch, logits.device) if cfg.lam > 0 else None
        return student_loss(logits, batch.y, teacher, used["ce"], used["kd"], cfg.lam, cfg.T), used

    # -- the loop's hooks: Laplace-KD's refits, its warm-up state and its effect ----
    def on_epoch_start(self, epoch: int) -> None:
        if self.inputs.laplace is not None:
            self.inputs.laplace.epoch_start()

    def on_epoch_end(self, epoch: int) -> None:
        if self.inputs.laplace is not None:
            self.inputs.laplace.epoch_end(epoch)

    def state(self) -> dict | None:
        return None if self.inputs.laplace is None else self.inputs.laplace.state()

    def load_state(self, state: dict | None, epoch: int) -> None:
        if self.inputs.laplace is not None:
            self.inputs.laplace.load_state(state, epoch)

    def epoch_stats(self, epoch: int) -> dict:
        return {} if self.inputs.laplace is None else self.inputs.laplace.epoch_stats()


def make_objective(config: MethodConfig, *, teacher_logits: Tensor | None = None,
                   group_counts: Tensor | None = None, n_train: int | None = None,
                   n_classes: int | None = None, model: torch.nn.Module | None = None,
                   seed: int = 0, error_set: Tensor | None = None, top_k: int | None = None,
                   val=None) -> Objective:
    """The training objective of ``config.method`` for ``train.train_model``.

    ``teacher_logits``: (N_train, C) on the training split in dataset order (lam > 0).
    ``group_counts``: the training split's ``group_counts()``. ``model``: the student
    (laplace_kd reads its exit). ``seed``: shuffled's permutations, laplace_kd's Monte
    Carlo (C > 2). ``error_set``: jtt's (``students.jtt_error_set``). ``top_k``: laplace_kd's
    diagnostics compare that many most upweighted instances (the study: the number of
    minority-group training instances). ``val``: the validation split (a ``data`` split
    dataset; read by laplace_kd_meronen's refits)."""
    m = config.method
    base = METHOD_SPECS[m].last_layer_of
    if base is not None:
        raise ValueError(f"{m} trains no student of its own: it retrains the last layer of "
                         f"{base}'s student (students.run_method / last_layer.dfr)")
    if isinstance(teacher_logits, Tensor) and n_train is not None and teacher_logits.shape[0] != n_train:
        raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows but n_train={n_train}: "
                         "pass the teacher's logits on the training split, in dataset order")
    source, inputs, extra = METHOD_SPECS[m].weight, WeightInputs(), {}
    if source == "exit_map_shuffled":
        inputs.generator, extra = torch.Generator().manual_seed(int(seed) + 7919), {"seed": seed}
    elif source == "error_set":
        if error_set is None:
            raise ValueError("jtt needs error_set: the training instances its identification "
                             "model gets wrong (students.jtt_error_set)")
        inputs.error_set = torch.as_tensor(error_set).bool().flatten().cpu()
        if n_train is not None and len(inputs.error_set) != n_train:
            raise ValueError(f"error_set has {len(inputs.error_set)} entries but n_train={n_train}")
        extra = {"error_set": inputs.error_set.to(torch.uint8)}
    elif source == "true_group":
        counts = torch.as_tensor([] if group_counts is None else group_counts)
        if group_counts is None or n_classes is None or counts.numel() % n_classes:
            raise ValueError(f"{m} needs group_counts (splits['train'].group_counts(), got "
                             f"{counts.numel()} groups) and n_classes ({n_classes}), a divisor")
        inputs.n_attrs = counts.numel() // n_classes
        inputs.group_weights = group_balanced_weight(torch.arange(counts.numel()), counts)
        extra = {"group_counts": inputs.group_weights}
    elif source == "exit_laplace":
        from .laplace_source import LaplaceSource  # it imports this module

        inputs.laplace = LaplaceSource(config, model, n_train, seed, group_counts=group_counts,
                                       top_k=top_k, val=val if config.prior == "meronen" else None)
        extra = {"n_train": inputs.laplace.n_train, "seed": seed}
    return Objective(config, teacher_logits, n_classes, inputs, extra)


def warmup_objective(config: MethodConfig, teacher_logits, n_train: int, n_classes=None) -> Objective:
    """The warm-up every distillation method shares (kd at ``config``'s lam, T and
    warm-up), which also accumulates the exit's Laplace factors in its last epoch as
    ``laplace_kd`` would: every method branches from one warm-up per seed
    (``train.train_warmup``) and ends exactly where a run from scratch ends."""
    config = DEFAULT_HPARAMS["kd"].replace(lam=config.lam, T=config.T,
                                           warmup_epochs=config.warmup_epochs)
    from .laplace_source import LaplaceSource  # it imports this module

    laplace = LaplaceSource(config, None, n_train, fit=False)
    return Objective(config, teacher_logits, n_classes, WeightInputs(laplace=laplace),
                     {"warmup_of": "every distillation method", "n_train": laplace.n_train})
