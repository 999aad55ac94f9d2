"""The study's one vocabulary — datasets, methods (what each one weights), devices,
scores — and the run profiles: model sizes and budgets, defined once and shared by the
runner, the notebooks, the tests and the benchmarks.

A profile fixes *how much* is computed; ``--dataset`` fixes *on what*; ``METHOD_SPECS``
fixes *what each method is*. Plain data only (no torch at import), so the command-line
runner reads it without starting torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

#: The datasets the loaders know; the runner's --dataset choices. Images:
#: ``data.load_splits``; text (:data:`TEXT_DATASETS`): ``synthetic_text.make_synthetic_text``
#: and ``multinli.read_multinli``.
DATASETS = ("synthetic", "waterbirds", "celeba", "folder", "synthetic_text", "multinli")
TEXT_DATASETS = ("synthetic_text", "multinli")
#: Built in (generated in code, no --data-root): scaled by the profile's data_scale.
BUILT_IN_DATASETS = ("synthetic", "synthetic_text")
#: ``--device`` choices; :func:`resolve_device` turns one into a torch device string.
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is: where its instance weight comes from and which loss terms
    the weight multiplies. Training (``losses.instance_weight``), logging, figures,
    the sweep and notebook 04's scores all read :data:`METHOD_SPECS`.

    ``weight``: ``"none"`` (unit weights), ``"exit_map"`` (DeDiER's ``exp(beta*cm*alpha)``
    of the early exit's MAP softmax), ``"exit_laplace"`` (the same from the exit's
    Laplace predictive), ``"exit_map_shuffled"`` (DeDiER's weights permuted within the
    batch: a control), ``"final_map"`` (DeDiER's form from the student's own *final*
    head: does the readout have to be early?), ``"error_set"`` (JTT: ``jtt_upweight``
    on the training instances an ERM identification model gets wrong, 1 elsewhere) or
    ``"true_group"`` (inverse frequency of the true group: a reference that uses group
    labels). ``distils``: lam and T are kd's (the default; False: lam = 0). ``beta_from``: whose beta
    the method uses (itself when swept; ``None``: no beta). ``swept``: the method's own
    hyper-parameters besides beta that the sweep chooses. ``last_layer_of``: the method
    trains no student of its own but retrains the last layer of that method's student
    after training (DFR); ``group_labels`` then says whether that retraining reads
    group labels (DFR: the validation split's). ``fixed``: ``(field, value)`` pairs the
    method's configuration always has (what makes a Laplace-KD variant that variant:
    its score or its prior); a hyper-parameter file cannot set them.
    """
    weight: str
    terms: tuple[str, ...]
    distils: bool = True
    beta_from: str | None = None
    group_labels: bool = False
    label: str = ""
    swept: tuple[str, ...] = ()
    last_layer_of: str | None = None
    fixed: tuple[tuple[str, object], ...] = ()


#: Every method of the study, in table order. ``dedier_final``, ``jtt`` and ``dfr`` are
#: the baselines of the ``extended`` method set (:data:`EXTRA_METHODS`), not of a
#: profile's own ``methods``.
METHOD_SPECS: dict[str, MethodSpec] = {
    "erm": MethodSpec("none", (), distils=False, label="ERM"),
    "kd": MethodSpec("none", (), label="KD (Hinton)"),
    "dedier": MethodSpec("exit_map", ("kd",), beta_from="dedier", label="DeDiER (KD term)"),
    "dedier_both": MethodSpec("exit_map", ("ce", "kd"), beta_from="dedier_both", label="DeDiER (both terms)"),
    "dedier_final": MethodSpec("final_map", ("ce", "kd"), beta_from="dedier_final",
                               label="DeDiER, final-head readout (ablation)"),
    "laplace_kd": MethodSpec("exit_laplace", ("ce", "kd"), beta_from="laplace_kd", label="Laplace-KD"),
    "shuffled": MethodSpec("exit_map_shuffled", ("ce", "kd"), beta_from="dedier_both",
                           label="shuffled DeDiER (control)"),
    "jtt": MethodSpec("error_set", ("ce", "kd"), swept=("jtt_epochs", "jtt_upweight"), label="JTT (KD)"),
    "group_balanced": MethodSpec("true_group", ("ce", "kd"), group_labels=True,
                                 label="group-balanced KD (reference)"),
    "group_balanced_erm": MethodSpec("true_group", ("ce",), distils=False, group_labels=True,
                                     label="group-balanced ERM (reference)"),
    "dfr": MethodSpec("none", (), group_labels=True, last_layer_of="kd", label="DFR on KD (reference)"),
    # The Laplace-KD variants of the ``laplace`` method set (:data:`LAPLACE_METHODS`).
    "laplace_kd_entropy": MethodSpec("exit_laplace", ("ce", "kd"), beta_from="laplace_kd_entropy",
                                     fixed=(("score", "entropy"),), label="Laplace-KD, entropy score"),
    "laplace_kd_variance": MethodSpec("exit_laplace", ("ce", "kd"), beta_from="laplace_kd_variance",
                                      fixed=(("score", "variance"),), label="Laplace-KD, variance score"),
    "laplace_kd_meronen": MethodSpec("exit_laplace", ("ce", "kd"), beta_from="laplace_kd_meronen",
                                     fixed=(("prior", "meronen"),),
                                     label="Laplace-KD, Meronen et al.'s exit Laplace"),
    "laplace_kd_subset": MethodSpec("exit_laplace", ("ce", "kd"), beta_from="laplace_kd_subset",
                                    label="Laplace-KD, posterior on a subset"),
}
METHODS = tuple(METHOD_SPECS)
#: The methods a plain run compares (every profile's ``methods``): the study as it was
#: before the reviewer's baselines; ``default``'s tables and reference are these.
DEFAULT_METHODS = ("erm", "kd", "dedier", "dedier_both", "laplace_kd", "shuffled",
                   "group_balanced", "group_balanced_erm")
