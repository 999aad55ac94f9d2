"""One command that measures what a lent GPU does for the study, as one table.

    .venv/bin/python bench/gpu_check.py --csv gpu_check.csv          # a lent GPU (auto)
    .venv/bin/python bench/gpu_check.py --device cpu --tiny           # plumbing, seconds

Rows ``section, config, metric, value, unit, note``, one per number, printed as an
aligned table on stdout (the same layout on every device, so two devices' tables can be
put side by side) and, with ``--csv PATH``, written as CSV (rewritten atomically after
every row, so a run cut short still leaves what it measured). Each row is also echoed
to stderr as it is measured. A failure inside one measurement (bf16 unsupported, a
compile error, out of memory) becomes an ``error`` row and the rest still runs.

Sections (``--sections``; run in this order):

* ``env``: device, torch/CUDA versions, threads, GPU name and memory.
* ``pipeline``: the input pipeline the training loop uses: rendering the built-in
  ``synthetic`` data at the ``paper`` profile's 224 px, ``data.iterate_batches`` over its
  training split with the profile's augmentation (and over val without), the ResNet-18
  student training on one resident batch against the same student fed by the loader
  (loop settings: bf16 + channels_last on CUDA), and the text batches (in-memory token
  ids, 128 tokens, batch 32).
* ``image``: the ``paper`` profile's models (torchvision ResNet-50 teacher, ResNet-18
  early-exit student), 224 px, random inputs resident on the device: teacher inference
  (batch 512, as ``train.predict``) and student training steps (batch 64, SGD, final +
  exit cross-entropy, as the loop), fp32 and bf16 autocast + channels_last; peak memory.
* ``text``: a BERT-base-sized early-exit student (random init, hidden 768, 12 layers, 12
  heads, 128 tokens, batch 32, AdamW; the project's own ``bert_config`` /
  ``build_text_student``): training tokens/s, fp32 and bf16.
* ``laplace``: the exit Laplace (``fit_exit_laplace``, ``ExitLaplace.predict``) on
  200,000 random 768-d features of 3 classes against laplace-torch 0.3 (last layer,
  Kronecker, fitted on a head-only model over the same features, as notebook 04): fit
  and predictive time (MC, 100 samples) and the largest difference of their logit
  covariances on a 2,000-instance subset.
* ``compile``: the ``image`` configurations under ``torch.compile`` (inductor), with the
  compile time (first call less one step) on its own row. Last, because it is the slowest
  and the likeliest to fail; skipped with a ``skipped`` row when ``--budget-s`` is near.
* ``summary``: ratios read off the rows above (bf16 and compile speed-ups, whether the
  loader keeps up with the student) and the whole run's wall time.

Timing: ``--warmup`` steps, then timed steps until ``--steps`` steps or ``--seconds``
seconds, whichever comes first (``torch.cuda.synchronize()`` around each on CUDA); the
median step is reported. Full size on one H100 (an estimate: no GPU has run it yet):
imports 10 s, pipeline 40 s, image 30 s, text 15 s, laplace 30 s, compile four
configurations of 30-70 s each (inductor; the first call holds the compile): 5-6 min in
all. No compile configuration starts after ``--budget-s`` (360 s), so the run ends by
about 7.5 min; give it ``timeout 480``. ``--tiny`` shrinks everything (16 px, batch 8,
the ``smoke`` profile's narrow ResNets, a 2-layer hidden-32 BERT, 1,000 x 16 features,
dynamo with the ``eager`` backend so no compiler runs) to check the plumbing on a CPU.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()  # the run's wall time includes its imports

import argparse
import contextlib
import csv
import dataclasses
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fairkd_utils import data, models, train
from fairkd_utils.exit_laplace import fit_exit_laplace
from fairkd_utils.profiles import get_profile, resolve_device
from fairkd_utils.text_models import bert_config, build_text_student

FIELDS = ("section", "config", "metric", "value", "unit", "note")
SECTIONS = ("env", "pipeline", "image", "text", "laplace", "compile", "summary")
TAU = 1.0  # the prior precision both Laplace implementations use


@dataclasses.dataclass(frozen=True)
class Sizes:
    image_size: int
    train_batch: int        # the paper profile's batch (student training)
    eval_batch: int         # train.predict's batch (teacher inference)
    data_scale: float       # the synthetic data rendered for the pipeline section
    text_hidden: int
    text_layers: int
    text_heads: int
    text_tokens: int
    text_batch: int
    text_vocab: int
    text_loader_n: int      # token-id pairs held by the text loader's dataset
    lap_n: int
    lap_d: int
    lap_subset: int         # instances whose logit covariances are compared
    compile_backend: str
    profile: str = "paper"  # the image profile whose teacher, student, batch and augmentation run

    def image_profile(self):
        """The image models' profile: ``paper``, or for ``--tiny`` the ``smoke`` profile's
        narrow ResNets (student widths >= 16: torch's CPU channels_last backward can crash
        on 8-channel convs, ``train.use_channels_last``) with paper's augmentation."""
        if self.profile == "paper":
            return get_profile("paper")
        return get_profile("smoke").replace(name="tiny", image_size=self.image_size, augment=True,
                                            batch_size=self.train_batch, student_widths=(16, 16, 32))


