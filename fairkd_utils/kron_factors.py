"""Kronecker factors of the early exit's GGN, accumulated batch by batch (README, "The maths").

The exit head is ``Linear(D+1, C, bias=False)`` on ``phi_tilde = [phi, 1]``.  Its
GGN is approximated by ``kron(B, A)`` with laplace-torch's normalisation:

* ``B = sum_n diag(p_n) - p_n p_n^T``  (C x C, *summed* over instances),
* ``A = (1/N) sum_n phi~_n phi~_n^T``  ((D+1) x (D+1), *averaged*),

where ``p_n`` are the exit's own softmax probabilities (a GGN, not an empirical
Fisher: the labels enter only the log-likelihood of the marginal likelihood).
The weight is flattened row-major, ``vec(W)[c*(D+1) + j] = W[c, j]``, which is the
order of ``kron(B, A)`` and of laplace-torch's ``parameters_to_vector``.

:class:`KronFactors` accumulates ``B``, ``A`` and, with labels, ``sum_n log p_n[y_n]``
from batches (``update``) or raw features (``from_features``), and round-trips
through plain values (``state`` / ``from_state``) for a warm-up checkpoint.
``exit_laplace.ExitLaplace`` turns them into the posterior. Accumulation is in float64.
"""

from __future__ import annotations

import torch

from .models import phi_tilde

__all__ = ["KronFactors"]

_MATH = torch.float64