#: What ``--methods extended`` adds to a profile's methods: JTT, DFR and the
#: final-head readout ablation of DeDiER.
EXTRA_METHODS = ("jtt", "dfr", "dedier_final")
#: What ``--methods laplace`` adds to a profile's methods: the Laplace-KD variants whose
#: weights can differ from laplace_kd's (README, "The maths"): the entropy and variance
#: scores, Meronen et al.'s exit Laplace, and the posterior of a small subset.
LAPLACE_METHODS = ("laplace_kd_entropy", "laplace_kd_variance", "laplace_kd_meronen",
                   "laplace_kd_subset")
#: Named method sets (``--methods``): ``default`` is the profile's own ``methods``; the
#: others add :data:`EXTRA_METHODS` (``extended``) or :data:`LAPLACE_METHODS` (``laplace``).
METHOD_SETS = ("default", "extended", "laplace")
_SET_METHODS = {"extended": EXTRA_METHODS, "laplace": LAPLACE_METHODS}
#: Which loss terms each method's weight multiplies.
WEIGHTED_TERMS = {m: spec.terms for m, spec in METHOD_SPECS.items()}
#: Methods whose weights are not all 1.
REWEIGHTING = tuple(m for m, spec in METHOD_SPECS.items() if spec.weight != "none")
#: Per method, the hyper-parameters the sweep chooses for it (beta and its own ``swept``);
#: lam and T are kd's. Methods with none borrow theirs (or have none).
SWEPT_HPARAMS = {m: (("beta",) if spec.beta_from == m else ()) + spec.swept
                 for m, spec in METHOD_SPECS.items()
                 if spec.beta_from == m or spec.swept}
#: Methods that train a student of their own (DFR retrains another's last layer).
TRAINED = tuple(m for m, spec in METHOD_SPECS.items() if spec.last_layer_of is None)
#: References: methods that read the true group labels (the others never do).
REFERENCES = tuple(m for m, spec in METHOD_SPECS.items() if spec.group_labels)
#: The paired differences of ``summary.csv`` are taken against these; the primary
#: contrast is ``laplace_kd`` against ``dedier_both`` (same terms, same form).
BASELINES = ("kd", "dedier_both")

#: The type of every field a hyper-parameter file may set (``losses.MethodConfig``'s):
#: "number" (int or float, finite, never true/false), "whole" (int), "text", "bool".
HPARAM_TYPES = {**dict.fromkeys(("lam", "T", "beta", "tau", "jtt_upweight"), "number"),
                **dict.fromkeys(("jtt_epochs", "refit_every", "laplace_subset"), "whole"),
                **dict.fromkeys(("score", "alpha", "prior", "dfr_penalty"), "text"), "normalise": "bool"}
#: Per weight source, the fields besides beta that a method's weight reads (its sign
#: rule, Laplace-KD's score and posterior, DFR's penalty).
_WEIGHT_FIELDS = {"exit_map": ("alpha",), "exit_map_shuffled": ("alpha",), "final_map": ("alpha",),
                  "exit_laplace": ("alpha", "score", "refit_every", "tau", "prior")}
