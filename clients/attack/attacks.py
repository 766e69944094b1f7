"""The attack suite: an attack is a query strategy plus a label treatment plus a student fit, registered in ATTACKS.

Every attack gets the same `Setting`: the victim (its card, its output defense, and a blocking `ask` for more
answers), the transfer set already bought (random queries from the thief's data), the thief's labelled test set
with the victim's answers on it, and the student it trains. Most attacks only treat the shared answers; the ones
that need other queries (smoothing's augmentations, noise, jbda's rounds) buy their own, at most the same budget,
kept on disk like the shared set, and report what they spent.

A defense is then judged by the worst case: the attack whose student is the most accurate (`worst_case`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from astguard.card import ModelCard
from astguard.registry import Registry
from clients.attack.answers import TransferSet, digest
from clients.attack.queries import NOISE, plan_queries
from clients.attack.student import StudentSpec, distill_group, distill_student, score
from training.data import Split, batch_crop_flip
from training.distill import LABEL_MODES

Ask = Callable[[Tensor, np.ndarray], tuple[str, float]]  # fill the NaN rows of probs for images; (stop reason, s)


class AttackError(ValueError):
    """An attack that cannot run with what the thief has (no answers left in the budget...): one line, not a
    traceback."""


@dataclass
class Setting:
    """What every attack is given."""
    card: ModelCard
    defense: dict  # the victim's output defense as it reports it: {"name", "params", "summary"}
    ask: Ask  # buys answers (blocking); every answer bought is kept in the array it fills
    transfer: TransferSet  # the shared queries and their answers
    test: Split | None  # the thief's labelled evaluation set, in the victim's input shape
    test_answers: np.ndarray | None  # the victim's answers on it (None: not bought)
    spec: StudentSpec
    out: Path  # this attack's own folder
    device: torch.device
    temperature: float = 4.0
    use_labels: bool = False  # mix in the thief's true labels (when its query set has them), weight 1 - alpha
    alpha: float = 0.9
    reuse: bool = False  # train on what was bought before, buy nothing
    progress: bool = False
    seed: int = 0
    answers_dir: Path | None = None  # where answers to queries that do not depend on the student are kept (several
    #                                  students of one victim then pay once); default: `out`

    @property
    def budget(self) -> int:
        """How many queries an attack with queries of its own may buy: as many as the shared set holds."""
        return len(self.transfer.images)

    def bought(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.transfer.bought()

    def fallback_test(self, images: Tensor, probs: Tensor) -> Split:
        """Where the training loop logs its test accuracy when the thief has no labelled set: the victim's top-1."""
        return self.test or Split(images, probs.argmax(1))

    def own_answers(self, name: str, images: Tensor, labels: Tensor | None, meta: dict, folder: str = "",
                    shared: bool = False) -> tuple[TransferSet, int]:
        """The victim's answers to an attack's own queries, kept in out/[folder/]transfer.npz (with `shared`, queries
        that do not depend on the student: in answers_dir). A rerun with the same plan reads them back (its saved
        images too) and asks only for what is missing (with `reuse`, nothing); a plan is the same when the victim,
        its output defense, the shared transfer set's plan and `meta` are. Returns the set and the queries newly
        bought in this run."""
        path = ((self.answers_dir or self.out) if shared else self.out) / folder / "transfer.npz"
        meta = {"attack": name, "victim_sha256": self.card.sha256, "defense": self.defense,
                "shared_plan": self.transfer.meta, **meta}
        transfer = None
        if path.exists():
            saved = TransferSet.load(path)
            if saved.meta == meta and saved.images.shape == images.shape:
                transfer = saved
        if transfer is None:
            if self.reuse:
                raise FileNotFoundError(f"--reuse: the {name} attack has no saved answers in {path}")
            transfer = TransferSet.planned(images, labels, self.card.num_classes, meta)
        before = int(transfer.answered.sum())
        if not self.reuse and not transfer.answered.all():
            try:
                self.ask(transfer.images, transfer.probs)
            finally:  # whatever happened: the answers were paid for
                transfer.save(path)
        return transfer, int(transfer.answered.sum()) - before


@dataclass
class Stolen:
    """What an attack ends with: the student, the queries it bought itself, and anything it chose on the way."""
    student: nn.Module
    queries_used: int = 0
    details: dict = field(default_factory=dict)
    history: list[dict] | None = None  # the student's per-epoch log, where one training made it


