"""The churn score of one customer: the BG/NBD probability that the customer is still active and
the purchases to expect in the next 90 days (streams/churn/bgnbd.py), under the model in force in
the partition (schemas/alerts.py ChurnModelPublished). Inputs in days, as the model was fitted
(projections/churn_model.py): x = purchase days - 1, t_x = last - first purchase, T = now - first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.alerts import ChurnModelPublished
from streams.churn import bgnbd
from streams.churn.state import ChurnState
from streams.loyalty.calendar import DAY_MS

HORIZON_DAYS = 90


@dataclass(frozen=True, slots=True)
class Score:
    p_alive: float
    expected_90d: float
    model_id: str


def _inputs(churn: ChurnState, model: ChurnModelPublished, now_ms: int) -> tuple[int, float, float]:
    unit = model.time_unit_days * DAY_MS
    first, last = churn.first_purchase_ms, churn.last_purchase_ms
    return churn.purchase_day_count - 1, (last - first) / unit, (max(now_ms, last) - first) / unit  # type: ignore[operator]


def _params(model: ChurnModelPublished) -> bgnbd.Params:
    cached = _PARAMS.get(id(model))
    if cached is None or cached[0] is not model:
        cached = _PARAMS[id(model)] = (model, bgnbd.Params(r=model.r, alpha=model.alpha, a=model.a, b=model.b))
    return cached[1]


# Model id() -> (the model, its parameters): models are parsed once per process and asked for at
# every evaluation. The entry holds the model so that its id stays its own.
_PARAMS: dict[int, tuple[ChurnModelPublished, bgnbd.Params]] = {}


def score(churn: ChurnState, model: ChurnModelPublished | None, now_ms: int) -> Score | None:
    """The score as of `now_ms`, or None before a model or a purchase. Rounded: the figures go into
    profile rows and alerts, and a replay must print the same digits."""
    if model is None or not churn.purchase_day_count:
        return None
    x, t_x, age = _inputs(churn, model, now_ms)
    params = _params(model)
    return Score(round(bgnbd.p_alive(params, x, t_x, age), 4),
                 round(bgnbd.expected_purchases(params, HORIZON_DAYS / model.time_unit_days, x, t_x, age), 3),
                 model.model_id)


def falls_below_ms(churn: ChurnState, model: ChurnModelPublished | None, threshold: float) -> int | None:
    """The event time at which P(alive) falls below `threshold` with no further purchase."""
    if model is None or churn.purchase_day_count < 2:
        return None
    # A function of the model and the purchase history alone, asked for at every deadline while
    # the history stays the same: the last answer is kept.
    key = (model, churn.purchase_day_count, churn.first_purchase_ms, churn.last_purchase_ms, threshold)
    last = _LastFall.last
    if last is not None and last[0][0] is model and last[0][1:] == key[1:]:
        return last[1]
    x, t_x, _ = _inputs(churn, model, churn.last_purchase_ms)  # type: ignore[arg-type]
    age = bgnbd.p_alive_falls_below_at(_params(model), x, t_x, threshold)
    moment = None
    if age is not None:
        moment = churn.first_purchase_ms + math.ceil(age * model.time_unit_days * DAY_MS)  # type: ignore[operator]
    _LastFall.last = (key, moment)
    return moment


class _LastFall:
    """`falls_below_ms`'s last inputs (the model compared by identity: the key holds it) and
    answer, as one tuple replaced whole."""
    last: tuple[tuple[object, ...], int | None] | None = None