#: The fields only one method's entry may set (last in its list): kd's lam and T (shared by
#: every distillation method), DFR's penalty, laplace_kd_subset's subset size.
_OWN_FIELDS = {"kd": ("lam", "T"), "dfr": ("dfr_penalty",), "laplace_kd_subset": ("laplace_subset",)}


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Per kind of :data:`HPARAM_TYPES`: the kind in words and whether a value is of it.
_KINDS = {"number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          "whole": ("a whole number", _whole), "text": ("text", lambda v: isinstance(v, str)),
          "bool": ("true or false", lambda v: isinstance(v, bool))}


def hparam_fields(method: str) -> tuple[str, ...]:
    """The fields ``method``'s own entry of a hyper-parameter file may set: kd's lam and
    T (shared by every distillation method), the method's own beta (not one it borrows),
    the fields its weight reads, its own swept fields, normalise for reweighting
    methods, DFR's penalty, laplace_kd_subset's subset size; never a field the method
    fixes (``MethodSpec.fixed``)."""
    spec = METHOD_SPECS[method]
    fields = (("beta",) if spec.beta_from == method else ()) + _WEIGHT_FIELDS.get(spec.weight, ()) \
        + spec.swept + (("normalise",) if spec.weight != "none" else ()) + _OWN_FIELDS.get(method, ())
    return tuple(f for f in fields if f not in dict(spec.fixed))


def required_hparams(method: str) -> tuple[tuple[str, str], ...]:
    """(entry, field) pairs a hyper-parameter file must hold for ``method``: the ones a
    sweep chooses (kd's lam and T for a distilling method, beta from the method it takes
    it from, its own swept fields)."""
    spec = METHOD_SPECS[method]
    return ((("kd", "lam"), ("kd", "T")) if spec.distils else ()) \
        + (((spec.beta_from, "beta"),) if spec.beta_from else ()) + tuple((method, f) for f in spec.swept)


def check_hparams(chosen, source: str) -> dict:
    """``chosen`` (a hyper-parameter file's content, ``{"<dataset>-<profile>": {method:
    {field: value}}}``) if well formed, else a ValueError naming ``source``, the entry,
    the method and the field: every method known, every entry an object, every field
    one the method reads, every value of its type."""
    if not isinstance(chosen, dict):
        raise ValueError(f"hyper-parameter file {source} must hold an object keyed by "
                         "'<dataset>-<profile>'")
    for name, table in chosen.items():
        where = f"{source}[{name!r}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be an object of method: {{field: value}}, "
                             f"got {json.dumps(table)}")
        if unknown := sorted(set(table) - set(METHODS) - {"_comment"}):
            raise ValueError(f"{where}: unknown methods {unknown}; valid ones are {list(METHODS)}")
        for method, entry in table.items():
            if method == "_comment":
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: {method!r} must be an object of field: value, e.g. "
                                 f'{{"lam": 0.9, "T": 4.0}}, got {json.dumps(entry)}')
            readable = hparam_fields(method)
            for field, value in entry.items():
                if field not in readable:
                    spec = METHOD_SPECS[method]
                    if field in ("lam", "T") and spec.distils:
                        why = (f"{method!r} sets {field}, but lam and T are kd's, shared by every "
                               "distillation method: set them under 'kd'")
                    elif field == "beta" and spec.beta_from:
                        why = f"{method} does not read its own beta: it takes {spec.beta_from}'s"
                    else:
                        why = f"{method} does not read {field}"
                    raise ValueError(f"{where}: bad entry for {method!r}: {why} (it reads "
                                     f"{list(readable) or 'nothing from the file'})")
                what, ok = _KINDS[HPARAM_TYPES[field]]
                if ok(value) and HPARAM_TYPES[field] == "number" and not math.isfinite(value):
                    what = "a finite number"
                elif ok(value):
                    continue
                raise ValueError(f"{where}: bad entry for {method!r}: {method}'s {field}: "
                                 f"expected {what}, got {json.dumps(value)}")
    return chosen


