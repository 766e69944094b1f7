"""astguard-steal: steal a served classifier by knowledge distillation, and report how much was stolen.

    python clients/steal.py --url http://127.0.0.1:8000 --queries digits:train --budget 1000 \\
        --student digits_cnn --eval digits:test --out runs/steal-1

It queries the endpoint as a real client would (PNG images, several per request, concurrently, honouring
429/503 Retry-After), keeps every answer in OUT/transfer.npz, trains a student on them with the training
package's loop, and writes OUT/report.json and OUT/report.md. The steps are the attacker library's
(clients/attack): plan queries -> buy answers -> distill a student.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the packages importable, keep clients/ off sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
from astguard.card import CardError  # noqa: E402
from astguard.cli import Parser, add_options, from_args, option  # noqa: E402
from clients.attack.answers import TransferSet, buy, buy_cached  # noqa: E402
from clients.attack.queries import NOISE, fit_to_victim, plan_queries  # noqa: E402
from clients.attack.attacks import ATTACKS, Setting, attack_names, run_attack, worst_case  # noqa: E402
from clients.attack.student import StudentSpec, reference_student, score  # noqa: E402
from clients.attack.victim import BlockingEndpoint  # noqa: E402
from clients.client import AstguardError, Unauthorized, Unavailable, Unreachable  # noqa: E402
from training.data import DataError, Split, load_split, parse_spec  # noqa: E402
from training.distill import LABEL_MODES  # noqa: E402
from training.loop import resolve_device  # noqa: E402
from training.models import MODELS  # noqa: E402

TRANSFER, EVAL_ANSWERS = "transfer.npz", "eval_answers.npz"


class StealError(Exception):
    """A problem the user can fix; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StealConfig:
    url: str = option(help="the victim's base URL, e.g. http://127.0.0.1:8000")
    out: Path = option(help="output folder")
    api_key: str | None = option(None, "API key (also ASTGUARD_API_KEY)")
    queries: str = option("digits:train", "query set spec, or noise")
    budget: int = option(1000, "images to query at most")
    augment: bool = option(False, "randomly crop every query image (repeats always are)")
    flip: bool = option(False, "random horizontal flips in augmentation and student training (not for digits)")
    label_mode: str = option("soft", "the label mode of the one attack run without --attack (registry key)",
                             choices=tuple(LABEL_MODES))
    attack: str | None = option(None, "attacks: a comma-separated list, or all (listed below; default: the "
                                      "--label-mode attack alone)")
    temperature: float = option(4.0, "distillation temperature T")
    use_labels: bool = option(False, "mix in cross-entropy on the query set's true labels")
    alpha: float = option(0.9, "with --use-labels: weight of the distillation term")
    student: str = option("digits_cnn", "student architecture (registry key)")
    epochs: int = option(20, "student epochs")
    lr: float = option(0.05, "student SGD learning rate")
    batch_size: int = option(64, "student batch size")
    crop_pad: int = option(1, "student random-crop padding")
    seed: int = option(0, "seed of the query plan and the student")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    eval: str | None = option(None, "labelled evaluation set spec, e.g. digits:test")
    reference: bool = option(True, "also train the reference student on the true labels of the same queries")
    images_per_request: int = option(16, "images per HTTP request")
    concurrency: int = option(4, "requests in flight")
    retries: int = option(6, "retries per request on 429/503/connection errors")
    reuse: bool = option(False, "train on the saved transfer set without querying again")
    resume: bool = option(False, "continue an interrupted querying run")
    overwrite: bool = option(False, "discard a saved transfer set and query afresh")
    compare: Path | None = option(None, "report.json of another run to compare with")
    data_root: str = option("data", "where cifar10/cifar100 live")
    cache_dir: Path | None = option(None, "decoded data sets (default: <out>/../.cache/data)")
    progress: bool = option(True, "progress bars")
    attacks: tuple[str, ...] = option((), cli=False)  # --attack resolved (validate)

    @property
    def student_spec(self) -> StudentSpec:
        return StudentSpec(self.student, self.epochs, self.lr, self.batch_size, self.crop_pad, self.flip, self.seed)

    def plan_meta(self, victim_sha256: str) -> dict:
        """What a saved transfer set must have been made from for --resume to continue it."""
        return {"victim_sha256": victim_sha256, "queries": self.queries, "budget": self.budget,
                "augment": self.augment, "flip": self.flip, "seed": self.seed}