@dataclass(frozen=True)
class Attack:
    run: Callable[..., Stolen]  # (setting, **params) -> Stolen
    defaults: dict[str, Any]  # its parameters and their defaults
    assumes: str  # what the thief must have
    cost: str  # what it costs in queries


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str, run: Callable[..., Stolen], *, summary: str, assumes: str, cost: str,
                    in_all: bool = True, **defaults):
    """`in_all=False` keeps an entry out of `--attack all` (a near-duplicate kept for old results)."""
    return ATTACKS.register(name, Attack(run, defaults, assumes, cost), summary=summary, params=tuple(defaults),
                            in_all=in_all)


def attack_names(text: str, *, allow_none: bool = False) -> list[str]:
    """`all`, a comma-separated list of registered attacks, or (where allowed) `none`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"] and allow_none:
        return []
    if names == ["all"]:
        return [e.name for e in ATTACKS.entries() if e.get("in_all", True)]
    for n in names:
        ATTACKS.entry(n)  # an unknown name: "unknown attack 'x'; known: ..."
    if not names:
        raise ValueError("expected `all` or a comma-separated list of attacks")
    return list(dict.fromkeys(names))


def attack_settings(name: str, params: dict) -> dict:
    """An attack's parameters: its defaults with `params` over them; a parameter it does not take is an error."""
    attack = ATTACKS[name]
    unknown = set(params) - set(attack.defaults)
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter {sorted(unknown)[0]!r}; it takes "
                         f"{', '.join(attack.defaults) or 'none'}")
    return {**attack.defaults, **params}


def run_attack(name: str, setting: Setting, **params) -> dict:
    """One attack, scored on the thief's test set: student_accuracy (and, with the victim's test answers, agreement
    with the victim and KL(victim || student)), queries_used, seconds, settings, and what it chose."""
    attack = ATTACKS[name]
    settings = attack_settings(name, params)
    setting.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stolen = attack.run(setting, **settings)
    seconds = time.perf_counter() - t0
    scores = score(stolen.student, setting.test, setting.test_answers, setting.device) if setting.test else {}
    return {"student_accuracy": scores.get("student_accuracy"), "agreement": scores.get("agreement"),
            "kl": scores.get("kl"), "victim_accuracy": scores.get("victim_accuracy"),
            "queries_used": stolen.queries_used, "seconds": round(seconds, 2), "settings": _plain(settings),
            **({"chosen": stolen.details} if stolen.details else {}),
            **({"student_last_epoch": stolen.history[-1]} if stolen.history else {})}