FULL = Sizes(image_size=224, train_batch=64, eval_batch=512, data_scale=0.2, text_hidden=768,
             text_layers=12, text_heads=12, text_tokens=128, text_batch=32, text_vocab=30522,
             text_loader_n=20_000, lap_n=200_000, lap_d=768, lap_subset=2000,
             compile_backend="inductor")
TINY = Sizes(image_size=16, train_batch=8, eval_batch=16, data_scale=0.01, text_hidden=32,
             text_layers=2, text_heads=2, text_tokens=16, text_batch=4, text_vocab=100,
             text_loader_n=200, lap_n=1000, lap_d=16, lap_subset=100, compile_backend="eager",
             profile="tiny")


# --------------------------------------------------------------------------- the table
class Table:
    """The rows measured so far; echoes each to stderr and rewrites ``csv_path``."""

    def __init__(self, csv_path=None):
        self.rows: list[dict] = []
        self.csv_path = Path(csv_path) if csv_path else None

    def add(self, section, config, metric, value, unit="", note=""):
        row = {"section": section, "config": config, "metric": metric, "value": float(value),
               "unit": unit, "note": " ".join(str(note).split())}
        self.rows.append(row)
        print(" | ".join(_cell(row[f]) for f in FIELDS), file=sys.stderr, flush=True)
        if self.csv_path is not None:
            write_csv(self.csv_path, self.rows)
        return row

    def value(self, section, config, metric):
        """The value of the first row with these keys, or None."""
        for r in self.rows:
            if (r["section"], r["config"], r["metric"]) == (section, config, metric):
                return r["value"]
        return None

    def format(self) -> str:
        """The rows as aligned text: columns separated by at least two spaces (no field
        holds two spaces in a row), the note last."""
        cells = [list(FIELDS)] + [[_cell(r[f]) for f in FIELDS] for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(FIELDS) - 1)]
        return "\n".join("  ".join([c.ljust(w) for c, w in zip(line, widths)] + [line[-1]]).rstrip()
                         for line in cells)