def read_hparams_file(path) -> dict:
    """A hyper-parameter file, read and checked (:func:`check_hparams`), or a clear
    error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hyper-parameter file {str(path)!r} not found; give an existing "
                                "file (a sweep writes <run_dir>/sweep/hparams.json) or none")
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"hyper-parameter file {str(path)!r} is not valid JSON ({err})") from None
    return check_hparams(chosen, repr(str(path)) if not isinstance(chosen, dict) else path.name)


def missing_hparams(table: dict, methods) -> list[str]:
    """What an entry of a hyper-parameter file lacks for ``methods`` (each "<entry>'s
    <field> (read by <methods>)"), in the order the methods need them; [] when complete."""
    needs = {}
    for method in methods:
        for owner, field in required_hparams(method):
            if field not in (table.get(owner) or {}):
                needs.setdefault((owner, field), []).append(method)
    return [f"{owner}'s {field} (read by {', '.join(users)})" for (owner, field), users in needs.items()]


#: Laplace-KD's scores (``losses.laplace_score``); ``margin`` is the study's form.
LAPLACE_SCORES = ("margin", "entropy", "variance")
#: The sign rule of the margin weights: 1 where the readout is wrong (or +1/-1).
ALPHAS = ("wrong", "signed")
#: Priors of the exit's Laplace posterior (``exit_laplace.ExitLaplace``).
PRIORS = ("exact", "kron")
#: The exit Laplace recipes a Laplace-KD configuration may name (``MethodConfig.prior``):
#: the priors and Meronen et al.'s recipe (``fit_exit_laplace(..., prior="meronen")``:
#: the kron form with var0 and a temperature chosen on validation NLL).
LAPLACE_PRIORS = PRIORS + ("meronen",)


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cpu"``;
    ``"cuda"`` (or ``"cuda:N"``) only when torch sees one. The one device rule of the
    runner, the notebooks and the training loop."""
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES}")
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; "
                         "use --device cpu or auto")
    return name


@dataclass(frozen=True, kw_only=True)
class Profile:
    """How much a run computes: data, models, budget; fields in ``to_dict``'s order,
    given by name. A default is the study's choice (``select_on``, ``methods``,
    ``sweep``) or "not used" (``image_size`` 0 and no augmentation for text, widths and
    blocks () where the architecture fixes them, the text-only and pretraining knobs)."""
    name: str
    # data
    data_scale: float            # fraction of Waterbirds' group counts (synthetic only)
    image_size: int = 0          # side in pixels fed to the networks (0: text)
    augment: bool = False        # random crop/flip on the training split (real data)
    # models; widths and blocks () where the architecture fixes them (torchvision, hf)
    teacher_arch: str            # "narrow_resnet" | "resnet50"
    student_arch: str            # "narrow_resnet" | "resnet18"
    teacher_widths: tuple[int, ...] = ()
    teacher_blocks: tuple[int, ...] = ()
    student_widths: tuple[int, ...] = ()
    student_blocks: tuple[int, ...] = ()
    exit_stage: int              # index (1-based) of the student stage the exit reads
    # training
    teacher_epochs: int
    student_epochs: int
    warmup_epochs: int           # unit weights before any reweighting starts
    batch_size: int
    optimizer: str               # "sgd" | "adamw"
    lr: float
    weight_decay: float
    select_on: str = "worst_group_acc"   # students: | "avg_acc" (on val, never test)
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    sweep: bool = False          # hyper-parameter sweep on val worst-group accuracy
    # The teacher is plain ERM and is selected the ERM way, on validation average
    # accuracy: it never uses group labels. (On the synthetic data its worst group
    # is ~0 at every epoch, so worst-group selection would keep an arbitrary early
    # epoch that has barely started to learn the shape.)
    teacher_select_on: str = "avg_acc"
    # The pretrained teacher (synthetic data only; real data take pretrained weights from
    # a local file). With teacher_pretrain_per_pair > 0 the teacher is first trained for
    # teacher_pretrain_epochs on a built-in corpus with that many images per (class,
    # background) pair, whose background-label alignment is teacher_pretrain_alignment
    # (0.5 = balanced: the background tells nothing; the documented knob of the teacher's
    # bias), then adapted for teacher_adapt_epochs (0 = not at all) on the study's
    # biased training split at teacher_adapt_lr. Without a corpus (real data),
    # teacher_epochs train it on the study's training split.
    teacher_pretrain_per_pair: int = 0
    teacher_pretrain_alignment: float = 0.5
    teacher_pretrain_epochs: int = 0
    teacher_adapt_epochs: int = 0
    teacher_adapt_lr: float = 0.005
    # Text only (TEXT_PROFILES): the widths are the encoders' hidden sizes, the blocks
    # their transformer layers, exit_stage the student layer the exit reads, and
    # attention_heads (teacher, student); max_length the tokens per pair. For "hf"
    # archs the sizes come from the local model folders (--teacher-model/--student-model).
    attention_heads: tuple[int, ...] = ()
    max_length: int = 0
    # How the text exit pools its layer's token states: "mean" (over the attention mask,
    # as the image exit averages its stage's feature map) or "cls" (the [CLS] position).
    exit_pool: str = "cls"
    # torch.compile of the teacher's and the students' training and validation forward
    # passes (train.Forward; --set compile=true). Off by default: bench/bench_pipeline.py
    # --compile both measures the whole study eager against compiled (README, budgets).
    compile: bool = False
    # Students: the early exit head's learning rate as a multiple of lr
    # (train.TrainConfig.exit_lr_scale): how far the exit's own fit gets in the budget.
    # ERM, kd and group-balanced students train every other weight exactly as at 1; the
    # reweighting methods read the exit, so their weights follow its fit.
    exit_lr_scale: float = 1.0
    # The teacher's learning rate where it differs from the students' (None: lr).
    teacher_lr: float | None = None
    # Share of each training run's steps over which the learning rate rises linearly (step
    # k of W at k/W of it) before the cosine decay (BERT-style warm-up; 0 = none, the
    # plain cosine).
    lr_warmup: float = 0.0
    # synthetic_text only: its lexicon and ambiguity (make_synthetic_text's n_pairs,
    # word_zipf and ambiguous_rate): the antonym pairs of content words, the Zipf exponent
    # of how often each is drawn (0 = all equally often) and the share of pairs whose
    # label the pair does not decide. The pretraining corpora are drawn the same way.
    text_antonym_pairs: int = 8
    text_word_zipf: float = 0.0
    text_ambiguous_rate: float = 0.0   # make_synthetic_text's ambiguous_rate
    # synthetic_text only: the student's pretrained encoder, the stand-in for the public
    # small-BERT checkpoint a real text student starts from. With
    # student_pretrain_per_pair > 0, one encoder is trained once per run (seed
    # build.STUDENT_PRETRAIN_SEED) for student_pretrain_epochs on its own unbiased corpus
    # with that many pairs per group, and every student, whatever its seed, starts from
    # it (the seed draws the heads and the data order, as in fine-tuning a checkpoint).
    student_pretrain_per_pair: int = 0
    student_pretrain_epochs: int = 0
    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    # Tiny data, 1-2 epochs: every notebook end to end within 90 s, for tests.
    "smoke": Profile(
        name="smoke", data_scale=0.06, image_size=32,
        teacher_arch="narrow_resnet", teacher_widths=(16, 32, 64), teacher_blocks=(1, 1, 1),
        student_arch="narrow_resnet", student_widths=(8, 16, 32), student_blocks=(1, 1, 1), exit_stage=1,
        teacher_epochs=1, student_epochs=2, warmup_epochs=1, batch_size=128, seeds=(0,),
        optimizer="sgd", lr=0.05, weight_decay=5e-4,
        teacher_pretrain_per_pair=150, teacher_pretrain_epochs=2, teacher_adapt_epochs=1),
    # Waterbirds-sized synthetic data at 32 px, narrow ResNets: the whole study
    # on a 2-core CPU.
    "default": Profile(
        name="default", data_scale=1.0, image_size=32,
        teacher_arch="narrow_resnet", teacher_widths=(32, 64, 128), teacher_blocks=(1, 1, 1),
        student_arch="narrow_resnet", student_widths=(16, 32, 64), student_blocks=(1, 1, 1), exit_stage=1,
        # Budget (measured on a 2-core machine, idle): pretraining the teacher 112 s, a
        # student epoch 2.9 s with validation; 40 students of 12 epochs, every method of
        # a seed continuing from its shared 3-epoch warm-up: 1441 s for the whole study.
        # teacher_epochs only applies to real data (no pretraining corpus there).
        teacher_epochs=20, student_epochs=12, warmup_epochs=3, batch_size=128, seeds=(0, 1, 2, 3, 4),
        optimizer="sgd", lr=0.05, weight_decay=5e-4,
        # The pretrained teacher (bench/calibrate_synthetic.py): 2,500 images per
        # (class, background) pair, 8 epochs.
        teacher_pretrain_per_pair=2500, teacher_pretrain_alignment=0.5,
        teacher_pretrain_epochs=8, teacher_adapt_epochs=0),
    # torchvision ResNet-50 teacher and ResNet-18 student at 224 px with
    # group_DRO/DFR-like budgets: for a GPU and real data.
    "paper": Profile(
        name="paper", data_scale=1.0, image_size=224, augment=True,
        teacher_arch="resnet50", student_arch="resnet18", exit_stage=2,
        teacher_epochs=100, student_epochs=100, warmup_epochs=10, batch_size=64, seeds=(0, 1, 2),
        optimizer="sgd", lr=1e-3, weight_decay=1e-4),
}


#: The text study's profiles (``--dataset synthetic_text`` or ``multinli``): the same
#: names and roles as :data:`PROFILES`, with BERT-style encoders.
TEXT_PROFILES: dict[str, Profile] = {
    # Tiny data, 1-2 epochs: every notebook end to end for the tests.
    "smoke": Profile(
        name="smoke", data_scale=0.05,
        teacher_arch="tiny_bert", teacher_widths=(32,), teacher_blocks=(2,),
        student_arch="tiny_bert", student_widths=(32,), student_blocks=(2,), exit_stage=1,
        attention_heads=(2, 2), max_length=10,
        teacher_epochs=1, student_epochs=2, warmup_epochs=1, batch_size=128, seeds=(0,),
        optimizer="adamw", lr=1e-3, weight_decay=0.01,
        teacher_pretrain_per_pair=100, teacher_pretrain_epochs=2, teacher_adapt_epochs=1,
        teacher_adapt_lr=1e-4, teacher_lr=5e-4),
    # synthetic_text at scale 1 (MultiNLI's group counts / 20: train 10,310 pairs of 10
    # tokens): the whole text study on a 2-core CPU. Student h64 x 3 layers, teacher
    # h128 x 3 layers (bench/bench_text_throughput.py). The data and schedule were chosen
    # by bench/calibrate_synthetic.py (README, "Calibrating the text miniature"), which
    # trains only the teacher, ERM, group-balanced ERM and kd: 48 antonym pairs drawn by a
    # Zipf law (exponent 1), so rare ones come up in few training contradictions; 10 % of
    # pairs ambiguous (a vague hypothesis word: only the negation is left to read), which
    # keeps the teacher below perfect whatever its seed; a BERT-style linear warm-up over
    # the first 10 % of steps, without which the from-scratch teacher learns erratically;
    # the teacher pretrained at 5e-4 on 3,400 pairs per group whose negation tells
    # nothing, for 24 epochs (at 12 it learnt the antonym rule on some seeds and machines
    # and stalled on a plateau on others: test average 0.656 / 0.464 / 0.933 for teacher
    # seeds 0 / 1 / 2 on one machine, 0.935 / 0.901 / 0.928 at 24), then adapted 2
    # epochs at 1e-4 on the biased split; students 12 epochs; the
    # exit mean-pools student layer 1, as the image exit averages its stage's feature
    # map, and its head learns at 30 x lr: at 1 x, AdamW's bounded steps leave the linear
    # head far from its fit (weight norm 0.7 against 5-8 for a converged probe of the
    # same features), so it is less confident than the layer it reads. `multinli` with
    # this profile gets the same budget, warm-up and exit (the text_* knobs are
    # synthetic_text's only).
    "default": Profile(
        name="default", data_scale=1.0,
        teacher_arch="tiny_bert", teacher_widths=(128,), teacher_blocks=(3,),
        student_arch="tiny_bert", student_widths=(64,), student_blocks=(3,), exit_stage=1,
        attention_heads=(4, 2), max_length=10,
        teacher_epochs=12, student_epochs=12, warmup_epochs=3, batch_size=128, seeds=(0, 1, 2, 3, 4),
        optimizer="adamw", lr=1e-3, weight_decay=0.01,
        teacher_pretrain_per_pair=3400, teacher_pretrain_epochs=24, teacher_adapt_epochs=2,
        teacher_adapt_lr=1e-4, teacher_lr=5e-4, lr_warmup=0.1, exit_pool="mean", exit_lr_scale=30.0,
        text_antonym_pairs=48, text_word_zipf=1.0, text_ambiguous_rate=0.1),
    # MultiNLI with BERT from local Hugging Face folders (e.g. bert-base-uncased teacher,
    # a 4-layer BERT student): group_DRO's MultiNLI budget — AdamW, lr 2e-5, batch 32,
    # no weight decay, 3 epochs, max length 128 (kohpangwei/group_DRO README, "MultiNLI
    # with annotated negations", and its cached *_bert-base-uncased_128_* features).
    "paper": Profile(
        name="paper", data_scale=1.0,
        teacher_arch="hf", student_arch="hf", exit_stage=2, max_length=128,
        teacher_epochs=3, student_epochs=3, warmup_epochs=1, batch_size=32, seeds=(0, 1, 2),
        optimizer="adamw", lr=2e-5, weight_decay=0.0),
}


def synthetic_text_knobs(profile: Profile) -> dict:
    """The synthetic_text knobs of ``profile`` (lexicon, ambiguity) as keyword arguments
    of ``synthetic_text.make_synthetic_text`` and ``make_text_pretraining_corpus``."""
    return {"n_pairs": profile.text_antonym_pairs, "word_zipf": profile.text_word_zipf,
            "ambiguous_rate": profile.text_ambiguous_rate}


def get_profile(name: str, dataset: str = "synthetic") -> Profile:
    """The named profile for ``dataset`` (:data:`TEXT_PROFILES` for a text dataset,
    else :data:`PROFILES`), or a ValueError that lists the known ones."""
    table = TEXT_PROFILES if dataset in TEXT_DATASETS else PROFILES
    if name not in table:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(table)} "
                         "(e.g. `--profile smoke` for a quick end-to-end check)")
    return table[name]


def parse_overrides(items) -> dict:
    """``["student_epochs=5", "student_widths=[8,16,32]"]`` -> ``{"student_epochs": 5, ...}``:
    values are read as JSON (numbers, true/false, lists, quoted strings), else as text.
    Checked against the profile's fields by :func:`apply_overrides`."""
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set student_epochs=5")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def apply_overrides(profile: Profile, overrides: dict | None) -> Profile:
    """``profile`` with ``overrides`` (field -> value) applied, each checked against the
    field's type (lists become tuples; an int is accepted for a float field), and the
    result checked by :func:`check_profile`."""
    if not overrides:
        return profile
    settable = sorted(f.name for f in dataclasses.fields(Profile) if f.name != "name")
    changes = {}
    for key, value in overrides.items():
        if key not in settable:
            raise ValueError(f"--set {key}=...: no such profile field; settable fields are {settable}")
        current = getattr(profile, key)
        if isinstance(current, tuple):
            whole = key != "methods"
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(_whole(v) if whole else isinstance(v, str) for v in items):
                raise ValueError(f"--set {key}={_show(value)}: expected a JSON list of "
                                 + (f"whole numbers, e.g. {key}=[0,1]" if whole else
                                    'quoted names, e.g. methods=["erm","kd"]'))
            value = tuple(items)
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"--set {key}={value!r}: expected true or false")
        elif isinstance(current, float) and _whole(value):
            value = float(value)
        if not isinstance(current, tuple) and current is not None and type(value) is not type(current):
            raise ValueError(f"--set {key}={value!r}: expected a {type(current).__name__} "
                             f"like the profile's {current!r}")
        changes[key] = value
    return check_profile(profile.replace(**changes))


