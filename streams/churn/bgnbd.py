"""The BG/NBD churn model (Fader, Hardie & Lee 2005, "Counting your customers the easy way").

The story: while a customer is alive, they buy as a Poisson process of rate lambda, and lambda
varies across customers as Gamma(r, alpha). Right after each repeat purchase they may drop out for
good, with probability p, and p varies as Beta(a, b). Death is never observed. From three figures
per customer, all measured from their first purchase in one unit of time,

    x    repeat purchases (purchases after the first),
    t_x  time of the last purchase (0 when x == 0),
    T    the customer's age: time from the first purchase to now,

the model gives the probability that the customer is still alive and the purchases to expect from
them; the four parameters are fitted by maximum likelihood over the whole customer base.

Why the likelihood is written here: `lifetimes`, the Python library everyone used for this, is
archived and unmaintained, and the maintained alternative (PyMC-Marketing) brings a probabilistic
programming stack for what is a closed-form likelihood of four parameters. The formulas are the
paper's (eq. 6, 7 and 10) and Hardie's note "Implementing the BG/NBD model in Excel"; the fit is
checked against the paper's CDNOW estimates in tests/unit/test_bgnbd.py.

Pure functions of numbers: no Kafka, no ClickHouse, no clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import integrate, optimize, special


@dataclass(frozen=True, slots=True)
class Params:
    r: float       # shape of the purchase-rate gamma
    alpha: float   # its rate (in the unit of time of the data: 1/alpha is a time)
    a: float       # dropout beta, first shape
    b: float       # dropout beta, second shape


@dataclass(frozen=True)
class Fit:
    params: Params
    log_likelihood: float  # the sum over all customers, at `params`
    customers: int
    converged: bool


# The optimizer works on log-parameters, kept within exp(+-20): beyond that a parameter has run off
# to a degenerate corner (for example b -> infinity when nobody seems to drop out), and the fit
# reports that as not converged rather than publishing it.
_LOG_BOUND = 20.0
# Largest gradient of the mean log-likelihood (per customer, per log-parameter) that counts as a
# maximum. The mean, not the sum, so the same tolerance holds for 300 and for 3 million customers.
# Not tighter: when customers differ little in how likely they drop out, the maximum is a ridge
# towards a, b -> infinity at a fixed a / (a + b) (the limit where every customer has the same
# dropout probability). The optimizer stops out on it with a gradient of about 1e-6 (it gets that far
# because the dropout terms are exact sums, see _DropoutTerms); the parameters there are a sound model
# (p_alive and the expectation only use a / (b + x - 1) and a + b). Short histories, in which few
# customers have been seen to leave, land there.
_GRADIENT_TOLERANCE = 1e-5
# a and b both above e^13 (about 440,000): the ridge, where only a / (a + b) still matters.
_RIDGE_LOG = 13.0


@dataclass(frozen=True)
class _Customers:
    """The data grouped into distinct (x, t_x, T) rows with their counts, and the distinct x values:
    the special functions depend on x alone, so they are evaluated once per distinct x."""
    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    weight: np.ndarray
    x_values: np.ndarray
    x_index: np.ndarray

    @property
    def count(self) -> int:
        return int(self.weight.sum())


def log_likelihood(params: Params, x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> float:
    """The log-likelihood of the data under `params`, summed over customers (eq. 6 of the paper)."""
    customers = _group(x, t_x, T)
    mean, _ = _mean_log_likelihood_and_gradient(params, customers)
    return mean * customers.count


def fit(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> Fit:
    """Maximum-likelihood parameters for the customers (x, t_x, T). Deterministic: the same data,
    in any order, gives the same result, from the same starting point."""
    customers = _group(x, t_x, T)
    if customers.count == 0:
        raise ValueError("no customers to fit")

    def objective(log_params: np.ndarray) -> tuple[float, np.ndarray]:
        params = Params(*np.exp(log_params))
        mean, gradient = _mean_log_likelihood_and_gradient(params, customers)
        if not np.isfinite(mean):
            # A corner where a term overflows: tell the line search it is a bad step.
            return math.inf, np.zeros(4)
        # Gradient by log-parameter: d/d log(theta) = theta * d/d theta.
        return -mean, -gradient * np.exp(log_params)

    result = optimize.minimize(objective, np.log(_starting_point(customers)), jac=True, method="L-BFGS-B",
                               bounds=[(-_LOG_BOUND, _LOG_BOUND)] * 4,
                               options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
    params = Params(*(float(value) for value in np.exp(result.x)))
    mean, gradient = _mean_log_likelihood_and_gradient(params, customers)
    # Our own test of a maximum rather than the optimizer's stop reason: L-BFGS-B may stop with a
    # line-search complaint at a point that is a maximum to machine precision.
    scaled_gradient = gradient * np.exp(result.x)
    # Out on the a, b -> infinity ridge (see _GRADIENT_TOLERANCE) the optimizer may stop anywhere,
    # the bound included: there only r and alpha must be a maximum.
    on_ridge = bool(np.all(result.x[2:] > _RIDGE_LOG))
    checked = slice(0, 2) if on_ridge else slice(0, 4)
    scaled_gradient = scaled_gradient[checked]
    inside = bool(np.all(np.abs(result.x[checked]) < _LOG_BOUND - 1e-6))
    # Without a single repeat purchase the likelihood only grows as the purchase rate goes to zero,
    # and a and b are not identified at all: whatever point the optimizer stops at means nothing.
    identified = bool(np.any(customers.x > 0))
    converged = bool(np.isfinite(mean) and inside and identified
                     and np.max(np.abs(scaled_gradient)) <= _GRADIENT_TOLERANCE)
    return Fit(params=params, log_likelihood=float(mean * customers.count), customers=customers.count,
               converged=converged)


def p_alive(params: Params, x: int, t_x: float, T: float) -> float:
    """P(the customer is still alive at age T | x, t_x) (eq. 7). 1 when x == 0: in this model a
    customer can only drop out right after a repeat purchase."""
    if x == 0:
        return 1.0
    return float(special.expit(-_log_odds_dead(params, x, t_x, T)))


def expected_purchases(params: Params, t: float, x: int, t_x: float, T: float) -> float:
    """E[purchases in (T, T + t] | x, t_x, T] (eq. 10): how many purchases to expect from this
    customer over the next `t`, their chance of being dead included."""
    if t < 0:
        raise ValueError(f"t must not be negative, got {t}")
    if t == 0:
        return 0.0
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    alive = p_alive(params, x, t_x, T)
    # Eq. 10 after Euler's transformation of its 2F1(r+x, b+x; a+b+x-1; z), which turns
    # ((alpha+T)/(alpha+T+t))^(r+x) * 2F1(...) into (1-z)^(a-1) * 2F1(a+b-1-r, a-1; a+b+x-1; z):
    # the same value, but the series no longer grows with x, so heavy buyers stay accurate.
    z = t / (alpha + T + t)
    c = a + b + x - 1
    # The closed form divides by a - 1 (a removable singularity at a == 1) and needs c > 0; near
    # those, and whenever it is not finite, integrate the model directly instead.
    if abs(a - 1) > 1e-5 and c > 0:
        series = special.hyp2f1(a + b - 1 - r, a - 1, c, z)
        bracket = -math.expm1((a - 1) * math.log1p(-z) + math.log(series)) if series > 0 else math.nan
        value = c / (a - 1) * bracket * alive
        if math.isfinite(value) and value >= 0:
            return float(value)
    return _expected_purchases_by_integration(params, t, x, T) * alive


def p_alive_falls_below_at(params: Params, x: int, t_x: float, threshold: float) -> float | None:
    """The age T at which P(alive) reaches `threshold`, falling: above it before, below after.
    None when x == 0 (P(alive) stays 1), or when the age would be too large for a float (only
    for absurd parameters or thresholds). When P(alive) is already below the threshold right at the
    last purchase (T == t_x), returns t_x. In the unit of t_x, counted from the first purchase."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if x == 0:
        return None
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    # P(alive) = 1 / (1 + K * ((alpha+T)/(alpha+t_x))^(r+x)) with K = a/(b+x-1); solve P = threshold
    # for T: (r+x) * log((alpha+T)/(alpha+t_x)) = log(1/threshold - 1) - log K.
    log_growth = (-special.logit(threshold) - (math.log(a) - math.log(b + x - 1))) / (r + x)
    if log_growth > 700:
        return None  # an age beyond any float: never, as far as anyone will see
    age = (alpha + t_x) * math.exp(log_growth) - alpha
    return float(max(age, t_x))