def _cell(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_csv(path, rows) -> None:
    """``rows`` as CSV (values as ``repr``, so they read back exactly), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows({**r, "value": repr(r["value"])} for r in rows)
    os.replace(tmp, path)


def read_csv(path) -> list[dict]:
    """The rows of a :func:`write_csv` file, values as floats."""
    with open(path, newline="") as f:
        return [{**r, "value": float(r["value"])} for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- helpers
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    else:  # resets the process's peak RSS (VmHWM) to its current RSS, where Linux allows
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def _peak_gib(dev) -> tuple[float, str]:
    """Peak memory since :func:`_reset_peak`: CUDA allocated, else the process's peak RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 30, "peak CUDA memory allocated"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2 ** 20, "peak process RSS"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "peak process RSS (never reset)"


def _add_peak(t: Table, dev, section, config):
    gib, what = _peak_gib(dev)
    t.add(section, config, "peak_mem", gib, "GiB", what)


def timed(step, dev, warmup: int, steps: int, seconds: float) -> tuple[float, float]:
    """(median seconds per ``step()``, seconds of the first call): ``warmup`` untimed calls
    (the first one timed on its own), then timed calls until ``steps`` or ``seconds``."""
    _sync(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    times, start = [], time.perf_counter()
    while len(times) < max(1, steps) and (len(times) < 3 or time.perf_counter() - start < seconds):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], first


def _autocast(dev, bf16: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)


class Runner:
    """Where the measurements run, how long they take, and the table they fill."""

    def __init__(self, table: Table, dev: torch.device, sizes: Sizes, args):
        self.t, self.dev, self.sz, self.args = table, dev, sizes, args
        self.start = _T_START

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def guard(self, section: str, config: str):
        """Run one measurement; an exception becomes an ``error`` row instead of ending the run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 -- any failure is reported, the rest still runs
            self.t.add(section, config, "error", float("nan"), "-", f"{type(exc).__name__}: {exc}"[:300])
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def time(self, step):
        a = self.args
        return timed(step, self.dev, a.warmup, a.steps, a.seconds)


# --------------------------------------------------------------------------- env
def section_env(r: Runner):
    dev = r.dev
    note = (f"torch {torch.__version__}, python {platform.python_version()}, "
            f"float32 matmul precision {torch.get_float32_matmul_precision()}")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        note += (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                 f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}")
        r.t.add("env", str(dev), "gpu_memory", props.total_memory / 2 ** 30, "GiB",
                f"{props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs")
    r.t.add("env", str(dev), "cpu_threads", torch.get_num_threads(), "threads", note)
    r.t.add("env", str(dev), "cpu_cores", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "cores", platform.processor() or platform.machine())


# --------------------------------------------------------------------------- image models
def _image_step(r: Runner, role: str, bf16: bool, cl: bool, compiled: bool):
    """A teacher inference or student training step of the paper profile's models on
    random inputs resident on the device; returns (step, images per step)."""
    dev, sz = r.dev, r.sz
    prof = sz.image_profile()
    build = models.build_teacher if role == "teacher" else models.build_student
    model = build(prof, 2, seed=0).to(dev)
    batch = sz.eval_batch if role == "teacher" else sz.train_batch
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, sz.image_size, sz.image_size, device=dev, generator=gen)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=dev, generator=gen)
    net = torch.compile(model, backend=sz.compile_backend) if compiled else model
    if role == "teacher":
        model.eval()

        def step():
            with torch.no_grad(), _autocast(dev, bf16):
                net(x)
        return step, batch
    model.train()
    opt = train._make_optimizer(model, train.TrainConfig.from_profile(prof, "student"))

    def step():
        with _autocast(dev, bf16):
            out = net(x)
            loss = F.cross_entropy(out.logits.float(), y) + F.cross_entropy(out.exit_logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, batch


#: precision -> (bf16 autocast, channels_last)
IMAGE_CONFIGS = {"fp32": (False, False), "bf16+channels_last": (True, True)}
#: The order the image configurations run in, the likeliest to matter first (the compile
#: section may run out of budget): the loop's own CUDA settings for the student, then
#: train.predict's fp32 for the teacher.
IMAGE_ORDER = (("student", "bf16+channels_last"), ("teacher", "fp32"), ("student", "fp32"),
               ("teacher", "bf16+channels_last"))


def role_name(prof, role: str) -> str:
    if role == "teacher":
        return f"{prof.teacher_arch} teacher inference"
    return f"{prof.student_arch} student train"


def image_config(prof, role: str, precision: str, compiled: bool) -> str:
    return f"{role_name(prof, role)} {precision} {'compiled' if compiled else 'eager'}"


def _image_rows(r: Runner, section: str, compiled: bool):
    for role, precision in IMAGE_ORDER:
        config = image_config(r.sz.image_profile(), role, precision, compiled)
        if compiled and r.elapsed() > r.args.budget_s:
            r.t.add(section, config, "skipped", float("nan"), "-",
                    f"{r.elapsed():.0f} s elapsed, past --budget-s {r.args.budget_s:.0f}")
            continue
        with r.guard(section, config):
            _reset_peak(r.dev)
            step, n = _image_step(r, role, *IMAGE_CONFIGS[precision], compiled)
            sec, first = r.time(step)
            r.t.add(section, config, "throughput", n / sec, "images/s",
                    f"batch {n}, {r.sz.image_size} px, median step {sec * 1e3:.1f} ms")
            if compiled:
                r.t.add(section, config, "compile_s", max(first - sec, 1e-6), "s",
                        f"first call {first:.1f} s less one step; backend {r.sz.compile_backend}")
            _add_peak(r.t, r.dev, section, config)


def section_image(r: Runner):
    _image_rows(r, "image", compiled=False)


def section_compile(r: Runner):
    _image_rows(r, "compile", compiled=True)


# --------------------------------------------------------------------------- pipeline
def section_pipeline(r: Runner):
    dev, sz = r.dev, r.sz
    prof = sz.image_profile()
    cfg = "synthetic {0} px, scale {1:g}".format(sz.image_size, sz.data_scale)
    splits = None
    _reset_peak(dev)
    with r.guard("pipeline", f"render {cfg}"):
        t0 = time.perf_counter()
        splits = data.load_splits("synthetic", image_size=sz.image_size, scale=sz.data_scale,
                                  augment=prof.augment)
        n = sum(len(ds) for ds in splits.values())
        r.t.add("pipeline", f"render {cfg}", "throughput", n / (time.perf_counter() - t0), "images/s",
                f"data.load_splits, {n} images in all three splits")
    if splits is not None:
        for split in ("train", "val"):
            ds = splits[split]
            config = f"iterate_batches {split} {cfg} augment={ds.augment}"
            batch = sz.train_batch if split == "train" else sz.eval_batch
            with r.guard("pipeline", config):
                ips = _loader_rate(r, ds, batch, shuffle=split == "train")
                r.t.add("pipeline", config, "throughput", ips, "images/s",
                        f"batch {batch}, shuffled={split == 'train'}, copied to {dev.type}")
        _fed_student(r, splits["train"], cfg)
    config = f"iterate_batches text {sz.text_tokens} tokens"
    with r.guard("pipeline", config):
        ds = _token_dataset(sz)
        rate = _loader_rate(r, ds, sz.text_batch, shuffle=True) * sz.text_tokens
        r.t.add("pipeline", config, "throughput", rate, "tokens/s",
                f"batch {sz.text_batch}, {len(ds)} in-memory pairs, shuffled, copied to {dev.type}")
    _add_peak(r.t, dev, "pipeline", "section")


def _loader_rate(r: Runner, ds, batch_size: int, shuffle: bool) -> float:
    """Items/s of ``data.iterate_batches`` with every batch on the device (augmented as
    ``ds.augment`` says), over whole passes for ``--seconds``."""
    gen = torch.Generator().manual_seed(0)
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < r.args.seconds:
        for b in data.iterate_batches(ds, batch_size, shuffle=shuffle, generator=gen, device=r.dev,
                                      pin_memory=r.dev.type == "cuda"):
            n += len(b.y)
        _sync(r.dev)
    return n / (time.perf_counter() - start)


def _fed_student(r: Runner, ds, cfg: str):
    """The paper student with the loop's settings on this device (bf16 + channels_last on
    CUDA; fp32 and ``train.use_channels_last`` on CPU) on one resident batch, and fed one
    pass of ``iterate_batches`` over ``ds`` (augmented, shuffled, copied per batch)."""
    prof, dev = r.sz.image_profile(), r.dev
    model = models.build_student(prof, ds.n_classes, seed=0).to(dev)
    bf16 = dev.type == "cuda"
    cl = train.use_channels_last(model, dev)
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
    opt = train._make_optimizer(model, train.TrainConfig.from_profile(prof, "student"))
    label = f"{role_name(prof, 'student')} loop settings (bf16={bf16}, channels_last={cl})"

    def step(x, y):
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        with _autocast(dev, bf16):
            out = model(x)
            loss = F.cross_entropy(out.logits.float(), y) + F.cross_entropy(out.exit_logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    batch = r.sz.train_batch
    with r.guard("pipeline", f"{label} resident batch"):
        x0 = ds.x[:batch].to(dev)
        y0 = ds.y[:batch].to(dev)
        sec, _ = r.time(lambda: step(x0, y0))
        r.t.add("pipeline", f"{label} resident batch", "throughput", len(y0) / sec, "images/s",
                f"batch {len(y0)}, one batch kept on the device")
    with r.guard("pipeline", f"{label} fed by iterate_batches"):
        gen = torch.Generator().manual_seed(0)
        n, start = 0, None
        for k, b in enumerate(data.iterate_batches(ds, batch, shuffle=True, generator=gen,
                                                   device=dev, pin_memory=dev.type == "cuda")):
            if k == min(2, len(ds) // batch - 1):  # the first batches untimed
                _sync(dev)
                n, start = 0, time.perf_counter()
            step(b.x, b.y)
            n += len(b.y)
        _sync(dev)
        r.t.add("pipeline", f"{label} fed by iterate_batches", "throughput",
                n / (time.perf_counter() - start), "images/s",
                f"one epoch of {cfg} less its first batches, augmented")


def _token_dataset(sz: Sizes):
    """An in-memory text split as the loaders hold one (token ids and token types,
    (N, 2, L)), random ids: the text batches' cost does not depend on their values."""
    gen = torch.Generator().manual_seed(0)
    n, L = sz.text_loader_n, sz.text_tokens
    ids = torch.randint(1, sz.text_vocab, (n, 1, L), generator=gen)
    types = (torch.arange(L) >= L // 2).long().expand(n, 1, L)
    y = torch.randint(0, 3, (n,), generator=gen)
    a = torch.randint(0, 2, (n,), generator=gen)
    return data.GroupDataset("bench_text", "train", y, a, n_classes=3, n_attrs=2,
                             group_names=[f"g{k}" for k in range(6)], ids=[str(i) for i in range(n)],
                             x=torch.cat([ids, types], 1), image_size=0)


# --------------------------------------------------------------------------- text
def section_text(r: Runner):
    dev, sz = r.dev, r.sz
    prof = get_profile("paper", "multinli")
    cfg = bert_config(sz.text_vocab, hidden_size=sz.text_hidden, num_layers=sz.text_layers,
                      num_heads=sz.text_heads, max_length=sz.text_tokens)
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(1, sz.text_vocab, (sz.text_batch, 1, sz.text_tokens), device=dev, generator=gen)
    types = (torch.arange(sz.text_tokens, device=dev) >= sz.text_tokens // 2).long()
    x = torch.cat([ids, types.expand(sz.text_batch, 1, -1)], 1)
    y = torch.randint(0, 3, (sz.text_batch,), device=dev, generator=gen)
    size = f"bert h{sz.text_hidden} L{sz.text_layers} heads{sz.text_heads} student train"
    for precision in ("fp32", "bf16"):
        config = f"{size} {precision}"
        with r.guard("text", config):
            _reset_peak(dev)
            model = build_text_student(cfg, 3, prof.exit_stage, seed=0, pool=prof.exit_pool).to(dev).train()
            opt = train._make_optimizer(model, train.TrainConfig.from_profile(prof, "student"))

            def step():
                with _autocast(dev, precision == "bf16"):
                    out = model(x)
                    loss = F.cross_entropy(out.logits.float(), y) + F.cross_entropy(out.exit_logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sec, _ = r.time(step)
            r.t.add("text", config, "throughput", sz.text_batch * sz.text_tokens / sec, "tokens/s",
                    f"batch {sz.text_batch} x {sz.text_tokens} tokens, AdamW, exit after layer "
                    f"{prof.exit_stage}, median step {sec * 1e3:.1f} ms")
            _add_peak(r.t, dev, "text", config)
            del model, opt


# --------------------------------------------------------------------------- laplace
def section_laplace(r: Runner):
    dev, sz = r.dev, r.sz
    n, d, C = sz.lap_n, sz.lap_d, 3
    config = f"{n} x {d} features, {C} classes"
    g = torch.Generator().manual_seed(0)
    head = models.ExitHead(d, C)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(C, d + 1, generator=g) / math.sqrt(d))
    head = head.to(dev)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64).to(dev)
    with torch.no_grad():
        probs = torch.softmax(head.double()(phi), -1)
    y = torch.multinomial(probs, 1, generator=torch.Generator(device=dev).manual_seed(1)).squeeze(1)
    sub = phi[:sz.lap_subset]
    ours_cov = None
    with r.guard("laplace", f"ours {config}"):
        # once untimed on a slice: the linear-algebra libraries' first-call set-up
        fit_exit_laplace(head, phi[:1000], y=y[:1000], prior="exact", tau=TAU).predict(phi[:100], link="mc")
        _reset_peak(dev)
        t0 = _now(dev)
        la = fit_exit_laplace(head, phi, y=y, prior="exact", tau=TAU)
        r.t.add("laplace", f"ours {config}", "fit_s", _now(dev) - t0, "s",
                f"fit_exit_laplace (head softmax, Kronecker factors, eigendecompositions), tau {TAU}")
        t0 = _now(dev)
        la.predict(phi, link="mc", n_samples=100, generator=torch.Generator(device=dev).manual_seed(2))
        r.t.add("laplace", f"ours {config}", "predict_s", _now(dev) - t0, "s",
                "ExitLaplace.predict, MC 100 samples, all instances")
        ours_cov = la.logit_mean_cov(sub)[1]
        _add_peak(r.t, dev, "laplace", f"ours {config}")
    with r.guard("laplace", f"laplace-torch {config}"):
        import laplace

        _reset_peak(dev)
        lin = torch.nn.Linear(d + 1, C, bias=False).double().to(dev)
        with torch.no_grad():
            lin.weight.copy_(head.linear.weight.double())
        pt = models.phi_tilde(phi)
        # CPU batches (as notebook 04), cut by a batch sampler rather than row by row;
        # laplace-torch moves each to the model's device
        batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(n)), 2048, False)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pt.cpu(), y.cpu()),
                                             batch_size=None, sampler=batches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = _now(dev)
            lt = laplace.Laplace(torch.nn.Sequential(lin), "classification", subset_of_weights="last_layer",
                                 hessian_structure="kron", prior_precision=TAU, last_layer_name="0")
            lt.fit(loader)
            r.t.add("laplace", f"laplace-torch {config}", "fit_s", _now(dev) - t0, "s",
                    f"laplace-torch {getattr(laplace, '__version__', '0.3')}, last layer, kron, CPU batches of 2048")
            gen = torch.Generator(device=dev).manual_seed(2)
            t0 = _now(dev)
            for i in range(0, n, 4096):
                lt(pt[i:i + 4096], pred_type="glm", link_approx="mc", n_samples=100, generator=gen)
            r.t.add("laplace", f"laplace-torch {config}", "predict_s", _now(dev) - t0, "s",
                    "glm predictive, MC 100 samples, all instances in chunks of 4096")
            lt_cov = lt._glm_predictive_distribution(models.phi_tilde(sub))[1]
        _add_peak(r.t, dev, "laplace", f"laplace-torch {config}")
        if ours_cov is not None:
            diff = float((ours_cov - lt_cov).abs().max())
            r.t.add("laplace", f"ours vs laplace-torch {config}", "cov_max_abs_diff",
                    max(diff, 1e-300), "logit^2", f"logit covariances of {len(sub)} instances; their largest "
                    f"entry {float(lt_cov.abs().max()):.3g}")


