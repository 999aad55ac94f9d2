"""Calibration of the synthetic dataset's defaults (issue 2, "Data").

With a profile's whole student budget on full-size synthetic data, per seed:
  (a) ERM's test worst-group accuracy is >= 20 points below its train-weighted
      average accuracy (group accuracies weighted by train group proportions);
  (b) the same student trained with group-balanced weights (inverse train-group
      frequency, true groups) gains >= 10 points of worst-group accuracy over ERM.
The data seed is the training seed here, so each seed also draws fresh data.

    .venv/bin/python bench/calibrate_synthetic.py [--profile default] [--seeds 0 1 2]
        [--scale 1.0] [--threads 2] [--reliability 0.85] ...

The default loop is a short inline one (SGD, momentum 0.9, per-epoch cosine schedule,
weights after the profile's warm-up normalised to mean 1 per batch, the exit head
trained alongside on detached features) evaluated at the last epoch. ``--loop library``
uses ``fairkd_utils.train.train_model`` with the ``erm`` / ``group_balanced``
objectives of ``fairkd_utils.losses`` instead (checkpoint selected on val worst-group
accuracy, as in the pipeline); nothing else here depends on the loop.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fairkd_utils import data as fkdata
from fairkd_utils.models import build_student
from fairkd_utils.profiles import get_profile


def train_student(splits, profile, *, weighting: str, seed: int, device="cpu"):
    """Train the profile's student for its whole budget; return the last-epoch model."""
    torch.manual_seed(seed)
    train = splits["train"]
    model = build_student(profile, train.n_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=profile.lr, momentum=0.9,
                          weight_decay=profile.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=profile.student_epochs)
    inv_freq = 1.0 / train.group_counts().clamp(min=1).double()
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(profile.student_epochs):
        model.train()
        for batch in fkdata.iterate_batches(train, profile.batch_size, shuffle=True,
                                            generator=gen, device=device):
            out = model(batch.x)
            ce = F.cross_entropy(out.logits, batch.y, reduction="none")
            if weighting == "group_balanced" and epoch >= profile.warmup_epochs:
                w = inv_freq[batch.y * train.n_attrs + batch.a].float().to(device)
                w = w / w.mean()  # mean 1 over the batch, as every method's weights
            else:
                w = torch.ones_like(ce)
            loss = (w * ce).mean() + F.cross_entropy(out.exit_logits, batch.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model


def train_student_library(splits, profile, *, weighting: str, seed: int, device="cpu"):
    """The same with the library's loop and objectives (``--loop library``): SGD with
    Nesterov momentum, per-step cosine, checkpoint chosen on val ``profile.select_on``;
    lam = 0 (cross-entropy only: no teacher here, as in the inline loop)."""
    from fairkd_utils.losses import default_config, make_objective
    from fairkd_utils.train import TrainConfig, train_model

    train = splits["train"]
    model = build_student(profile, train.n_classes, seed=seed)
    config = TrainConfig(epochs=profile.student_epochs, batch_size=profile.batch_size,
                         optimizer=profile.optimizer, lr=profile.lr,
                         weight_decay=profile.weight_decay, select_on=profile.select_on,
                         seed=seed, device=device, progress=False)
    objective = make_objective(default_config(weighting, warmup_epochs=profile.warmup_epochs,
                                              lam=0.0),
                               group_counts=train.group_counts(), n_train=len(train),
                               n_classes=train.n_classes)
    return train_model(model, splits, config, objective).model


@torch.no_grad()
def group_accuracy(model, ds, device="cpu") -> torch.Tensor:
    model.eval()
    correct = torch.zeros(ds.n_groups)
    for batch in fkdata.iterate_batches(ds, 1024, shuffle=False, device=device):
        pred = model(batch.x).logits.argmax(1).cpu()
        g = batch.y.cpu() * ds.n_attrs + batch.a.cpu()
        correct += torch.bincount(g, weights=(pred == batch.y.cpu()).double(),
                                  minlength=ds.n_groups).float()
    return correct / ds.group_counts().float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=None, help="default: the profile's data_scale")
    p.add_argument("--epochs", type=int, default=None, help="override the student budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--loop", choices=["inline", "library"], default="inline",
                   help="inline: this file's loop, last epoch; library: fairkd_utils.train, "
                        "checkpoint selected on val worst-group accuracy")
    p.add_argument("--reliability", type=float, default=None)
    p.add_argument("--spurious-strength", type=float, default=None)
    p.add_argument("--noise", type=float, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    if args.epochs is not None:
        profile = profile.replace(student_epochs=args.epochs)
    scale = profile.data_scale if args.scale is None else args.scale
    knobs = {k: v for k, v in {"reliability": args.reliability,
                                "spurious_strength": args.spurious_strength,
                                "noise": args.noise}.items() if v is not None}
    print(f"profile {profile.name}: student widths {profile.student_widths}, blocks "
          f"{profile.student_blocks}, {profile.student_epochs} epochs, batch "
          f"{profile.batch_size}, {profile.optimizer} lr {profile.lr}, warm-up "
          f"{profile.warmup_epochs}; scale {scale}; knobs {knobs or 'defaults'}; "
          + ("inline loop, evaluated at the last epoch" if args.loop == "inline" else
             f"library loop, checkpoint selected on val {profile.select_on}"))
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        splits = fkdata.load_splits("synthetic", image_size=profile.image_size,
                                    scale=scale, seed=seed, **knobs)
        t_data = time.time() - t0
        prop = splits["train"].group_counts().float()
        prop = prop / prop.sum()
        res = {"seed": seed, "t_data": t_data}
        for weighting in ("erm", "group_balanced"):
            t0 = time.time()
            fit = train_student if args.loop == "inline" else train_student_library
            model = fit(splits, profile, weighting=weighting, seed=seed, device=args.device)
            acc = group_accuracy(model, splits["test"], args.device)
            res[weighting] = {"acc": acc.tolist(), "wga": float(acc.min()),
                              "tw": float((acc * prop).sum()), "t": time.time() - t0}
            print(f"  seed {seed} {weighting}: {res[weighting]['t']:.0f}s, test group acc "
                  f"{[round(100 * v, 1) for v in acc.tolist()]}", flush=True)
        erm, gb = res["erm"], res["group_balanced"]
        gap, gain = 100 * (erm["tw"] - erm["wga"]), 100 * (gb["wga"] - erm["wga"])
        ok_a, ok_b = gap >= 20, gain >= 10
        rows.append((ok_a, ok_b))
        fmt = lambda accs: " ".join(f"{100 * v:5.1f}" for v in accs)  # noqa: E731
        print(f"seed {seed}: data {t_data:.1f}s | ERM ({erm['t']:.0f}s) group acc [{fmt(erm['acc'])}]"
              f" WGA {100 * erm['wga']:.1f}, train-weighted avg {100 * erm['tw']:.1f}, gap "
              f"{gap:.1f} -> (a) {'PASS' if ok_a else 'FAIL'} | GB ({gb['t']:.0f}s) group acc "
              f"[{fmt(gb['acc'])}] WGA {100 * gb['wga']:.1f}, gain {gain:+.1f} -> (b) "
              f"{'PASS' if ok_b else 'FAIL'}", flush=True)
    all_ok = all(a and b for a, b in rows)
    print("ALL PASS" if all_ok else "SOME FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
