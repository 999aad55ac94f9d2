"""Training throughput of the text study's tiny BERTs on this CPU (not a test).

Prints the load average first (a shared CPU makes every number below slower), then,
for the default tiny student and teacher and a few alternative sizes: tokens/s (non-pad
tokens) of a forward + backward + optimiser step at batch 128 on synthetic_text pairs
(median and fastest of ``--steps`` steps), and the time of one epoch over the
synthetic_text train split at scale 1 (every batch of the split, shuffled; no
evaluation), measured and as implied by the fastest step, with the whole study's
training time the measured epochs imply (40 students x 10 epochs with a
validation pass each epoch; the teacher pretrained on the unbiased corpus, then adapted).

    python bench/bench_text_throughput.py [--threads 2] [--steps 20] [--optimizer adamw] [--all]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from fairkd_utils import synthetic_text, text_models
from fairkd_utils.data import iterate_batches
from fairkd_utils.models import StudentOutput

# (name, hidden, layers, heads, exit_layer or None for a teacher); the first student
# and the first teacher are the recommended defaults.
SIZES = [
    ("student h64 L3 (default)", 64, 3, 2, 1),
    ("teacher h128 L3 (default)", 128, 3, 4, None),
    ("student h64 L2", 64, 2, 2, 1),
    ("student h128 L2", 128, 2, 4, 1),
    ("teacher h128 L4", 128, 4, 4, None),
    ("teacher h256 L3", 256, 3, 4, None),
]
N_STUDENTS, STUDENT_EPOCHS = 40, 10


def build(vocab_size, length, hidden, layers, heads, exit_layer, seed=0):
    cfg = text_models.bert_config(vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                  max_length=length)
    if exit_layer is None:
        return text_models.build_text_teacher(cfg, 3, seed=seed)
    return text_models.build_text_student(cfg, 3, exit_layer, seed=seed)


def make_optimizer(model, name, lr):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def step_fn(model, opt):
    def step(x, y):
        out = model(x)
        if isinstance(out, StudentOutput):
            loss = F.cross_entropy(out.logits, y) + F.cross_entropy(out.exit_logits, y)
        else:
            loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def tokens_per_second(model, ds, *, batch_size, steps, warmup, optimizer):
    model.train()
    step = step_fn(model, make_optimizer(model, optimizer, 1e-3))
    x, y = ds.x[:batch_size], ds.y[:batch_size]
    tokens = int((x[:, 0] != synthetic_text.PAD).sum())
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t)
    times.sort()
    # median: typical under the current load; fastest: the nearest to an idle CPU
    median, fastest = times[len(times) // 2], times[0]
    return tokens / median, tokens / fastest, fastest


def epoch_seconds(model, ds, *, batch_size, optimizer):
    model.train()
    step = step_fn(model, make_optimizer(model, optimizer, 1e-3))
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for batch in iterate_batches(ds, batch_size, shuffle=True, generator=gen):
        step(batch.x, batch.y)
    return time.perf_counter() - t


@torch.no_grad()
def eval_seconds(model, splits, batch_size=512):
    model.eval()
    t = time.perf_counter()
    for name in ("val", "test"):
        for batch in iterate_batches(splits[name], batch_size, shuffle=False):
            model(batch.x)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--all", action="store_true", help="also time the alternative sizes' epochs")
    ap.add_argument("--pretrain-per-group", type=int, default=1700,
                    help="the teacher's pretraining corpus: pairs per group (for the total)")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--adapt-epochs", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) on "
          f"{os.cpu_count()} cores; torch threads {torch.get_num_threads()}, torch "
          f"{torch.__version__}")
    if load[0] > 0.5 * (os.cpu_count() or 1):
        print("  warning: the machine is busy; the numbers below are slower than an idle CPU's")
    splits = synthetic_text.make_synthetic_text(scale=1.0, seed=0)
    train = splits["train"]
    vocab = synthetic_text.synthetic_text_vocab()
    length = train.x.shape[-1]
    nonpad = float((train.x[:, 0] != synthetic_text.PAD).float().sum(1).mean())
    print(f"synthetic_text scale 1: train {len(train)}, val {len(splits['val'])}, test "
          f"{len(splits['test'])} pairs; {length} positions, {nonpad:.1f} non-pad tokens per "
          f"pair; vocabulary {vocab.size}; batch {args.batch_size}, {args.optimizer}")
    print("tokens/s: non-pad tokens per second of a training step, median step (typical under "
          "the current load) and fastest step (nearest to an idle CPU); epoch s: one measured "
          "epoch over train; idle epoch s: steps per epoch x fastest step")
    print(f"{'model':28s} {'params':>8s} {'tok/s med':>10s} {'tok/s best':>10s} {'epoch s':>8s} "
          f"{'idle epoch s':>12s} {'val+test eval s':>15s}")
    results = {}
    steps_per_epoch = -(-len(train) // args.batch_size)
    for k, (name, hidden, layers, heads, exit_layer) in enumerate(SIZES):
        model = build(vocab.size, length, hidden, layers, heads, exit_layer)
        n_params = sum(p.numel() for p in model.parameters())
        tok_med, tok_best, fastest = tokens_per_second(
            model, train, batch_size=args.batch_size, steps=args.steps, warmup=3,
            optimizer=args.optimizer)
        ep = ev = float("nan")
        if k < 2 or args.all:
            ep = epoch_seconds(model, train, batch_size=args.batch_size, optimizer=args.optimizer)
            ev = eval_seconds(model, splits)
        results[name] = (ep, ev)
        print(f"{name:28s} {n_params:8d} {tok_med:10.0f} {tok_best:10.0f} {ep:8.2f} "
              f"{steps_per_epoch * fastest:12.2f} {ev:15.2f}")
    (s_ep, s_ev), (t_ep, t_ev) = results[SIZES[0][0]], results[SIZES[1][0]]
    val_share = len(splits["val"]) / (len(splits["val"]) + len(splits["test"]))
    students = N_STUDENTS * STUDENT_EPOCHS * (s_ep + s_ev * val_share)     # val every epoch
    corpus = 6 * args.pretrain_per_group / len(train)                      # corpus / train size
    teacher = (args.pretrain_epochs * corpus + args.adapt_epochs) * (t_ep + t_ev * val_share)
    print(f"\nimplied study time: {N_STUDENTS} students x {STUDENT_EPOCHS} epochs (train + val "
          f"each epoch) = {students:.0f} s; teacher {args.pretrain_epochs} epochs on a "
          f"{6 * args.pretrain_per_group}-pair corpus + {args.adapt_epochs} on train = "
          f"{teacher:.0f} s; total {students + teacher:.0f} s")


if __name__ == "__main__":
    main()
