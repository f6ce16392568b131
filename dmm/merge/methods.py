"""Static merge methods: small pure functions over one tensor key at a time.

Every method sees one key of the base model (theta_0) and of each teacher
(theta_t) and returns the merged tensor. With tau_t = theta_t - theta_0:

- ``weighted``:        theta = sum_t w_t theta_t
- ``task_arithmetic``: theta = theta_0 + lam * sum_t w_t tau_t
- ``ties``:            trim each tau_t to its top-k magnitudes, elect a sign per
                       entry from the summed trimmed deltas, take the disjoint
                       mean of the entries that agree, theta = theta_0 + lam tau_m
- ``dare_linear``:     drop each delta entry with probability p, rescale the kept
                       ones by 1/(1-p), then task arithmetic
- ``dare_ties``:       DARE, then TIES (trim, sign election, disjoint mean)

The four delta-based methods are one function, :func:`generalized_task_arithmetic`,
with an optional sparsifier (magnitude trim or random drop) and optional sign
consensus, so that a fix to one is a fix to all.

Conventions (the reasons are in the functions' docstrings):

- Weights are relative importances: non-negative, normalised to sum 1 for every
  method, uniform by default. ``lam`` alone sets the strength of the delta, so
  ``task_arithmetic`` with lam = N equals the plain sum of task vectors of
  Ilharco et al.
- TIES keeps the ``ceil(k * n)`` largest-magnitude entries of each tensor
  (k = 0.2 by default, the TIES paper's setting; several tools default to
  k = 1, i.e. no trimming at all). Entries tied with the threshold are kept.
- The trim is per tensor, as in the project's method notes, not global over the
  whole model as in the TIES reference code: a global threshold needs a second
  pass over every file and breaks streaming.
- An entry whose summed delta is exactly zero gets no elected sign and merges to
  zero delta; the TIES reference code would assign it the tensor's majority
  sign, which only differs for exact float cancellations.
- DARE draws its mask from a ``torch.Generator`` seeded from
  sha256("<seed>:<key>"), so the result of a key does not depend on the order in
  which keys are visited, and teachers draw in their given order from that one
  generator.

How the same merges are expressed with sd-mecha 1.1.8 (see dmm/merge/mecha.py,
which builds exactly these recipes; ``subtract``, ``add_difference``,
``weighted_sum``, ``dropout``, ``ties_sum`` and ``ties_sum_with_dropout`` are the
low-level merge methods from ``sd_mecha.extensions.merge_methods.resolve``, NOT
the same-named public wrappers), always merged with ``merge_dtype=float32`` and
``output_dtype=None``:

- ``weighted(w)``:
  ``r = t_1; r = weighted_sum(r, t_i, alpha=w_i / (w_1 + ... + w_i))`` for i >= 2
  (a running weighted mean; with uniform weights this is ``n_average(*t)``).
- ``task_arithmetic(w, lam)``:
  ``add_difference(base, D, alpha=lam)`` where D is the same running weighted
  mean taken over ``subtract(t_i, base)``.
- ``ties(k, lam)`` (uniform weights only; ``ties_sum`` takes none):
  ``add_difference(base, ties_sum(*[subtract(t, base) for t], k=k,
  vote_sgn=True), alpha=lam)``. Pitfalls: ``ties_sum``/``add_difference_ties``
  default to k=1.0 (no trim); ``vote_sgn=False`` (the default) elects the sign by
  counting signs instead of summing deltas; the public wrapper
  ``sd_mecha.add_difference`` crashes on a merge-node argument whose merge
  space is not yet inferred, and so does ``add_difference_ties``, hence the
  low-level ``add_difference``. sd-mecha's ``filter_top_k`` (like the TIES
  reference code) keeps ``n - int((1 - k) n) + 1`` entries, i.e. one more per
  tensor and teacher than ``ceil(k n)``; outputs therefore differ at those
  boundary entries and nowhere else (tests/test_merge.py checks exactly that).
  With k=1.0 both keep everything and agree to rounding.
- ``dare_linear(p, w, lam, seed)``: per teacher ``dropout(subtract(t_i, base),
  probability=p, rescale=1.0, overlap=1.0, overlap_emphasis=0.0, seed=s_i)``
  (one delta per call: with several deltas ``dropout`` divides by the number of
  surviving entries, which is not DARE), combined by the running weighted mean
  and ``add_difference(base, ., alpha=lam)``. The public ``sd_mecha.dropout``
  wrapper is not this: it defaults to alpha=0.5 and uses that surviving-count
  mean.
- ``dare_ties(p, k, lam, seed)``: ``add_difference(base,
  ties_sum_with_dropout(*deltas, probability=p, della_eps=0.0, rescale=True,
  k=k, vote_sgn=True, apply_stock=True, apply_median=False, seed=seed),
  alpha=lam)``, the same as the wrapper ``add_ties_with_dare`` with those
  arguments. Pitfalls: ``apply_stock=False`` (the default) multiplies the delta
  by a model-stock cosine factor (the flag's meaning is inverted) and
  ``add_ties_with_dare`` defaults to k=1.0.
- Randomness cannot match: sd-mecha seeds numpy / torch with the same seed for
  every key (same-shaped tensors get identical masks), dmm per key. DARE is
  compared statistically (drop fraction about p, kept entries scaled by 1/(1-p)).
- sd-mecha casts every input to ``merge_dtype``, so int64 ``position_ids``
  come out as float32 (or float16 with the default ``output_dtype``); dmm copies
  non-float tensors from the base, and dmm/merge/mecha.py restores them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_LAM = 1.0
DEFAULT_K = 0.2
DEFAULT_P = 0.9
DEFAULT_SEED = 0

# A sparsifier maps one teacher's delta to a sparser one. It is called once per
# teacher, in the teachers' order, which is what makes DARE's draws from one
# per-key generator reproducible.
Sparsifier = Callable[[Tensor], Tensor]


# --- helpers -------------------------------------------------------------


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Return ``n`` non-negative weights summing to 1 (uniform when None).

    Negative weights are refused: they would turn TIES's weighted disjoint mean
    into something that is not a mean; negate a task vector with lam < 0 instead.
    """
    if n < 1:
        raise ValueError("at least one teacher is needed")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} teachers")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return [x / total for x in w]


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one tensor key, stable across runs and platforms.

    Python's ``hash`` is salted per process, so sha256 is used instead.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def key_generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(key_seed(seed, key))