def _now(dev) -> float:
    _sync(dev)
    return time.perf_counter()


# --------------------------------------------------------------------------- summary
def section_summary(r: Runner):
    t, rows, prof = r.t, [], r.sz.image_profile()
    for role in ("teacher", "student"):
        eager = {p: t.value("image", image_config(prof, role, p, False), "throughput")
                 for p in IMAGE_CONFIGS}
        rows.append((f"{role_name(prof, role)} bf16+channels_last / fp32", eager["bf16+channels_last"],
                     eager["fp32"], "eager"))
        for p in IMAGE_CONFIGS:
            rows.append((f"{role_name(prof, role)} {p} compiled / eager",
                         t.value("compile", image_config(prof, role, p, True), "throughput"), eager[p], ""))
    size = f"bert h{r.sz.text_hidden} L{r.sz.text_layers} heads{r.sz.text_heads} student train"
    rows.append((f"{size} bf16 / fp32", t.value("text", f"{size} bf16", "throughput"),
                 t.value("text", f"{size} fp32", "throughput"), ""))
    fed = [x for x in t.rows if x["section"] == "pipeline" and x["config"].endswith("fed by iterate_batches")]
    res = [x for x in t.rows if x["section"] == "pipeline" and x["config"].endswith("resident batch")]
    if fed and res:
        rows.append((f"{role_name(prof, 'student')} fed by iterate_batches / resident batch", fed[0]["value"],
                     res[0]["value"], "below 1: the loop waits for its data"))
    loader = [x for x in t.rows if x["section"] == "pipeline" and x["config"].startswith("iterate_batches train")]
    if loader and res:
        rows.append((f"iterate_batches train / {role_name(prof, 'student')} resident batch", loader[0]["value"], res[0]["value"],
                     "below 1: the loader alone is slower than the student"))
    text_loader = t.value("pipeline", f"iterate_batches text {r.sz.text_tokens} tokens", "throughput")
    rows.append((f"iterate_batches text / {size} bf16", text_loader,
                 t.value("text", f"{size} bf16", "throughput"), ""))
    ours = t.value("laplace", f"ours {r.sz.lap_n} x {r.sz.lap_d} features, 3 classes", "fit_s")
    theirs = t.value("laplace", f"laplace-torch {r.sz.lap_n} x {r.sz.lap_d} features, 3 classes", "fit_s")
    rows.append(("exit Laplace fit, laplace-torch / ours", theirs, ours, ""))
    for name, num, den, note in rows:
        if num is not None and den is not None and num > 0 and den > 0:
            t.add("summary", name, "ratio", num / den, "x", note)
    t.add("summary", "gpu_check", "wall_s", r.elapsed(), "s", "whole run so far, imports included")


