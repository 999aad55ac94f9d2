"""Laplace-KD vs DeDiER: cost of one training epoch, interleaved.

Both methods train the same `default` student on the full-size synthetic data with
the same (random but fixed) teacher logits; epochs alternate between the two
(ABBA order) so machine load affects both alike. Printed: each method's median
training time per epoch (the loop's ``train_seconds``: forward, weights, backward,
step and, for Laplace-KD, the factor updates and the end-of-epoch refit; the
validation pass is the same for both and excluded) and the ratio.
Target: Laplace-KD / DeDiER <= 1.05.

    .venv/bin/python bench/bench_epoch_cost.py --epochs 6
"""

import argparse
import statistics

import torch

from fairkd_utils import data, losses, models, train
from fairkd_utils.profiles import get_profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="epochs per method (default 6)")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prof = get_profile(args.profile)
    splits = data.load_splits("synthetic", image_size=prof.image_size, scale=prof.data_scale)
    ds = splits["train"]
    teacher = torch.randn(len(ds), ds.n_classes, generator=torch.Generator().manual_seed(0))
    state = {}
    for method in ("dedier", "laplace_kd"):
        model = models.build_student(prof, ds.n_classes, seed=0)
        cfg = losses.default_config(method, warmup_epochs=0)
        obj = losses.make_objective(cfg, teacher_logits=teacher, group_counts=ds.group_counts(),
                                    n_train=len(ds), n_classes=ds.n_classes, model=model)
        state[method] = (model, obj, [])
    tcfg = train.TrainConfig.from_profile(prof, "student", epochs=1, progress=False,
                                          channels_last=False)
    order = ["dedier", "laplace_kd"]
    # one unmeasured epoch each: warms up the allocator and gives Laplace-KD its first fit
    for method in order:
        model, obj, _ = state[method]
        train.train_model(model, splits, tcfg, obj)
    for e in range(args.epochs):
        for method in (order if e % 2 == 0 else order[::-1]):
            model, obj, times = state[method]
            res = train.train_model(model, splits, tcfg, obj)
            times.append(float(res.history["train_seconds"].iloc[0]))
    med = {m: statistics.median(state[m][2]) for m in order}
    for m in order:
        print(f"{m:11s} median {med[m]:.3f} s/epoch  (epochs: {', '.join(f'{t:.2f}' for t in state[m][2])})")
    ratio = med["laplace_kd"] / med["dedier"]
    print(f"Laplace-KD / DeDiER epoch cost: {ratio:.3f}  (target <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'})")


if __name__ == "__main__":
    main()