def _plain(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def worst_case(results: dict[str, dict]) -> dict | None:
    """The attack whose student is the most accurate on the thief's test set (agreement breaks ties): what a
    defense must be judged by."""
    scored = {k: v for k, v in results.items() if v.get("student_accuracy") is not None}
    if not scored:
        return None
    name = max(scored, key=lambda k: (scored[k]["student_accuracy"], scored[k].get("agreement") or 0.0))
    return {"attack": name, "student_accuracy": scored[name]["student_accuracy"],
            "agreement": scored[name].get("agreement")}


# ---------------------------------------------------------------- label treatments of the shared answers

def _distill(setting: Setting, mode: str) -> Stolen:
    images, probs, labels = setting.bought()
    student, history = distill_student(setting.spec, images, probs, labels if setting.use_labels else None,
                                       setting.fallback_test(images, probs), setting.out / "student", mode=mode,
                                       temperature=setting.temperature,
                                       alpha=setting.alpha if setting.use_labels else 1.0, device=setting.device,
                                       progress=setting.progress)
    return Stolen(student, history=history)


for _mode in LABEL_MODES.entries():
    register_attack(_mode.name, lambda setting, _m=_mode.name: _distill(setting, _m),
                    summary=f"the shared answers, fitted with label mode `{_mode.name}`",
                    assumes="a data set to query (random draws from it)", cost="the shared queries only",
                    in_all=_mode.name != "logit")


def temperature_sweep(setting: Setting, temperatures: tuple[float, ...] = (1, 2, 4, 8, 16, 32),
                      held_out: float = 0.1) -> Stolen:
    """`logit-kd` at each T on nine tenths of the shared answers; the T whose student agrees most with the victim's
    top-1 on the held-out tenth wins (no extra queries, and the thief's test set is never looked at)."""
    images, probs, _ = setting.bought()
    n = len(images)
    held = torch.randperm(n, generator=torch.Generator().manual_seed(setting.seed))[:max(1, round(n * held_out))]
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    members = {t: ("logit-kd", float(t)) for t in temperatures}
    check = Split(images[held], probs[held].argmax(1))  # the victim's top-1 on the held-out tenth
    students = distill_group(setting.spec, images[keep], probs[keep], members, check, setting.out,
                             device=setting.device, progress=setting.progress)
    agreement = {t: score(students[t], check, None, setting.device)["student_accuracy"] for t in temperatures}
    best = max(temperatures, key=lambda t: (agreement[t], -t))  # ties: the lower temperature
    return Stolen(students[best], 0, {"temperature": float(best), "held_out": len(held),
                                      "agreement_by_temperature": {str(t): a for t, a in agreement.items()}})


register_attack("temperature-sweep", temperature_sweep,
                summary="`logit-kd` at T in 1..32, T chosen by agreement with the victim on a held-out tenth of the "
                        "shared answers", assumes="a data set to query", cost="the shared queries only",
                temperatures=(1, 2, 4, 8, 16, 32), held_out=0.1)


# ---------------------------------------------------------------- attacks with queries of their own

def smoothed_answers(setting: Setting, n: int) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """budget // n images of the shared plan, each asked under n random crops (and flips where the thief uses them);
    returns the images whose n answers all came back, the mean of their n answers, their labels, and the queries
    bought."""
    images, labels = setting.transfer.images, setting.transfer.labels
    m = setting.budget // n
    if m < 1:
        raise AttackError(f"the smoothing attack asks each image {n} times: a budget of {setting.budget} is too small")
    base = images[:m]
    g = torch.Generator().manual_seed(setting.seed + 1)
    pad = max(1, base.shape[2] // 8)
    views = torch.cat([batch_crop_flip([base], pad, setting.spec.flip, g)[0] for _ in range(n)])
    own, bought = setting.own_answers("smoothing", views, None, {"n": n, "images": m, "seed": setting.seed,
                                                                 "flip": setting.spec.flip, "views": digest(views)},
                                      shared=True)
    complete = own.answered.reshape(n, m).all(0)  # an image counts once all its n answers are in
    if not complete.any():
        raise AttackError("the smoothing attack got no complete set of answers (the server's budget ran out)")
    mean = torch.from_numpy(own.probs.reshape(n, m, -1)[:, complete].mean(0))
    keep = torch.from_numpy(complete)
    return base[keep], mean, labels[:m][keep] if labels is not None else None, bought


def smoothing(setting: Setting, n: int = 3, mode: str = "soft") -> Stolen:
    """The student fits, on each image itself, the average of the victim's answers to n augmented views of it."""
    x, mean, y, bought = smoothed_answers(setting, n)
    student, _ = distill_student(setting.spec, x, mean, y if setting.use_labels else None,
                                 setting.fallback_test(x, mean), setting.out / "student", mode=mode,
                                 temperature=setting.temperature, alpha=setting.alpha if setting.use_labels else 1.0,
                                 device=setting.device, progress=setting.progress)
    return Stolen(student, bought, {"images": len(x), "answers_per_image": n})


register_attack("smoothing", smoothing,
                summary="each image asked under n random augmentations; the student fits the average answer",
                assumes="a data set to query", cost="n queries per image: budget // n images, the budget in all",
                n=3, mode="soft")


def noise(setting: Setting, mode: str = "soft") -> Stolen:
    """Uniform random pixels as queries: a thief with no data at all."""
    c, h, w = setting.card.input.channels, setting.card.input.height, setting.card.input.width
    images, _ = plan_queries(NOISE, setting.budget, channels=c, size=(h, w), seed=setting.seed + 2)
    own, bought = setting.own_answers("noise", images, None, {"seed": setting.seed, "budget": setting.budget,
                                                             "images": digest(images)}, shared=True)
    x, probs, _ = own.bought()
    if len(x) == 0:
        raise AttackError("the noise attack got no answers (the server's budget ran out)")
    student, _ = distill_student(setting.spec, x, probs, None, setting.fallback_test(x, probs),
                                 setting.out / "student", mode=mode, temperature=setting.temperature,
                                 device=setting.device, progress=setting.progress)
    return Stolen(student, bought)


register_attack("noise", noise, summary="uniform random pixels as queries, label mode `soft`",
                assumes="nothing but the victim's input shape", cost="its own queries: the budget", mode="soft")


# The attacks that need a module of their own register themselves there (as training.models does).
from clients.attack import jbda, recovery, skeptical  # noqa: E402,F401