#: The architectures the model builders know (images: ``models.build_backbone``; text:
#: a tiny BERT built here or ``hf``, a local Hugging Face folder), the optimizers
#: (``train.TrainConfig``), the text exit's pools and the selection rules.
ARCHS = ("narrow_resnet", "resnet18", "resnet34", "resnet50", "tiny_bert", "hf")
OPTIMIZERS = ("sgd", "adamw")
EXIT_POOLS = ("cls", "mean")
SELECT_ON = ("worst_group_acc", "avg_acc")
#: Stages of the torchvision ResNets (their widths come with the architecture).
_TORCHVISION_STAGES = 4


def _show(value) -> str:
    """A value as ``--set`` takes it: a list as JSON, anything else as its repr."""
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def check_profile(profile: Profile) -> Profile:
    """``profile`` if every value is usable, else a ValueError naming the field and the
    values it takes: positive epochs and batch size, finite positive learning rates,
    known architectures, optimizer, pool and selection rule, well-formed widths,
    ``exit_stage`` among the student's stages, at least one seed and one method."""
    p = profile

    def bad(field, value, what):
        raise ValueError(f"--set {field}={_show(value)}: {what}")

    for field, low in (("teacher_epochs", 1), ("student_epochs", 1), ("batch_size", 1),
                       ("warmup_epochs", 0), ("teacher_pretrain_per_pair", 0),
                       ("teacher_pretrain_epochs", 0), ("teacher_adapt_epochs", 0),
                       ("student_pretrain_per_pair", 0), ("student_pretrain_epochs", 0),
                       ("max_length", 0), ("text_antonym_pairs", 1)):
        v = getattr(p, field)
        if not _whole(v) or v < low:
            bad(field, v, f"expected a whole number >= {low}")
    for field in ("lr", "teacher_adapt_lr", "teacher_lr", "exit_lr_scale", "data_scale"):
        v = getattr(p, field)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            bad(field, v, "expected a finite number > 0")
    for field, high in (("weight_decay", math.inf), ("text_word_zipf", math.inf),
                        ("lr_warmup", 1.0), ("teacher_pretrain_alignment", 1.0),
                        ("text_ambiguous_rate", 1.0)):
        v = getattr(p, field)
        if not (math.isfinite(v) and 0 <= v <= high):
            bad(field, v, "expected a finite number >= 0" + (f" and <= {high:g}" if high < math.inf else ""))
    for field, known in (("teacher_arch", ARCHS), ("student_arch", ARCHS), ("optimizer", OPTIMIZERS),
                         ("exit_pool", EXIT_POOLS), ("select_on", SELECT_ON),
                         ("teacher_select_on", SELECT_ON)):
        if getattr(p, field) not in known:
            bad(field, getattr(p, field), f"choose one of {known}")
    for role in ("teacher", "student"):
        widths, blocks = getattr(p, f"{role}_widths"), getattr(p, f"{role}_blocks")
        for field, v in ((f"{role}_widths", widths), (f"{role}_blocks", blocks)):
            if not all(_whole(w) and w >= 1 for w in v):
                bad(field, v, "expected whole numbers >= 1")
        if len(widths) != len(blocks):
            raise ValueError(f"--set {role}_widths={_show(widths)} has {len(widths)} stages but "
                             f"{role}_blocks={_show(blocks)} has {len(blocks)}: give one block "
                             "count per stage")
    stages = {"narrow_resnet": len(p.student_widths), "tiny_bert": (p.student_blocks or (0,))[0],
              "hf": None}.get(p.student_arch, _TORCHVISION_STAGES)
    if not _whole(p.exit_stage) or p.exit_stage < 1 or (stages is not None and p.exit_stage > stages):
        bad("exit_stage", p.exit_stage, f"the student has stages 1 to {stages}" if stages is not None
            else "expected a whole number >= 1 (a layer of the student)")
    for field in ("seeds", "methods"):
        if not getattr(p, field):
            bad(field, getattr(p, field), f"give at least one {field[:-1]}")
    resolve_methods(p)
    return p