def keep_count(n: int, k: float) -> int:
    """How many of ``n`` entries a top-k trim keeps: ceil(k n), at least 1.

    k n is rounded to 6 decimals first so that 0.3 * 10 = 3.0000000000000004
    keeps 3 entries, not 4.
    """
    return min(n, max(1, math.ceil(round(k * n, 6))))


# --- sparsifiers ---------------------------------------------------------


def magnitude_trim(tau: Tensor, k: float) -> Tensor:
    """Zero all but the ``keep_count(numel, k)`` largest-magnitude entries.

    A threshold (not ``topk`` indices) decides, so that entries tied with the
    threshold are all kept and the result does not depend on the sort's
    tie-breaking. ``tau`` itself is left unchanged.
    """
    n = tau.numel()
    if n == 0 or keep_count(n, k) >= n:
        return tau
    return magnitude_trim_(tau.clone(), k)


def magnitude_trim_(tau: Tensor, k: float) -> Tensor:
    """:func:`magnitude_trim` in place: the merge owns its deltas, and a copy of
    each would add a full pass and a tensor's worth of memory per teacher."""
    n = tau.numel()
    m = keep_count(n, k) if n else 0
    if n == 0 or m >= n:
        return tau
    mag = tau.abs().reshape(-1)
    # The m-th largest magnitude is the (n - m + 1)-th smallest.
    threshold = kth_smallest(mag, n - m + 1)
    # "not >=" rather than "<": a NaN magnitude is dropped, as torch.where(>=) did.
    drop = torch.ge(mag, threshold).logical_not_().view(tau.shape)
    return tau.masked_fill_(drop, 0.0)