# ---------------------------------------------------------------- the attack

def _transfer_set(cfg: StealConfig, card) -> TransferSet:
    """The saved transfer set (--reuse, --resume) or a new plan."""
    path, meta = cfg.out / TRANSFER, cfg.plan_meta(card.sha256)
    if cfg.reuse or cfg.resume:
        if not path.exists():
            raise StealError(f"--{'reuse' if cfg.reuse else 'resume'}: no transfer set in {cfg.out}")
        transfer = TransferSet.load(path)
        if cfg.resume and transfer.meta != meta:
            raise StealError(f"--resume: {path} was made with other settings or another victim "
                             f"({transfer.meta}); use the same options, or --overwrite")
        return transfer
    if path.exists() and not cfg.overwrite:
        old = TransferSet.load(path)
        raise StealError(f"{cfg.out} already holds {int(old.answered.sum())} answered queries: --reuse to "
                         "train on them, --resume to continue querying, or --overwrite to start again")
    i = card.input
    images, labels = plan_queries(cfg.queries, cfg.budget, channels=i.channels, size=(i.height, i.width),
                                  augment=cfg.augment, flip=cfg.flip, seed=cfg.seed, data_root=cfg.data_root,
                                  cache_dir=cfg.cache_dir)
    return TransferSet.planned(images, labels, card.num_classes, meta)


def _steal(cfg: StealConfig, device) -> dict:
    """Buy the shared transfer set and the evaluation answers, then run the attacks, which may buy more; the
    endpoint stays open throughout."""
    with BlockingEndpoint(cfg.url, cfg.api_key, images_per_request=cfg.images_per_request,
                          concurrency=cfg.concurrency, retries=cfg.retries) as endpoint:
        card = endpoint.card
        transfer = _transfer_set(cfg, card)
        if cfg.overwrite and (cfg.out / "attacks").exists():  # their own answers belong to the plan thrown away
            shutil.rmtree(cfg.out / "attacks")
        stop_reason, query_s, asked = "reused", 0.0, int((~transfer.answered).sum())
        if not cfg.reuse:
            try:
                stop_reason, query_s = endpoint.call(buy(endpoint.victim, transfer, cfg.out / TRANSFER,
                                                         progress=cfg.progress))
            except (Unreachable, Unavailable) as e:
                raise StealError(f"the server stopped answering after {int(transfer.answered.sum())} of "
                                 f"{len(transfer.probs)} queries ({e.message}); the answers so far are saved in "
                                 f"{cfg.out / TRANSFER}: rerun the same command with --resume to continue, or "
                                 "with --reuse to train on what was saved", 3) from None
        newly = 0 if cfg.reuse else asked - int((~transfer.answered).sum())
        if not transfer.answered.any():  # before buying the evaluation set with what is left
            raise StealError("the victim answered no queries (its budget for this key may be spent already)")
        # Evaluation set: the attacker's own labelled data, resized to the victim's input.
        test, victim_eval = None, None
        if cfg.eval:
            _, ev = load_split(cfg.eval, cfg.data_root, cfg.cache_dir, default_split="test")
            i = card.input
            test = Split(fit_to_victim(ev.images, i.channels, (i.height, i.width)), ev.labels)
            try:
                probs = endpoint.call(buy_cached(endpoint.victim, test.images, cfg.out / EVAL_ANSWERS, cfg.eval,
                                                 progress=cfg.progress))
            except (Unreachable, Unavailable) as e:
                raise StealError(f"the server stopped answering while the evaluation set was queried "
                                 f"({e.message}); the answers so far are saved in {cfg.out}: rerun the same "
                                 "command with --reuse to finish the evaluation without querying the transfer "
                                 "set again", 3) from None
            victim_eval = None if np.isnan(probs).any() else probs  # the budget ran out: no victim figures

        t1 = time.perf_counter()
        results = {}
        for name in cfg.attacks:
            setting = Setting(card, endpoint.defense, partial(endpoint.answer, progress=cfg.progress), transfer, test,
                              victim_eval, cfg.student_spec, cfg.out / "attacks" / name, device, cfg.temperature,
                              cfg.use_labels, cfg.alpha, cfg.reuse, cfg.progress, cfg.seed)
            try:
                results[name] = run_attack(name, setting)
            except (Unreachable, Unavailable) as e:
                raise StealError(f"the server stopped answering during the {name} attack ({e.message}); the "
                                 f"answers so far are saved under {cfg.out}: rerun the same command with --resume "
                                 "to continue", 3) from None
            except FileNotFoundError as e:  # --reuse of an attack that never bought its own answers
                raise StealError(str(e)) from None
        defense = endpoint.defense
    return {"card": card, "defense": defense, "transfer": transfer, "stop_reason": stop_reason, "query_s": query_s,
            "newly": newly, "test": test, "victim_eval": victim_eval, "attacks": results,
            "train_s": time.perf_counter() - t1}


