"""Benchmark: exit Laplace fit + predictive, ours vs laplace-torch 0.3 (exact prior).

Same head, same features, same prior precision: fit the Kronecker factors, then
predict 10,000 instances with 100 MC samples of the logits
(``la(x, pred_type="glm", link_approx="mc", n_samples=100)`` for laplace-torch,
``ExitLaplace.predict(x, link="mc", n_samples=100)`` for ours).  Each
implementation runs in its own subprocess so peak memory is its own; peak is
the rise of the process's peak RSS (VmHWM, reset between stages via
/proc/self/clear_refs) above the RSS before the stage.  Prints times, ratios,
peak memory and how far the two answers are apart (MC noise only).

    .venv/bin/python bench/bench_exit_laplace.py [--repeats 3] [--lt-chunk 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

CASES = [dict(C=2, D=64), dict(C=10, D=128)]
N_TRAIN, N_TEST, N_SAMPLES, TAU = 5000, 10_000, 100, 1.0


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _stage(fn):
    """Run fn, return (result, seconds, peak bytes above the RSS at the start)."""
    import gc
    gc.collect()
    _reset_peak()
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return out, dt, max(0, _status("VmHWM") - rss0)


def _problem(C: int, D: int):
    import torch
    from torch import nn
    from fairkd_utils.exit_laplace import phi_tilde

    class AppendOne(nn.Module):
        def forward(self, x):
            return phi_tilde(x)

    g = torch.Generator().manual_seed(0)
    phi = torch.randn(N_TRAIN + N_TEST, D, generator=g, dtype=torch.float64)
    model = nn.Sequential(AppendOne(), nn.Linear(D + 1, C, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(C, D + 1, generator=g, dtype=torch.float64) / math.sqrt(D))
        probs = torch.softmax(model(phi[:N_TRAIN]), -1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return phi[:N_TRAIN], y, phi[N_TRAIN:], model, probs


def worker(impl: str, C: int, D: int, repeats: int, lt_chunk: int, threads: int,
           out_path: str) -> None:
    import torch
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    phi, y, x, model, probs = _problem(C, D)
    res = dict(impl=impl, C=C, D=D)
    if impl == "ours":
        from fairkd_utils.exit_laplace import ExitLaplace
        from fairkd_utils.kron_factors import KronFactors

        def fit():
            with torch.no_grad():
                p = torch.softmax(model(phi), -1)      # the forward pass a fit needs anyway
            return ExitLaplace(model[1].weight, KronFactors.from_features(phi, p, y), tau=TAU)

        def predict(la):
            return la.predict(x, link="mc", n_samples=N_SAMPLES,
                              generator=torch.Generator().manual_seed(1)).probs

        def marglik(la):
            tau = la.optimize_tau_marglik()
            la.set_tau(TAU)
            return tau
    else:
        from torch.utils.data import DataLoader, TensorDataset
        from laplace import Laplace

        def fit():
            la = Laplace(model, "classification", subset_of_weights="last_layer",
                         hessian_structure="kron", last_layer_name="1", prior_precision=TAU)
            la.fit(DataLoader(TensorDataset(phi, y), batch_size=256))
            return la

        def predict(la):
            gen = torch.Generator().manual_seed(1)
            return torch.cat([la(x[i:i + lt_chunk], pred_type="glm", link_approx="mc",
                                 n_samples=N_SAMPLES, generator=gen)
                              for i in range(0, len(x), lt_chunk)])

        def marglik(la):
            la.optimize_prior_precision(method="marglik")   # its default: Adam, 100 steps
            tau = float(la.prior_precision)
            la.prior_precision = TAU
            return tau

    fits, preds = [], []
    for _ in range(repeats):
        la, t_fit, m_fit = _stage(fit)
        fits.append((t_fit, m_fit))
    for _ in range(repeats):
        probs_out, t_pred, m_pred = _stage(lambda: predict(la))
        preds.append((t_pred, m_pred))
    tau_opt, t_tau, _ = _stage(lambda: marglik(la))
    res.update(fit_s=min(t for t, _ in fits), fit_peak=max(m for _, m in fits),
               predict_s=min(t for t, _ in preds), predict_peak=max(m for _, m in preds),
               tau_s=t_tau, tau=tau_opt, peak_reset=_reset_peak())
    # the predictive distribution itself (deterministic): logit mean and covariance
    if impl == "ours":
        mu, cov = la.logit_mean_cov(x[:1000])
    else:
        mu, cov = la._glm_predictive_distribution(x[:1000])
    torch.save(dict(res=res, probs=probs_out, mu=mu, cov=cov), out_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lt-chunk", type=int, default=1000,
                    help="instances per laplace-torch call (its Jacobians are n x C x C(D+1))")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (2 by default; on a loaded machine 1 times more stably)")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "C", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, C, D = args.worker
        worker(impl, int(C), int(D), args.repeats, args.lt_chunk, args.threads, args.out)
        return

    import tempfile
    import torch
    mb = lambda b: b / 2 ** 20  # noqa: E731
    print(f"exit Laplace, exact prior tau={TAU}: fit on N={N_TRAIN}, predict {N_TEST} instances x "
          f"{N_SAMPLES} MC samples; torch threads={args.threads}, float64, best of {args.repeats}; "
          f"laplace-torch called in chunks of {args.lt_chunk}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            got = {}
            for impl in ("ours", "laplace_torch"):
                out = f"{tmp}/{impl}_{case['C']}.pt"
                subprocess.run([sys.executable, __file__, "--worker", impl, str(case["C"]),
                                str(case["D"]), "--repeats", str(args.repeats),
                                "--lt-chunk", str(args.lt_chunk), "--threads", str(args.threads),
                                "--out", out],
                               check=True, cwd=Path(__file__).resolve().parents[1])
                got[impl] = torch.load(out, weights_only=False)
            o, l = got["ours"]["res"], got["laplace_torch"]["res"]
            dp = (got["ours"]["probs"] - got["laplace_torch"]["probs"]).abs()
            dcov = float((got["ours"]["cov"] - got["laplace_torch"]["cov"]).abs().max())
            dmu = float((got["ours"]["mu"] - got["laplace_torch"]["mu"]).abs().max())
            rows.append((case, o, l, dp, dmu, dcov))
    for case, o, l, dp, dmu, dcov in rows:
        print(f"\nC={case['C']}, D={case['D']}")
        print(f"  {'stage':<22}{'ours':>12}{'laplace-torch':>16}{'speed-up':>11}")
        print(f"  {'fit [s]':<22}{o['fit_s']:>12.4f}{l['fit_s']:>16.4f}{l['fit_s'] / o['fit_s']:>10.1f}x")
        print(f"  {'predict 10k x 100 [s]':<22}{o['predict_s']:>12.4f}{l['predict_s']:>16.4f}"
              f"{l['predict_s'] / o['predict_s']:>10.1f}x")
        tot_o, tot_l = o['fit_s'] + o['predict_s'], l['fit_s'] + l['predict_s']
        print(f"  {'fit + predict [s]':<22}{tot_o:>12.4f}{tot_l:>16.4f}{tot_l / tot_o:>10.1f}x")
        print(f"  {'marglik tau [s]':<22}{o['tau_s']:>12.4f}{l['tau_s']:>16.4f}{l['tau_s'] / o['tau_s']:>10.1f}x"
              f"   (tau {o['tau']:.4g} vs {l['tau']:.4g}; laplace-torch: Adam, 100 steps)")
        print(f"  {'fit peak [MiB]':<22}{mb(o['fit_peak']):>12.1f}{mb(l['fit_peak']):>16.1f}")
        print(f"  {'predict peak [MiB]':<22}{mb(o['predict_peak']):>12.1f}{mb(l['predict_peak']):>16.1f}")
        bound = 4 * math.sqrt(2) * 0.5 / math.sqrt(N_SAMPLES)
        print(f"  same answer: |p_ours - p_lt| max {dp.max():.4f}, mean {dp.mean():.5f} "
              f"(MC noise, 100 samples each; 4-s.e. bound {bound:.3f})")
        print(f"  same distribution: max |mean diff| {dmu:.1e}, max |cov diff| {dcov:.1e} "
              f"(first 1000 test instances, float64)")
        if not o["peak_reset"]:
            print("  note: /proc/self/clear_refs not writable; peaks are cumulative")


if __name__ == "__main__":
    main()
