"""The text study's models: BERT-style teachers and early-exit students that plug into
the image study's training loop, built in code or loaded from local Hugging Face
folders (never a download).

They read the ``(N, 2, L)`` layout of :mod:`.multinli` (input ids, token type ids).
Pieces: :class:`TextTeacher`, :class:`TextEarlyExitStudent`; :func:`bert_config`,
:func:`build_text_teacher`, :func:`build_text_student` (tiny encoders from code);
:func:`load_tokenizer`, :func:`load_text_teacher`, :func:`load_text_student` (local
folders) and :func:`check_model_folders` (the runner's check of those folders).

``transformers`` is imported inside the functions that need it (the optional extra
``text``): importing this module works without it, and the image study never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .models import ExitHead, StudentOutput, _seeded

__all__ = ["TextTeacher", "TextEarlyExitStudent", "bert_config", "build_text_teacher",
           "build_text_student", "load_tokenizer", "load_text_teacher", "load_text_student",
           "check_model_folders"]


class _TextClassifier(nn.Module):
    """What both text models share: the encoder, its pad id, dropout as the encoder's
    ``hidden_dropout_prob`` and a linear classifier on ``[CLS]`` initialised as BERT's
    (normal with the config's ``initializer_range``, zero bias)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        self.dropout = nn.Dropout(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0)
        self.classifier = nn.Linear(cfg.hidden_size, n_classes)
        nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)
        self.n_classes = int(n_classes)

    def _inputs(self, x: torch.Tensor) -> dict:
        """The encoder's keyword arguments for ``x`` (N, 2, L): input ids, the attention
        mask ``ids != pad_id`` and, when the encoder has several, the token types."""
        if x.ndim != 3 or x.shape[1] != 2:
            raise ValueError(f"text models take x of shape (N, 2, L) (input ids, token type ids), "
                             f"got {tuple(x.shape)}")
        max_pos = getattr(self.encoder.config, "max_position_embeddings", None)
        if max_pos is not None and x.shape[2] > max_pos:
            raise ValueError(f"sequences of {x.shape[2]} tokens, but the encoder has "
                             f"{max_pos} positions; tokenise with max_length <= {max_pos}")
        ids = x[:, 0]
        kwargs = {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}
        if (getattr(self.encoder.config, "type_vocab_size", 0) or 0) > 1:
            kwargs["token_type_ids"] = x[:, 1]
        return kwargs


class TextTeacher(_TextClassifier):
    """A BERT-like encoder + a linear classifier on the pooled ``[CLS]``:
    ``forward(x) -> logits (N, C)``.

    The pooled ``[CLS]`` is the encoder's pooler output (BERT's tanh layer, what
    ``BertForSequenceClassification`` classifies) when it has a pooler, else the last
    layer's ``[CLS]`` state. Dropout as the encoder's ``hidden_dropout_prob``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder(**self._inputs(x))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return self.classifier(self.dropout(pooled))


class TextEarlyExitStudent(_TextClassifier):
    """A BERT-like encoder with an early exit, the text twin of
    :class:`~fairkd_utils.models.EarlyExitStudent`; ``forward(x) -> StudentOutput``.

    Final head: a linear classifier on the last layer's ``[CLS]`` state (after
    dropout). Early exit: an :class:`~fairkd_utils.models.ExitHead` on ``phi``, the
    hidden state after layer ``exit_layer`` (1-based; 0 would be the embeddings)
    pooled by ``pool``: ``"cls"`` its ``[CLS]`` position, ``"mean"`` the mean over the
    attention mask's tokens. ``phi`` comes from ``output_hidden_states`` of the one
    forward pass (the encoder computes every layer's state anyway; they are only
    returned, not recomputed). With ``detach_exit=True`` (default) the exit trains on
    ``phi.detach()``: it reads what the first layers encode without changing them.
    A pooler the encoder may carry is dropped (``encoder.pooler = None``): unused here.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, exit_layer: int, pool: str = "cls",
                 detach_exit: bool = True):
        n_layers = int(encoder.config.num_hidden_layers)
        if isinstance(exit_layer, bool) or int(exit_layer) != exit_layer \
                or not 1 <= int(exit_layer) <= n_layers:
            raise ValueError(f"exit_layer={exit_layer!r} but the student's encoder has layers "
                             f"1..{n_layers}; set the profile's exit_layer in that range")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: the exit pools the layer's states by 'cls' (the "
                             "[CLS] position) or 'mean' (mean over the attention mask)")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        super().__init__(encoder, n_classes)
        self.exit_layer = int(exit_layer)
        self.pool = pool
        self.detach_exit = bool(detach_exit)
        self.exit = ExitHead(encoder.config.hidden_size, n_classes)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        kwargs = self._inputs(x)
        out = self.encoder(**kwargs, output_hidden_states=True)
        h = out.hidden_states[self.exit_layer]
        if self.pool == "cls":
            phi = h[:, 0]
        else:
            mask = kwargs["attention_mask"].unsqueeze(-1).to(h.dtype)
            phi = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        if self.detach_exit:
            phi = phi.detach()
        logits = self.classifier(self.dropout(out.last_hidden_state[:, 0]))
        return StudentOutput(logits, self.exit(phi), phi)


