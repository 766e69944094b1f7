"""Serving-time output defenses: pure functions probs[N, C] -> probs[N, C] (numpy), each with its parameters,
registered in DEFENSES.

`ASTGUARD_OUTPUT_DEFENSE` picks one by key; its parameters come from the `ASTGUARD_DEFENSE_*` settings.
Every row is treated on its own, so a batch mixes confident and unsure answers safely. A new defense is one
function and one `register_defense(...)` here: the service's settings, the evaluation's rows (`--teachers NAME`)
and the report find it by name (README: "Adding a serving-time defense").
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from astguard.registry import Registry

Defense = Callable[..., np.ndarray]  # (probs [N, C], **params) -> probs [N, C]
DEFENSES: Registry[Defense] = Registry("output defense")


def register_defense(name: str, *, summary: str, params: tuple[str, ...] = (), keeps_top1: bool = True,
                     top1_note: str = "", models: tuple[str, ...] = (), default_row: bool = False):
    """Decorator: register a defense; `params` are its keyword arguments, read from settings `defense_<param>`;
    `keeps_top1`: every answer keeps the model's top-1 class, by the definition (tested); `top1_note` qualifies it.
    `models` names the other models whose probabilities (on the same images) it takes as keyword arguments, each a
    teacher recipe (the service loads them from `ASTGUARD_<NAME>_MODEL`). `default_row`: one of the evaluation's
    default rows."""
    return DEFENSES.register(name, summary=summary, params=params, keeps_top1=keeps_top1, top1_note=top1_note,
                             models=models, default_row=default_row)


@register_defense("none", summary="the model's probabilities as they are")
def none(probs: np.ndarray) -> np.ndarray:
    return probs


@register_defense("topk", summary="Stingy Teacher: the k largest probabilities, renormalised", params=("k",))
def topk(probs: np.ndarray, k: int) -> np.ndarray:
    """Stingy Teacher (Ma et al.): keep the k largest probabilities of each row, zero the rest, renormalise.
    Keeps the top-1 label."""
    k = min(k, probs.shape[1])
    keep = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    out = np.zeros_like(probs)
    np.put_along_axis(out, keep, np.take_along_axis(probs, keep, axis=1), axis=1)
    return out / out.sum(1, keepdims=True)


@register_defense("round", summary="rounded to d places by largest remainder, so rows still sum to 1",
                  params=("decimals",), top1_note="up to ties that rounding creates")
def round_probs(probs: np.ndarray, decimals: int) -> np.ndarray:
    """Round to `decimals` places so that each row still sums to 1 (largest-remainder rounding).
    Keeps the top-1 label up to ties that rounding creates."""
    scale = 10 ** decimals
    scaled = probs.astype(np.float64) * scale
    floor = np.floor(scaled)
    short = np.rint(scale - floor.sum(1)).astype(int)  # units still to hand out per row
    order = np.argsort(-(scaled - floor), axis=1, kind="stable")
    bump = np.arange(probs.shape[1])[None, :] < short[:, None]
    np.put_along_axis(floor, order, np.take_along_axis(floor, order, axis=1) + bump, axis=1)
    return (floor / scale).astype(probs.dtype)


@register_defense("reverse_sigmoid", summary="Lee et al. 2019: `p - beta*(sigmoid(gamma*logit p) - 1/2)`, clipped, "
                  "renormalised", params=("beta", "gamma"),
                  keeps_top1=False, top1_note="it is not monotone near 0, so a low-confidence row with many "
                                              "classes can change its top-1")
def reverse_sigmoid(probs: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Lee et al. (2019): p - beta * (sigmoid(gamma * logit(p)) - 1/2), clipped to [0,1], renormalised.
    It misleads a student fitted to log-probabilities; it may change the top-1 of low-confidence rows with
    many classes (it is not monotone near 0), so the service's `label` always comes from the model's own answer."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    r = beta * (1.0 / (1.0 + np.exp(-gamma * np.log(p / (1 - p)))) - 0.5)
    q = np.clip(probs - r, 0.0, 1.0)
    total = q.sum(1, keepdims=True)
    q = np.where(total > 0, q / np.where(total > 0, total, 1), probs)
    return q.astype(probs.dtype)


@register_defense("label_only", summary="one-hot of the top-1")
def label_only(probs: np.ndarray) -> np.ndarray:
    """One-hot of the top-1: a label-only API. Keeps the top-1 label."""
    out = np.zeros_like(probs)
    out[np.arange(len(probs)), probs.argmax(1)] = 1.0
    return out


@register_defense("dcp", summary="after Khaled et al. 2023: reverse-sigmoid perturbation only on answers whose top-1 "
                  "is below tau", params=("beta", "gamma", "tau"), keeps_top1=False,
                  top1_note="confident rows are unchanged")
def dcp(probs: np.ndarray, beta: float, gamma: float, tau: float) -> np.ndarray:
    """Confidence-gated perturbation (after Khaled et al., 2023): reverse-sigmoid perturbation only for rows
    whose top-1 probability is below tau, where a thief learns most; confident rows are returned as they are."""
    unsure = probs.max(1) < tau
    out = probs.copy()
    if unsure.any():
        out[unsure] = reverse_sigmoid(probs[unsure], beta, gamma)
    return out


@register_defense("misinformation", summary="Kariyappa & Qureshi 2020, adaptive misinformation: "
                  "`(1 - a) f(x) + a g(x)`, `a = sigmoid(nu (tau - max f(x)))`, g the misinformation model",
                  params=("nu", "tau"), models=("misinformation",), keeps_top1=False,
                  top1_note="confident rows are nearly unchanged; unsure ones lean to the misinformation model",
                  default_row=True)
def misinformation(probs: np.ndarray, nu: float, tau: float, misinformation: np.ndarray) -> np.ndarray:
    """Answers that look out of distribution (a low top-1) blend toward the misinformation model's answers g(x),
    which put little mass on the true class; in-distribution answers stay the model's own."""
    a = 1.0 / (1.0 + np.exp(-nu * (tau - probs.max(1, keepdims=True).astype(np.float64))))
    out = (1 - a) * probs.astype(np.float64) + a * misinformation.astype(np.float64)
    return (out / out.sum(1, keepdims=True)).astype(probs.dtype)


def make_defense(name: str, **settings) -> tuple[Callable[..., np.ndarray], dict]:
    """The defense `name` bound to its parameters (taken from `settings` by name); returns (fn, params). A defense
    that takes other models' answers (`models`) takes them as keyword arguments of fn."""
    entry = DEFENSES.entry(name)
    params = {p: settings[p] for p in entry.params}
    return (lambda probs, **answers: entry.value(probs, **params, **answers)), params