def attack(cfg: StealConfig) -> dict:
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    try:
        done = _steal(cfg, device)
    except Unauthorized as e:
        raise StealError(f"the server refused the API key ({e.message})") from None
    except Unreachable as e:
        raise StealError(e.message) from None
    except AstguardError as e:
        raise StealError(f"the server answered {e.message}") from None
    except CardError as e:
        raise StealError(f"the server's model card is not valid: {e}") from None
    card, transfer, test, results = done["card"], done["transfer"], done["test"], done["attacks"]
    images, _, labels = transfer.bought()
    worst = worst_case(results)
    headline = results[worst["attack"]] if worst else results[cfg.attacks[0]]
    newly, query_s = done["newly"], done["query_s"]
    report = {
        "victim": {"url": cfg.url, "name": card.name, "version": card.version, "sha256": card.sha256,
                   "teacher": card.teacher_type, "output_defense": done["defense"]},
        "victim_accuracy": headline.get("victim_accuracy"), "student_accuracy": headline["student_accuracy"],
        "agreement": headline["agreement"], "kl": headline["kl"],
        "reference_accuracy": None, "chance": round(1 / card.num_classes, 4),
        "queries_used": newly + sum(r["queries_used"] for r in results.values()),
        "transfer_set_size": int(transfer.answered.sum()), "queries_planned": len(transfer.probs),
        "stop_reason": done["stop_reason"], "eval_queries": len(test.labels) if done["victim_eval"] is not None else 0,
        "images_per_s": round(newly / query_s, 1) if query_s else None, "query_seconds": round(query_s, 2),
        "train_seconds": round(done["train_s"], 2), "student_last_epoch": headline.get("student_last_epoch"),
        "attacks": results, "worst_case": worst,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                     if k not in ("api_key", "compare")},
    }
    if test is not None and labels is not None and cfg.reference:
        scratch = reference_student(cfg.student_spec, images, labels, card.num_classes, test, cfg.out / "reference",
                                    device=device, progress=cfg.progress)
        report["reference_accuracy"] = score(scratch, test, None, device)["student_accuracy"]
    report["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.compare:
        report["compared_with"] = compare(report, json.loads(cfg.compare.read_text()), str(cfg.compare))
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (cfg.out / "report.md").write_text(markdown(report))
    return report


COMPARED = ("victim_accuracy", "student_accuracy", "agreement", "kl", "reference_accuracy", "queries_used",
            "images_per_s")


def compare(report: dict, other: dict, name: str) -> dict:
    """This run minus another (e.g. the same attack on an undefended endpoint), metric by metric."""
    diff = {k: (round(report[k] - other[k], 4) if report.get(k) is not None and other.get(k) is not None
                else None) for k in COMPARED}
    return {"report": name, "victim": other.get("victim", {}).get("name"),
            "other": {k: other.get(k) for k in COMPARED}, "difference": diff}


def markdown(report: dict) -> str:
    v = report["victim"]
    worst = report.get("worst_case") or {}
    attacks = report.get("attacks") or {}
    lines = [f"# Stealing {v['name']} v{v['version']} ({v['teacher'] or 'unknown'} teacher, output defense "
             f"{v['output_defense']['name']})", "",
             f"{report['queries_used']} queries, student `{report['settings']['student']}`, "
             f"{len(attacks)} attack(s); shared queries stopped: {report['stop_reason']}.", ""]
    if worst:
        lines += [f"Worst case: **{worst['attack']}**, student accuracy {worst['student_accuracy']} "
                  f"(agreement {worst['agreement']}). The figures below the attacks are the worst case's.", ""]
    if attacks:
        order = sorted(attacks, key=lambda k: (-(attacks[k]["student_accuracy"] or 0), -(attacks[k]["agreement"] or 0)))
        lines += ["| attack | student accuracy | agreement | KL(victim \\|\\| student) | queries used | seconds |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k in order:
            r = attacks[k]
            mark = " (worst case)" if k == worst.get("attack") else ""
            lines.append(f"| {k}{mark} | {r['student_accuracy']} | {r['agreement']} | {r['kl']} | "
                         f"{r['queries_used']} | {r['seconds']} |")
        lines.append("")
    cmp = report.get("compared_with")
    header = "| metric | this run |" + (f" {cmp['victim']} | difference |" if cmp else "")
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for k in COMPARED + ("chance", "eval_queries", "wall_seconds"):
        row = f"| {k} | {report.get(k)} |"
        if cmp:
            row += f" {cmp['other'].get(k, '')} | {cmp['difference'].get(k, '')} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line

def build_parser() -> Parser:
    p = Parser(prog="astguard-steal", description=__doc__.split("\n\n")[0],
               epilog="\n".join([ATTACKS.help(), LABEL_MODES.help(), MODELS.help("students"),
                                  "query sets: digits, cifar10, cifar100, an ImageFolder dir/.zip (NAME[:SPLIT]), or "
                                  "noise"]), formatter_class=argparse.RawTextHelpFormatter)
    add_options(p, StealConfig)
    return p


def validate(cfg: StealConfig) -> StealConfig:
    """The config with its environment and derived defaults filled in; StealError names a bad option."""
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get("ASTGUARD_API_KEY"),
                  cache_dir=cfg.cache_dir or cfg.out.parent / ".cache" / "data",
                  attacks=tuple(attack_names(cfg.attack)) if cfg.attack else (cfg.label_mode,))
    checks = [
        (cfg.budget >= 1, f"--budget must be at least 1, got {cfg.budget}"),
        (cfg.student in MODELS, f"unknown --student {cfg.student!r}; known: {', '.join(sorted(MODELS))}"),
        (cfg.temperature > 0, "--temperature must be positive"),
        (0 <= cfg.alpha <= 1, "--alpha must be in [0, 1]"),
        (cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.lr > 0, "--epochs, --batch-size, --lr must be positive"),
        (cfg.images_per_request >= 1 and cfg.concurrency >= 1, "--images-per-request, --concurrency >= 1"),
        (not (cfg.reuse and cfg.resume), "--reuse and --resume exclude each other"),
        (cfg.compare is None or cfg.compare.is_file(), f"--compare: no file {cfg.compare}"),
        (cfg.url.startswith(("http://", "https://")), f"--url must start with http:// or https://: {cfg.url}"),
    ]
    for ok, message in checks:
        if not ok:
            raise StealError(message)
    for spec in (cfg.queries if cfg.queries != NOISE else None, cfg.eval):
        if spec:
            parse_spec(spec)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = from_args(StealConfig, build_parser().parse_args(argv))
    try:
        report = attack(validate(cfg))
    except StealError as e:
        print(f"astguard-steal: error: {e}", file=sys.stderr)
        return e.code
    except (DataError, ValueError) as e:
        print(f"astguard-steal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"astguard-steal: interrupted; answers so far are in {cfg.out / TRANSFER}: rerun with --resume",
              file=sys.stderr)
        return 130
    print(json.dumps({k: report[k] for k in ("victim_accuracy", "student_accuracy", "agreement", "kl",
                                             "reference_accuracy", "queries_used", "stop_reason", "images_per_s")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