def overrides_tag(overrides: dict | None) -> str:
    """The run-directory suffix of a run with overrides (``""`` without): such a run
    never writes into the plain profile's run directory."""
    return f"-set-{_digest(overrides)}" if overrides else ""


def _digest(obj) -> str:
    """Six hex digits of ``obj``'s JSON (keys sorted): a run directory's suffix."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]


def resolve_methods(profile: Profile, methods=None) -> tuple[str, ...]:
    """The methods a run compares: ``None`` or ``"default"`` -> the profile's own
    ``methods``; ``"extended"`` -> those and :data:`EXTRA_METHODS`, ``"laplace"`` -> those
    and :data:`LAPLACE_METHODS` (in table order, each once); a list of method names ->
    those, checked. ``dfr`` brings the method it retrains (``kd``) along."""
    if isinstance(methods, str) and methods not in METHOD_SETS:
        raise ValueError(f"unknown method set {methods!r}; choose one of {list(METHOD_SETS)} "
                         "or give a list of methods")
    named = methods is None or isinstance(methods, str)   # each method once: see the end
    chosen = tuple(profile.methods) + _SET_METHODS.get(methods, ()) if named else tuple(methods)
    if unknown := [m for m in chosen if m not in METHOD_SPECS]:
        raise ValueError(f"unknown methods {unknown}; valid ones are {list(METHODS)}")
    needed = tuple(METHOD_SPECS[m].last_layer_of for m in chosen if METHOD_SPECS[m].last_layer_of)
    return tuple(dict.fromkeys(chosen + needed))


def method_set_tag(methods=None) -> str:
    """The run-directory suffix of a named method set other than the profile's own
    (``"-extended"``, ``"-laplace"``; ``""`` for ``None``/``"default"``): an extended run never writes
    into the plain profile's run directory."""
    if methods is None or methods == "default":
        return ""
    if methods in METHOD_SETS:
        return f"-{methods}"
    if isinstance(methods, str):
        raise ValueError(f"unknown method set {methods!r}; choose one of {list(METHOD_SETS)}")
    return f"-methods-{_digest(list(methods))}"