def bert_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 2, intermediate_size: int | None = None, max_length: int = 32,
                dropout: float = 0.0, pad_token_id: int = 0):
    """A ``transformers.BertConfig`` built in code (nothing read or downloaded):
    ``intermediate_size`` defaults to ``4 * hidden_size``; ``max_length`` is the number
    of positions; two token types (premise, hypothesis); ``dropout`` for hidden states
    and attention probabilities.

    ``dropout`` defaults to 0 (BERT's is 0.1): the study's training loop draws all its
    randomness from its own seeded generator and never seeds the global RNG (the image
    networks have no dropout), so dropout would make a training run depend on the global
    RNG state -- reruns would differ and a method continuing from the shared warm-up
    would no longer equal its run from scratch."""
    from transformers import BertConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    return BertConfig(vocab_size=int(vocab_size), hidden_size=int(hidden_size),
                      num_hidden_layers=int(num_layers), num_attention_heads=int(num_heads),
                      intermediate_size=int(intermediate_size or 4 * hidden_size),
                      max_position_embeddings=int(max_length), type_vocab_size=2,
                      hidden_dropout_prob=float(dropout),
                      attention_probs_dropout_prob=float(dropout), pad_token_id=int(pad_token_id))


def build_text_teacher(cfg, n_classes: int, seed: int | None = None) -> TextTeacher:
    """A randomly initialised BERT (``BertModel(cfg)``, with pooler) + classifier;
    ``seed`` fixes the initialisation (the global RNG is left as it was)."""
    from transformers import BertModel

    with _seeded(seed):
        return TextTeacher(BertModel(cfg), n_classes)


def build_text_student(cfg, n_classes: int, exit_layer: int, seed: int | None = None, *,
                       pool: str = "cls", detach_exit: bool = True) -> TextEarlyExitStudent:
    """A randomly initialised BERT (no pooler) with its early exit after ``exit_layer``;
    ``seed`` fixes the initialisation (the global RNG is left as it was)."""
    from transformers import BertModel

    with _seeded(seed):
        return TextEarlyExitStudent(BertModel(cfg, add_pooling_layer=False), n_classes,
                                    exit_layer, pool=pool, detach_exit=detach_exit)