# Below this size torch.kthvalue is as fast as the bracketing below.
_SELECT_DIRECT = 1 << 16
_SELECT_SAMPLE = 1 << 13


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """``torch.kthvalue(values, k).values`` for a 1-D tensor, exactly, in a few passes.

    kthvalue runs a single-threaded quickselect over a copy of the whole tensor,
    which dominates TIES on SD-sized layers. A sorted strided sample brackets
    the k-th value; two vectorised comparisons count the entries below and
    inside the bracket, and kthvalue then runs on the (few percent) inside.
    When the bracket misses (a sample can be unlucky; NaNs are never inside),
    the full kthvalue runs, so the result never depends on the sample.
    """
    n = values.numel()
    if n < _SELECT_DIRECT:
        return torch.kthvalue(values, k).values
    step = max(1, n // _SELECT_SAMPLE)
    sample = values[::step].sort().values
    s = sample.numel()
    q = k / n
    # Six standard deviations of the sample rank of the k-th value, plus slack.
    margin = 6.0 * math.sqrt(s * q * (1.0 - q)) + 8.0
    lo_i, hi_i = math.floor(q * s - margin), math.ceil(q * s + margin)
    if lo_i >= 0 and hi_i < s:
        lo, hi = sample[lo_i], sample[hi_i]
        # count_nonzero, not bool .sum(): the latter widens to int64 first.
        below = int(torch.count_nonzero(torch.lt(values, lo)))
        inside = torch.ge(values, lo).logical_and_(torch.le(values, hi))
        n_inside = int(torch.count_nonzero(inside))
        if below < k <= below + n_inside:
            return torch.kthvalue(values[inside], k - below).values
    return torch.kthvalue(values, k).values


def random_drop(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """DARE: drop each entry with probability p, divide the kept ones by 1 - p.

    ``tau`` itself is left unchanged.
    """
    if p == 0.0:
        return tau
    return random_drop_(tau.clone(), p, generator)


def random_drop_(tau: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """:func:`random_drop` in place; the same draws, so the same result bit for bit."""
    if p == 0.0:
        return tau
    # rand < p is exactly "not (rand >= p)" (no NaNs), one pass fewer than a negation.
    drop = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < p
    return tau.div_(1.0 - p).masked_fill_(drop, 0.0)


# The sparsifiers the registered methods use work in place: the generalized
# method hands each one a fresh delta that nothing else references.


def magnitude_sparsifier(k: float) -> Sparsifier | None:
    return None if k >= 1.0 else (lambda tau: magnitude_trim_(tau, k))


def dare_sparsifier(p: float, generator: torch.Generator) -> Sparsifier:
    return lambda tau: random_drop_(tau, p, generator)


def chain(*sparsifiers: Sparsifier | None) -> Sparsifier | None:
    active = [s for s in sparsifiers if s is not None]
    if not active:
        return None

    def run(tau: Tensor) -> Tensor:
        for s in active:
            tau = s(tau)
        return tau

    return run


# --- the generalized method ----------------------------------------------


def sign_consensus_mean(deltas: Tensor, weights: Tensor) -> Tensor:
    """TIES's elect + disjoint merge over stacked deltas of shape (T, ...).

    The sign of each entry is the sign of the weighted sum of deltas (the TIES
    paper's "total mass" election, not a count of signs); the result is the
    weighted mean of the deltas that carry that sign, and zero where none does.
    """
    w = weights.view(-1, *([1] * (deltas.dim() - 1)))
    elected = torch.sign((w * deltas).sum(dim=0))
    agree = (torch.sign(deltas) == elected) & (deltas != 0)
    wa = w * agree
    denom = wa.sum(dim=0)
    num = (wa * deltas).sum(dim=0)
    return torch.where(denom > 0, num / denom.clamp_min(torch.finfo(deltas.dtype).tiny), 0.0)


def _uniform_sign_consensus_mean_(deltas: Tensor) -> Tensor:
    """:func:`sign_consensus_mean` for equal weights, consuming ``deltas``.

    With every weight 1 the election is the plain sum, and an entry agrees with
    its elected sign e exactly when d * e > 0. Folding the sign into the deltas
    (|d| where they agree, 0 elsewhere) gives the disjoint sum as e * sum and
    the count as the number of positive entries: the same values, bit for bit
    (rounding is sign-symmetric), with two (T, ...) temporaries fewer.
    """
    elected = deltas.sum(dim=0).sign_()
    agreeing = deltas.mul_(elected).clamp_(min=0.0)
    num = agreeing.sum(dim=0).mul_(elected)
    # sign_ turns |d| > 0 into 1 in place (and NaN into 0, as torch.sign does on
    # CPU): a float count without a (T, ...) bool tensor, whose sum is slow.
    count = agreeing.sign_().sum(dim=0)
    merged = torch.where(count > 0, num / count, 0.0)
    # A NaN delta makes its entry NaN, as in sign_consensus_mean (where
    # sign(NaN) = 0 matches the elected sign of a NaN sum).
    return torch.where(num.isnan(), num, merged)


def generalized_task_arithmetic(
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    lam: float = DEFAULT_LAM,
    sparsifier: Sparsifier | None = None,
    consensus: bool = False,
) -> Tensor:
    """theta_0 + lam * combine_t(sparsify(theta_t - theta_0)).

    ``combine`` is the weighted sum (weights normalised to 1) or, with
    ``consensus``, the TIES sign election and weighted disjoint mean. Inputs must
    already be float tensors of one shape; see :func:`merge_tensor` for the
    dtype and validation wrapper. ``sparsifier`` gets a fresh delta per teacher
    and may modify it in place.
    """
    w = normalize_weights(weights, len(teachers))
    if consensus:
        # Deltas go straight into their rows of the stack: no per-teacher copy.
        stacked = torch.empty((len(w), *base.shape), dtype=base.dtype, device=base.device)
        for i, t in enumerate(teachers):
            d = torch.sub(t, base, out=stacked[i])
            if sparsifier is not None:
                r = sparsifier(d)
                if r is not d:
                    d.copy_(r)
        # The mean is a ratio, so weights may be rescaled: max -> 1 turns uniform
        # weights into exact ones and the mean into the paper's sum / count.
        top = max(w)
        rel = [x / top for x in w]
        if all(x == 1.0 for x in rel):
            merged = _uniform_sign_consensus_mean_(stacked)
        else:
            merged = sign_consensus_mean(stacked, torch.tensor(rel, dtype=stacked.dtype))
    else:
        merged = torch.zeros_like(base)
        for wi, t in zip(w, teachers, strict=True):
            tau = t - base
            merged.add_(sparsifier(tau) if sparsifier is not None else tau, alpha=wi)
    # lam * merged + base: the same two roundings as base + lam * merged.
    return merged.mul_(lam).add_(base)


# --- the registered methods ----------------------------------------------


def weighted(
    base: Tensor, teachers: Sequence[Tensor], *, key: str, weights: Sequence[float] | None = None
) -> Tensor:
    """theta = sum_t w_t theta_t; the base's values are not used."""
    w = normalize_weights(weights, len(teachers))
    out = torch.zeros_like(base)  # base has the teachers' dtype and shape
    for wi, t in zip(w, teachers, strict=True):
        out.add_(t, alpha=wi)
    return out


def task_arithmetic(
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    key: str,
    weights: Sequence[float] | None = None,
    lam: float = DEFAULT_LAM,
) -> Tensor:
    """theta_0 + lam * sum_t w_t tau_t (weights normalised, so lam=N is a plain sum)."""
    return generalized_task_arithmetic(base, teachers, weights=weights, lam=lam)


def ties(
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    key: str,
    weights: Sequence[float] | None = None,
    lam: float = DEFAULT_LAM,
    k: float = DEFAULT_K,
) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim to top-k, elect sign, disjoint mean."""
    return generalized_task_arithmetic(
        base,
        teachers,
        weights=weights,
        lam=lam,
        sparsifier=magnitude_sparsifier(k),
        consensus=True,
    )


def dare_linear(
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    key: str,
    weights: Sequence[float] | None = None,
    lam: float = DEFAULT_LAM,
    p: float = DEFAULT_P,
    seed: int = DEFAULT_SEED,
) -> Tensor:
    """DARE (Yu et al. 2024) + task arithmetic: random drop, rescale 1/(1-p), sum."""
    return generalized_task_arithmetic(
        base,
        teachers,
        weights=weights,
        lam=lam,
        sparsifier=dare_sparsifier(p, key_generator(seed, key)),
    )


def dare_ties(
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    key: str,
    weights: Sequence[float] | None = None,
    lam: float = DEFAULT_LAM,
    p: float = DEFAULT_P,
    k: float = DEFAULT_K,
    seed: int = DEFAULT_SEED,
) -> Tensor:
    """DARE, then the full TIES-merging including its magnitude trim (k = 0.2).

    This follows the DARE paper, which uses DARE as a plug-in in front of an
    unchanged merging method: its code (MergeLM, ``mask_merging`` with
    ``mask_apply_method="ties_merging"``) drops and rescales first and then runs
    TIES with its trim rate (``param_value_mask_rate=0.8``, i.e. keep 20%).
    mergekit's ``dare_ties`` instead replaces the trim by the random drop
    (k = 1 here). Pass k=1.0 for that variant.
    """
    return generalized_task_arithmetic(
        base,
        teachers,
        weights=weights,
        lam=lam,
        sparsifier=chain(dare_sparsifier(p, key_generator(seed, key)), magnitude_sparsifier(k)),
        consensus=True,
    )


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function and the parameters it reads."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[str, ...]
    random: bool
    summary: str


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("weighted", weighted, ("weights",), False, "sum_t w_t theta_t"),
        MergeMethod(
            "task_arithmetic",
            task_arithmetic,
            ("weights", "lam"),
            False,
            "theta_0 + lam sum_t w_t tau_t",
        ),
        MergeMethod(
            "ties", ties, ("weights", "lam", "k"), False, "top-k trim, sign election, disjoint mean"
        ),
        MergeMethod(
            "dare_linear",
            dare_linear,
            ("weights", "lam", "p", "seed"),
            True,
            "random drop p, rescale 1/(1-p), task arithmetic",
        ),
        MergeMethod(
            "dare_ties",
            dare_ties,
            ("weights", "lam", "p", "k", "seed"),
            True,
            "random drop p, rescale, then TIES with top-k trim",
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when an input is float64 (never lose its precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def merge_tensor(
    method: str,
    key: str,
    base: Tensor,
    teachers: Sequence[Tensor],
    *,
    strength: float = 1.0,
    **params,
) -> Tensor:
    """Merge one key: validate, compute in float32, cast back to the base's dtype.

    Non-float tensors (e.g. int64 ``position_ids``) are returned from the base
    unchanged: averaging indices is meaningless. ``strength`` is the key's block
    weight (dmm/merge/blocks.py): theta_0 + strength (merge - theta_0), applied
    as ``lam * strength`` where the method has a lam, so that it is one rounding.
    """
    m = get_method(method)
    if not teachers:
        raise ValueError("at least one teacher is needed")
    for i, t in enumerate(teachers):
        if tuple(t.shape) != tuple(base.shape):
            raise ValueError(
                f"shape mismatch for key {key!r}: base {tuple(base.shape)}, "
                f"teacher {i} {tuple(t.shape)}"
            )
    if not base.is_floating_point():
        return base.clone()
    unknown = set(params) - set(m.params)
    if unknown:
        raise ValueError(f"method {method} does not take {sorted(unknown)}")
    if not math.isfinite(strength):
        raise ValueError(f"block weight for key {key!r} must be finite, got {strength}")
    ct = compute_dtype(base.dtype, *(t.dtype for t in teachers))
    b = base.to(ct)
    if strength != 1.0 and "lam" in m.params:
        params = {**params, "lam": params.get("lam", DEFAULT_LAM) * strength}
    out = m.fn(b, _Cast(teachers, ct), key=key, **params)
    if strength != 1.0 and "lam" not in m.params:
        out = torch.lerp(b, out, strength)
    return out.to(base.dtype)


class _Cast(Sequence[Tensor]):
    """Teachers converted to the compute dtype one at a time, when a method reads them.

    Converting all up front holds T float32 copies at once; each method reads
    each teacher once, so only one copy is alive at a time.
    """

    def __init__(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> None:
        self._tensors = list(tensors)
        self._dtype = dtype

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [t.to(self._dtype) for t in self._tensors[i]]
        return self._tensors[i].to(self._dtype)

    def __iter__(self):
        return (t.to(self._dtype) for t in self._tensors)