# --- the likelihood -------------------------------------------------------------------------------

def _group(x: ArrayLike, t_x: ArrayLike, T: ArrayLike) -> _Customers:
    x, t_x, T = (np.asarray(values, dtype=float).ravel() for values in (x, t_x, T))
    if not x.shape == t_x.shape == T.shape:
        raise ValueError(f"x, t_x and T differ in length: {x.shape[0]}, {t_x.shape[0]}, {T.shape[0]}")
    if x.size and (np.any(x < 0) or np.any(x != np.round(x)) or np.any(t_x < 0) or np.any(T < t_x)
                   or not np.all(np.isfinite(t_x)) or not np.all(np.isfinite(T))):
        raise ValueError("need whole x >= 0 and 0 <= t_x <= T, all finite")
    # np.unique sorts the rows, which also makes every sum below independent of the input order.
    rows, weight = np.unique(np.column_stack([x, t_x, T]), axis=0, return_counts=True)
    x_values, x_index = np.unique(rows[:, 0], return_inverse=True)
    return _Customers(x=rows[:, 0], t_x=rows[:, 1], T=rows[:, 2], weight=weight.astype(float),
                      x_values=x_values, x_index=x_index.ravel())


def _mean_log_likelihood_and_gradient(params: Params, data: _Customers) -> tuple[float, np.ndarray]:
    """The mean log-likelihood per customer and its gradient by (r, alpha, a, b).

    Per customer, L = A1 * A2 * (A3 + [x > 0] * A4) with
        A1 = Gamma(r+x) alpha^r / Gamma(r),      A2 = B(a, b+x) / B(a, b),
        A3 = (alpha+T)^-(r+x),                   A4 = a/(b+x-1) * (alpha+t_x)^-(r+x),
    all in logs; the sum A3 + A4 through logaddexp so that neither underflows."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    x, t_x, T, weight, index = data.x, data.t_x, data.T, data.weight, data.x_index
    xv = data.x_values
    if data.count == 0:
        return 0.0, np.zeros(4)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # What depends on x alone, once per distinct x.
        ln_a1 = (special.gammaln(r + xv) - special.gammaln(r) + r * math.log(alpha))[index]
        dropout = _DropoutTerms.of(a, b, xv)
        ln_a2 = dropout.log_ratio[index]
        buyer = x > 0
        log_alpha_T = np.log(alpha + T)
        log_alpha_tx = np.log(alpha + t_x)
        ln_a3 = -(r + x) * log_alpha_T
        # b + x - 1 with x >= 1 is at least b > 0; for x == 0 the A4 term is absent.
        ln_a4 = np.where(buyer, math.log(a) - np.log(b + np.maximum(x - 1, 0)) - (r + x) * log_alpha_tx, -np.inf)
        ln_tail = np.logaddexp(ln_a3, ln_a4)
        per_customer = ln_a1 + ln_a2 + ln_tail
        total = float(np.dot(weight, per_customer))
        mean = total / weight.sum()

        # Weights of the two tail terms: w3 + w4 = 1.
        w4 = np.exp(ln_a4 - ln_tail)
        w3 = 1.0 - w4
        d_r = ((special.digamma(r + xv) - special.digamma(r))[index] + math.log(alpha)
               - w3 * log_alpha_T - w4 * log_alpha_tx)
        d_alpha = r / alpha - (r + x) * (w3 / (alpha + T) + w4 / (alpha + t_x))
        d_a = dropout.d_a[index] + w4 / a
        d_b = dropout.d_b[index] - np.where(buyer, w4 / (b + np.maximum(x - 1, 0)), 0.0)
        gradient = np.array([np.dot(weight, d) for d in (d_r, d_alpha, d_a, d_b)]) / weight.sum()
    return mean, gradient


@dataclass(frozen=True)
class _DropoutTerms:
    """What the dropout beta contributes per distinct x, as finite sums over i = 0 .. x-1 rather than
    differences of betaln and digamma: exact for any a and b, also far out on the a, b -> infinity
    ridge, where each of those functions is about a * log(a) and their difference loses every digit
    the likelihood still moves by (at a, b around 1e8 the log-likelihood was noise at 1e-6 per
    customer, the optimizer stopped short of the maximum and the fit did not count as converged).

        log_ratio = log B(a, b+x) - log B(a, b)                      = sum log(1 - a / (a+b+i))
        d_a = d/da log_ratio = psi(a+b) - psi(a+b+x)                 = -sum 1 / (a+b+i)
        d_b = d/db log_ratio = psi(b+x) - psi(b) + psi(a+b) - psi(a+b+x) = sum a / ((b+i) (a+b+i))"""
    log_ratio: np.ndarray
    d_a: np.ndarray
    d_b: np.ndarray

    @classmethod
    def of(cls, a: float, b: float, x_values: np.ndarray) -> _DropoutTerms:
        steps = np.arange(int(x_values.max()), dtype=float)
        total = a + b + steps
        at = x_values.astype(np.int64)

        def summed(terms: np.ndarray) -> np.ndarray:
            return np.concatenate(([0.0], np.cumsum(terms)))[at]

        return cls(log_ratio=summed(np.log1p(-a / total)), d_a=summed(-1.0 / total),
                   d_b=summed(a / ((b + steps) * total)))


def _starting_point(data: _Customers) -> np.ndarray:
    """r = a = b = 1 and alpha from the average purchase rate (r/alpha is the mean rate), so that the
    start scales with the unit of time the data comes in."""
    exposure = float(np.dot(data.weight, data.T))
    purchases = float(np.dot(data.weight, data.x))
    alpha = exposure / purchases if purchases > 0 and exposure > 0 else max(exposure / data.count, 1.0)
    return np.array([1.0, alpha, 1.0, 1.0])


# --- helpers of the per-customer figures ----------------------------------------------------------

def _log_odds_dead(params: Params, x: int, t_x: float, T: float) -> float:
    """log(P(dead) / P(alive)) for x > 0: log(a/(b+x-1)) + (r+x) * log((alpha+T)/(alpha+t_x))."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    return math.log(a) - math.log(b + x - 1) + (r + x) * (math.log(alpha + T) - math.log(alpha + t_x))


