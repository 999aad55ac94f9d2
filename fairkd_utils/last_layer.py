"""DFR (Kirichenko et al., ICLR 2023, "Last Layer Re-Training is Sufficient for
Robustness to Spurious Correlations") on a trained student: its last layer retrained
by logistic regression on the penultimate features of a group-balanced subsample of
the validation split.

The protocol (``dfr``), deterministic per seed:

1. the validation split is cut in two halves, stratified by group (``split_halves``);
2. from the first half, ``n_subsets`` group-balanced subsamples are drawn, each with
   as many instances per group as the smallest group of that half has
   (``balanced_subsample``);
3. for each regularisation strength ``C`` of the grid, a logistic regression
   (``fit_logistic``, L1 or L2) is fitted on each subsample's standardised features
   and the heads are averaged (as DFR averages its retrains);
4. the strength whose averaged head has the best worst-group accuracy on the *second*
   half (ties: average accuracy there, then the grid's order) is kept.

Test is never read; the training split is not used (DFR's "validation" variant, a
reference that uses validation group labels, like ``group_balanced`` uses training
ones). DFR's own code refits the chosen strength on the whole validation split; here
the second half stays a pure selection set.

Logistic regression is solved here in torch (no scikit-learn): the objective is
scikit-learn's, divided by ``C * n`` —

    L1: mean_i CE_i + ||W||_1 / (C n)          L2: mean_i CE_i + ||W||_2^2 / (2 C n)

with the intercept unpenalised and class 0 as the reference (logit 0), which for two
classes is exactly the binary logistic regression DFR fits. It is minimised by FISTA
(accelerated proximal gradient, soft-thresholding for L1, adaptive restart) in float64
with the fixed step ``1/L``, ``L = ||X~||_2^2 / (2n)`` (+ ``1/(C n)`` for L2): full
batch, no randomness; every (strength, subsample) problem of a seed is solved at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: DFR's grid of inverse regularisation strengths on Waterbirds (its repository's
#: ``C_OPTIONS``), from weakest to strongest.
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: Balanced subsamples (retrains) averaged per strength.
N_SUBSETS = 10
#: Offset of the seed of a student's DFR generator (halves, subsamples).
SEED_OFFSET = 104729


def split_halves(g: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of two halves of a split, stratified by group: each group's instances
    are permuted with ``generator`` and the first ``n_g // 2`` go to the first half (the
    fitting half), the rest to the second (the selection half). Both sorted."""
    g = torch.as_tensor(g).long().cpu()
    members = [torch.nonzero(g == k).flatten() for k in torch.unique(g).tolist()]
    perms = [m[torch.randperm(len(m), generator=generator)] for m in members]
    return (torch.cat([p[: len(p) // 2] for p in perms]).sort().values,
            torch.cat([p[len(p) // 2:] for p in perms]).sort().values)


def balanced_subsample(g: Tensor, idx: Tensor, generator: torch.Generator) -> Tensor:
    """A group-balanced subsample of ``idx`` (positions into ``g``): from every group
    present, as many instances (drawn without replacement with ``generator``) as the
    smallest group of ``idx`` has. Sorted."""
    g = torch.as_tensor(g).long().cpu()
    idx = torch.as_tensor(idx).long().cpu()
    members = [idx[g[idx] == k] for k in torch.unique(g[idx]).tolist()]
    per_group = min(len(m) for m in members)
    if per_group == 0:
        raise ValueError("a group has no instance in the fitting half")
    picks = [m[torch.randperm(len(m), generator=generator)[:per_group]] for m in members]
    return torch.cat(picks).sort().values


@dataclass(frozen=True)
class LinearHead:
    """``logits = x @ weight.T + bias`` on raw (unstandardised) features."""
    weight: Tensor   # (C, D)
    bias: Tensor     # (C,)

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, penalty: str = "l1", C=1.0,
                 max_iter: int = 3000, tol: float = 1e-6) -> LinearHead:
    """Multinomial logistic regression with class 0 as reference, minimising
    ``mean CE + ||W||_1 / (C n)`` (``penalty="l1"``) or ``mean CE + ||W||^2 / (2 C n)``
    (``"l2"``), intercept unpenalised, by FISTA with a fixed step and adaptive restart
    (module docstring), until no coefficient moves by more than ``tol`` (relative to
    the largest) in an iteration. Deterministic. Returns the head in the features' own
    coordinates.

    Batched: ``x`` (B, n, D) and ``y`` (B, n) fit B problems at once (``C`` a number or
    B of them) and return a head with a leading batch dimension."""
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y).long()
    single = x.ndim == 2
    if single:
        x, y = x[None], y[None]
    B, n, d = x.shape
    C = torch.as_tensor(C, dtype=x.dtype).expand(B).clone()
    if not (torch.isfinite(C).all() and (C > 0).all()):
        raise ValueError(f"C must be positive numbers, got {C.tolist()}")
    k = n_classes - 1
    xt = torch.cat([x, torch.ones(B, n, 1, dtype=x.dtype)], 2)                 # [x, 1]
    lam = (1.0 / (C * n))[:, None, None]
    lip = torch.linalg.matrix_norm(xt, ord=2) ** 2 / (2 * n)
    if penalty == "l2":
        lip = lip + lam[:, 0, 0]
    step = (1.0 / lip)[:, None, None]
    onehot = torch.nn.functional.one_hot(y, n_classes).to(x.dtype)[..., 1:]
    penalised = (torch.arange(d + 1) < d).to(x.dtype)[:, None]               # not the intercept

    xt_T = xt.transpose(1, 2).contiguous() / n

    def grad(theta):  # theta: (B, D+1, K), logits [0, xt @ theta]
        z = xt @ theta
        if k == 1:    # two classes: the softmax of [0, z] is the sigmoid of z
            p = torch.sigmoid(z)
        else:
            p = torch.softmax(torch.cat([torch.zeros(B, n, 1, dtype=x.dtype), z], 2), 2)[..., 1:]
        gr = xt_T @ (p - onehot)
        return gr + lam * theta * penalised if penalty == "l2" else gr

    def prox(theta):
        if penalty == "l2":
            return theta
        shrunk = theta.sign() * (theta.abs() - step * lam).clamp_min(0)
        return torch.where(penalised.bool(), shrunk, theta)

    theta = torch.zeros(B, d + 1, k, dtype=x.dtype)
    v, t = theta.clone(), torch.ones(B, 1, 1, dtype=x.dtype)
    for _ in range(max_iter):
        new = prox(v - step * grad(v))
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        restart = ((v - new) * (new - theta)).sum((1, 2), keepdim=True) > 0   # O'Donoghue & Candes
        v = torch.where(restart, new, new + ((t - 1) / t_next) * (new - theta))
        t_next = torch.where(restart, torch.ones_like(t_next), t_next)
        change = (new - theta).abs().amax((1, 2)) / new.abs().amax((1, 2)).clamp_min(1.0)
        theta, t = new, t_next
        if float(change.max()) <= tol:
            break
    weight = torch.cat([torch.zeros(B, 1, d, dtype=x.dtype), theta[:, :d].transpose(1, 2)], 1)
    bias = torch.cat([torch.zeros(B, 1, dtype=x.dtype), theta[:, d]], 1)
    return LinearHead(weight[0], bias[0]) if single else LinearHead(weight, bias)


def standardised_fit(x: Tensor, y: Tensor, n_classes: int, penalty: str, C=1.0) -> LinearHead:
    """:func:`fit_logistic` on features standardised with their own mean and standard
    deviation (as DFR does), folded back into the raw features' coordinates. Batched
    like :func:`fit_logistic` (each problem standardised with its own statistics)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    mu, sd = x.mean(-2, keepdim=True), x.std(-2, unbiased=False, keepdim=True).clamp_min(1e-8)
    head = fit_logistic((x - mu) / sd, y, n_classes, penalty, C)
    weight = head.weight / sd                              # (..., C, D) / (..., 1, D)
    bias = head.bias - (weight @ mu.transpose(-1, -2)).squeeze(-1)
    return LinearHead(weight, bias)


def group_accuracies(pred: Tensor, y: Tensor, g: Tensor) -> dict:
    """Worst-group and average accuracy of predicted labels."""
    right = (pred == y).double()
    accs = [float(right[g == k].mean()) for k in torch.unique(g).tolist()]
    return {"worst_group_acc": min(accs), "avg_acc": float(right.mean())}


@dataclass(frozen=True)
class DFRResult:
    head: LinearHead          # the chosen strength's averaged head (raw features)
    C: float                  # the chosen inverse strength
    table: list               # one dict per strength: C, second-half accuracies, chosen
    fit_idx: Tensor           # the first (fitting) half, positions into the split
    select_idx: Tensor        # the second (selection) half
    subsets: list             # the balanced subsamples of the first half


def dfr(features: Tensor, y: Tensor, g: Tensor, n_classes: int, *, seed: int,
        penalty: str = "l1", grid=C_GRID, n_subsets: int = N_SUBSETS) -> DFRResult:
    """DFR on the validation split's penultimate ``features`` (N, D) with labels ``y``
    and groups ``g`` (module docstring): fit on balanced subsamples of one half, choose
    the strength on the other half's worst-group accuracy. Deterministic per ``seed``."""
    features = torch.as_tensor(features, dtype=torch.float64)
    y, g = torch.as_tensor(y).long(), torch.as_tensor(g).long()
    gen = torch.Generator().manual_seed(int(seed) + SEED_OFFSET)
    fit_idx, select_idx = split_halves(g, gen)
    subsets = [balanced_subsample(g, fit_idx, gen) for _ in range(n_subsets)]
    rows, heads = [], []
    # every (strength, subsample) problem at once: the subsamples have equal sizes
    xs = torch.stack([features[s] for s in subsets]).repeat(len(grid), 1, 1)
    ys = torch.stack([y[s] for s in subsets]).repeat(len(grid), 1)
    Cs = torch.tensor(grid, dtype=torch.float64).repeat_interleave(len(subsets))
    fitted = standardised_fit(xs, ys, n_classes, penalty, Cs)
    for i, C in enumerate(grid):
        part = slice(i * len(subsets), (i + 1) * len(subsets))
        head = LinearHead(fitted.weight[part].mean(0), fitted.bias[part].mean(0))
        pred = head.logits(features[select_idx]).argmax(1)
        acc = group_accuracies(pred, y[select_idx], g[select_idx])
        rows.append({"C": float(C), "val_half2_worst_group_acc": acc["worst_group_acc"],
                     "val_half2_avg_acc": acc["avg_acc"]})
        heads.append(head)
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_half2_worst_group_acc"],
                                                rows[i]["val_half2_avg_acc"], -i))
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    return DFRResult(heads[best], float(grid[best]), rows, fit_idx, select_idx, subsets)


@torch.no_grad()
def penultimate_features(model, ds, device="cpu") -> Tensor:
    """The student's penultimate features (the input of its final linear layer
    ``model.backbone.fc``) on every item of ``ds``, in dataset order, eval mode."""
    from . import train

    captured = []
    hook = model.backbone.fc.register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].detach().float().cpu()))
    try:
        train.predict(model, ds, device=device)
    finally:
        hook.remove()
    return torch.cat(captured)


def with_head(model, head: LinearHead):
    """A copy of ``model`` whose final linear layer is ``head`` (everything else, the
    early exit included, untouched)."""
    import copy

    new = copy.deepcopy(model)
    fc = new.backbone.fc
    with torch.no_grad():
        fc.weight.copy_(head.weight.to(fc.weight))
        fc.bias.copy_(head.bias.to(fc.bias))
    return new