class KronFactors:
    """Kronecker factors of the exit head's GGN, accumulated batch by batch.

    ``update(phi_tilde, probs)`` adds a batch (B summed, A averaged over all
    instances seen, as laplace-torch).  With ``n_train`` given, :attr:`B` (and
    :attr:`log_lik`) are rescaled by ``n_train / n`` so factors accumulated over
    part of an epoch (every-k-steps refits) stand for the whole training set;
    :attr:`n_data` is then ``n_train``.  Accumulation is in float64.
    """

    def __init__(self, *, n_train: int | None = None, device: str | torch.device | None = None):
        if n_train is not None and int(n_train) <= 0:
            raise ValueError(f"n_train must be a positive count of training instances, got {n_train}.")
        self.n_train = None if n_train is None else int(n_train)
        self.device = None if device is None else torch.device(device)
        self.n = 0
        # float64 sums over the instances seen (None before the first batch)
        self._B_sum = self._A_sum = self._log_lik = None
        self._labelled = None  # unknown until the first update

    # ---------------------------------------------------------------- accumulate
    def update(self, phi_tilde: torch.Tensor, probs: torch.Tensor,
               y: torch.Tensor | None = None) -> "KronFactors":
        """Add a batch: ``phi_tilde`` (n, D+1) = ``[phi, 1]``, ``probs`` (n, C) the
        exit's softmax at the MAP; optional labels ``y`` (n,) accumulate the
        log-likelihood ``sum_n log p_n[y_n]`` used by the marginal likelihood."""
        phi_tilde = torch.as_tensor(phi_tilde).detach()
        probs = torch.as_tensor(probs).detach()
        if phi_tilde.ndim != 2 or probs.ndim != 2:
            raise ValueError(
                f"update expects phi_tilde (n, D+1) and probs (n, C) as 2-d tensors, got shapes "
                f"{tuple(phi_tilde.shape)} and {tuple(probs.shape)}.")
        if phi_tilde.shape[0] != probs.shape[0]:
            raise ValueError(
                f"phi_tilde has {phi_tilde.shape[0]} rows but probs has {probs.shape[0]}: pass "
                f"the features and exit probabilities of the same instances.")
        if phi_tilde.shape[0] == 0:
            return self  # an empty batch adds nothing; emptiness is checked when used
        if self._A_sum is not None:
            d1, c = self._A_sum.shape[0], self._B_sum.shape[0]
            if phi_tilde.shape[1] != d1 or probs.shape[1] != c:
                raise ValueError(
                    f"batch does not match the factors accumulated so far: expected phi_tilde "
                    f"width {d1} and {c} classes, got {phi_tilde.shape[1]} and {probs.shape[1]}.")
        if not bool(torch.all(phi_tilde[:, -1] == 1)):
            raise ValueError(
                "update expects phi_tilde = [phi, 1] (last column all ones); pass "
                "fairkd_utils.models.phi_tilde(phi), or use KronFactors.from_features(phi, probs).")
        if not (torch.isfinite(phi_tilde).all() and torch.isfinite(probs).all()):
            raise ValueError("phi_tilde or probs contain NaN/inf: the exit diverged or the "
                             "features are corrupt; fix the model before fitting the Laplace.")
        labelled = y is not None
        if self._labelled is not None and labelled != self._labelled:
            raise ValueError("pass labels y either with every batch or with none (they "
                             "accumulate the log-likelihood of the marginal likelihood).")
        self._labelled = labelled
        dev = self.device or phi_tilde.device
        pt = phi_tilde.to(dev, _MATH)
        p = probs.to(dev, _MATH)
        B = torch.diag(p.sum(0)) - p.T @ p
        A = pt.T @ pt
        if self._A_sum is None:
            self._B_sum, self._A_sum = B, A
            self._log_lik = torch.zeros((), dtype=_MATH, device=dev)
        else:
            self._B_sum += B
            self._A_sum += A
        if labelled:
            y = torch.as_tensor(y).to(dev).long().reshape(-1)
            if y.shape[0] != p.shape[0]:
                raise ValueError(f"y has {y.shape[0]} labels for {p.shape[0]} instances.")
            self._log_lik += torch.log(p.gather(1, y[:, None]).clamp_min(1e-300)).sum()
        self.n += int(pt.shape[0])
        return self

    # ---------------------------------------------------------------- persistence
    def state(self) -> dict:
        """Plain values and tensors (``torch.load(weights_only=True)`` reads them back)."""
        return {"n": self.n, "n_train": self.n_train, "labelled": self._labelled,
                "B_sum": self._B_sum, "A_sum": self._A_sum, "log_lik": self._log_lik}

    @classmethod
    def from_state(cls, state: dict) -> "KronFactors":
        """The inverse of :meth:`state`."""
        f = cls(n_train=state["n_train"])
        f.n, f._labelled = int(state["n"]), state["labelled"]
        f._B_sum, f._A_sum, f._log_lik = state["B_sum"], state["A_sum"], state["log_lik"]
        return f

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_features(cls, phi: torch.Tensor, probs: torch.Tensor, y: torch.Tensor | None = None,
                      *, n_train: int | None = None, batch_size: int = 8192) -> "KronFactors":
        """One pass over raw exit features ``phi`` (N, D) (the 1 is appended here)."""
        f = cls(n_train=n_train)
        phi = torch.as_tensor(phi)
        if phi.ndim != 2:
            raise ValueError(f"phi must be (N, D), got shape {tuple(phi.shape)}.")
        if phi.shape[0] == 0:
            raise ValueError("no instances: phi is empty, so there is nothing to fit the "
                             "exit Laplace on; pass the training features.")
        if probs.shape[0] != phi.shape[0]:
            raise ValueError(f"phi has {phi.shape[0]} rows but probs has {probs.shape[0]}.")
        for i in range(0, phi.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            f.update(phi_tilde(phi[sl]), probs[sl], None if y is None else y[sl])
        return f

    # ---------------------------------------------------------------- views
    def _check_nonempty(self) -> None:
        if self.n == 0:
            raise ValueError("KronFactors is empty (zero instances): call update(...) with at "
                             "least one batch, or KronFactors.from_features.")

    @property
    def n_data(self) -> int:
        """N the factors stand for: ``n_train`` when rescaling, else instances seen."""
        return self.n_train if self.n_train is not None else self.n

    @property
    def _scale(self) -> float:
        return 1.0 if self.n_train is None else self.n_train / self.n

    @property
    def B(self) -> torch.Tensor:
        """Summed output factor (C, C), rescaled by n_train / n when n_train is set."""
        self._check_nonempty()
        return self._B_sum * self._scale

    @property
    def A(self) -> torch.Tensor:
        """Averaged input factor ((D+1), (D+1))."""
        self._check_nonempty()
        return self._A_sum / self.n

    @property
    def log_lik(self) -> torch.Tensor | None:
        """``sum_n log p_n[y_n]`` (rescaled like B), or None when no labels were given."""
        self._check_nonempty()
        return self._log_lik * self._scale if self._labelled else None

    @property
    def n_classes(self) -> int:
        self._check_nonempty()
        return self._B_sum.shape[0]

    @property
    def n_features(self) -> int:
        """D (without the appended 1)."""
        self._check_nonempty()
        return self._A_sum.shape[0] - 1

    def __repr__(self) -> str:
        if self.n == 0:
            return "KronFactors(empty)"
        return (f"KronFactors(n={self.n}, n_data={self.n_data}, C={self.n_classes}, "
                f"D={self.n_features}, labelled={self._labelled})")