SECTION_FUNCS = {"env": section_env, "pipeline": section_pipeline, "image": section_image,
                 "text": section_text, "laplace": section_laplace, "compile": section_compile,
                 "summary": section_summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the plumbing on a CPU in seconds")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                    help=f"which sections to run, in the fixed order {' '.join(SECTIONS)} (default all)")
    ap.add_argument("--csv", default=None, help="also write the table to this CSV file")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; --tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="most timed steps (default 30; --tiny 2)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="most seconds of timed steps per measurement (default 4; --tiny 0.1)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="no compile configuration starts after this many seconds (default 360)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    for name, full, tiny in (("warmup", 5, 1), ("steps", 30, 2), ("seconds", 4.0, 0.1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.warmup < 1 or args.steps < 1 or not args.seconds > 0:
        ap.error("--warmup and --steps must be >= 1 and --seconds > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dev = torch.device(resolve_device(args.device))
    except ValueError as exc:  # --device cuda without a GPU
        ap.error(str(exc))
    table = Table(args.csv)
    runner = Runner(table, dev, TINY if args.tiny else FULL, args)
    print(f"gpu_check on {dev} ({'tiny' if args.tiny else 'full'} sizes), sections "
          f"{' '.join(s for s in SECTIONS if s in args.sections)}", file=sys.stderr, flush=True)
    for name in SECTIONS:
        if name in args.sections:
            t0 = time.perf_counter()
            with runner.guard(name, "section"):
                SECTION_FUNCS[name](runner)
            if name != "summary":
                table.add(name, "section", "elapsed_s", time.perf_counter() - t0, "s")
    print(table.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