def _expected_purchases_by_integration(params: Params, t: float, x: int, T: float) -> float:
    """E[purchases in (T, T + t] | alive at T], straight from the model: given alive, the rate is
    Gamma(r+x, alpha+T) and the dropout probability Beta(a, b+x); a live customer with (lambda, p)
    buys (1 - exp(-lambda p t)) / p in expectation over t. Averaging over lambda in closed form leaves
    one expectation over p, integrated numerically. Slower than eq. 10 but defined for every a, b > 0."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    shape, scale, beta_b = r + x, t / (alpha + T), b + x
    log_beta = special.betaln(a, beta_b)

    # Integrated over v = log p, where the features of the integrand are a few units wide however
    # large b + x or the scale, and the density's p^a tail falls off geometrically.
    def purchases(p: float) -> float:
        step = p * scale
        if step * (shape + 1) < 1e-9:
            # Far down the tail (p even subnormal), the first two terms of the series in p are exact
            # to double precision, where the quotient below would be noise.
            return shape * scale * (1 - (shape + 1) * step / 2)
        return -math.expm1(-shape * math.log1p(step)) / p

    def integrand(v: float) -> float:
        p = math.exp(v)
        return math.exp(a * v + (beta_b - 1) * math.log1p(-p) - log_beta) * purchases(p)

    def without_singular_factor(v: float) -> float:
        """The integrand divided by (-v)^(b+x-1), which is singular at p = 1 when b + x < 1:
        (1-p)^(b+x-1) = (-v)^(b+x-1) * ((1-p)/(-v))^(b+x-1), the second factor smooth up to v = 0."""
        p = math.exp(v)
        ratio = -math.expm1(v) / -v if v < 0 else 1.0
        return math.exp(a * v + (beta_b - 1) * math.log(ratio) - log_beta) * purchases(p)

    # Where the integrand changes shape, in v: the beta's mean, the fall of (1-p)^(b+x-1) (near
    # p = 1/(b+x), far above the mean when a is small), and the bend near p = 1/scale.
    bulk, fall, bend = math.log(a / (a + beta_b)), -math.log1p(beta_b), -math.log(scale)
    # When b + x < 1 the density is singular at p = 1: above p = 1/2 quad's algebraic weight carries
    # the singularity exactly. Otherwise the integrand is bounded and one range does.
    top = math.log(0.5) if beta_b < 1 else 0.0
    # Below `lowest` the density's p^a factor leaves less than e^-50 of the mass.
    lowest = min(bulk, fall, bend, top) - 50.0 / a
    marks = sorted({mark for mark in (bulk, fall, bend) if lowest < mark < top})
    integral, _ = integrate.quad(integrand, lowest, top, points=marks or None, epsabs=1e-13, epsrel=1e-10, limit=500)
    if top < 0:
        singular, _ = integrate.quad(without_singular_factor, top, 0.0, weight="alg", wvar=(0.0, beta_b - 1),
                                     epsabs=1e-13, epsrel=1e-10, limit=500)
        integral += singular
    return float(integral)