_LOCAL_ONLY = ("nothing is downloaded: put a Hugging Face model folder there (config.json, "
               "model.safetensors or pytorch_model.bin, tokenizer files), e.g. one written by "
               "save_pretrained")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def _model_dir(path, what: str, files=("config.json",),
               problem="is not a Hugging Face model folder (no config.json)") -> Path:
    """The existing folder ``path`` holding one of ``files``, else an error saying
    ``problem`` and how to make such a folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {str(p)!r} does not exist or is not a folder; "
                                f"{_LOCAL_ONLY}")
    if not any((p / f).is_file() for f in files):
        raise ValueError(f"{str(p)!r} {problem}; {_LOCAL_ONLY}")
    return p


def _tokenizer_dir(path) -> Path:
    return _model_dir(path, "tokenizer", _TOKENIZER_FILES,
                      f"is not a tokenizer folder: none of {list(_TOKENIZER_FILES)} is there")


def check_model_folders(profile, dataset: str, teacher_model=None, student_model=None) -> None:
    """The runner's check of a text run's local Hugging Face folders, before any kernel
    starts: a teacher or student of arch ``"hf"`` needs its folder with ``config.json``
    and weights, and a student's encoder must have the layer its exit reads
    (``profile.exit_stage``); MultiNLI is tokenised with the teacher folder's tokenizer,
    whatever the archs. The problems of both folders are reported together, in one
    ValueError; reading the folders' files is all it does (no ``transformers``)."""
    problems = []
    for role, arch, path in (("teacher", profile.teacher_arch, teacher_model),
                             ("student", profile.student_arch, student_model)):
        if arch != "hf":
            continue
        if not path:
            problems.append(f"--profile {profile.name} loads the {role} from a local Hugging Face "
                            f"folder: pass --{role}-model DIR")
            continue
        try:
            p = _model_dir(path, f"--{role}-model")
            _model_dir(p, f"--{role}-model", _WEIGHT_FILES,
                       f"holds no weights (none of {list(_WEIGHT_FILES)})")
            if role == "student":
                _check_exit_layer(p / "config.json", profile.exit_stage)
        except (OSError, ValueError) as exc:
            problems.append(f"--{role}-model: {exc}")
    if dataset == "multinli":
        try:
            if not teacher_model:
                raise ValueError("--dataset multinli is tokenised with the teacher folder's "
                                 "tokenizer: pass --teacher-model DIR")
            _tokenizer_dir(teacher_model)
        except (OSError, ValueError) as exc:
            problems.append(f"--teacher-model (the tokenizer): {exc}")
    if problems:
        raise ValueError("the text run's model folders cannot be used:\n  " + "\n  ".join(problems))


def _check_exit_layer(config_path: Path, exit_layer: int) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(config_path)!r} is not a JSON config ({exc})") from None
    layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    if isinstance(layers, int) and not 1 <= exit_layer <= layers:
        raise ValueError(f"the profile's exit_stage={exit_layer} but {str(config_path)!r} has "
                         f"layers 1..{layers}; set exit_stage in that range (--set exit_stage=K)")


def _from_pretrained(auto, p: Path, what: str, errors: tuple, **kwargs):
    """``auto.from_pretrained`` on the local folder ``p``; its failures (``errors``) as
    a ValueError naming ``what`` could not be loaded and why."""
    try:
        return auto.from_pretrained(str(p), local_files_only=True, **kwargs)
    except errors as exc:
        raise ValueError(f"could not load {what} from {str(p)!r} ({type(exc).__name__}: "
                         f"{str(exc).strip()[:300]}); {_LOCAL_ONLY}") from None


def load_tokenizer(path):
    """The tokenizer saved in a local folder (``AutoTokenizer``, ``local_files_only``)."""
    p = _tokenizer_dir(path)
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, p, "a tokenizer", (OSError, ValueError, KeyError, TypeError))


def _load_encoder(path, what: str, dropout: float | None = None):
    p = _model_dir(path, what)
    from transformers import AutoModel

    kwargs = {} if dropout is None else {"hidden_dropout_prob": float(dropout),
                                         "attention_probs_dropout_prob": float(dropout)}
    return _from_pretrained(AutoModel, p, "a model",
                            (OSError, ValueError, KeyError, TypeError, RuntimeError), **kwargs)


def load_text_teacher(path, n_classes: int, *, seed: int | None = None,
                      dropout: float | None = None) -> TextTeacher:
    """A :class:`TextTeacher` on the encoder saved in a local folder (``AutoModel``,
    ``local_files_only``); the classifier is new, initialised under ``seed``.
    ``dropout`` (BERT-style configs) replaces the checkpoint's dropout probabilities;
    ``None`` keeps them (0.1 for BERT; see :func:`bert_config` on why the study's loop
    wants 0)."""
    encoder = _load_encoder(path, "teacher model", dropout)
    with _seeded(seed):
        return TextTeacher(encoder, n_classes)


def load_text_student(path, n_classes: int, exit_layer: int, pool: str = "cls",
                      detach_exit: bool = True, *, seed: int | None = None,
                      dropout: float | None = None) -> TextEarlyExitStudent:
    """A :class:`TextEarlyExitStudent` on the encoder saved in a local folder; the final
    classifier and the exit are new, initialised under ``seed``; ``dropout`` as in
    :func:`load_text_teacher`."""
    encoder = _load_encoder(path, "student model", dropout)
    with _seeded(seed):
        return TextEarlyExitStudent(encoder, n_classes, exit_layer, pool=pool,
                                    detach_exit=detach_exit)

