"""The evaluation: train the comparison teachers and their students, and report what each defense costs the
teacher and what it costs a thief, in the shape of the paper's tables.

    python -m evaluation --dataset digits --scale smoke --out results/digits-smoke
    python -m evaluation --dataset ../shared/data/cifar10-jpeg.zip --scale cpu --seeds 2 \\
        --out results/cifar10-cpu

Two protocols, both reported for every teacher and student:
- `paper`: knowledge distillation on the teacher's own training set, with the true labels, from the teacher's
  logits (white-box): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
- `query`: no labels; the student fits the probabilities the served (ONNX) teacher returns for a query set
  held out from the teacher's training data, through the attacker library (clients.attack) as clients/steal.py
  does. `--url` adds a live endpoint.
Stingy Teacher (`st`) is the base network with its top-k logits kept (paper) or the service's top-k defense
(query); any other output defense is a query-protocol row on the base network. Every teacher, adversarial set and
student is cached under --work-dir by its settings: an interrupted or extended evaluation redoes nothing. Students
of one network and seed train in lockstep on the same batches and share the teacher's forward pass
(training.loop.fit_group); each ends as if trained alone.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from astguard.card import CardError
from astguard.cli import Parser, add_options, from_args
from clients.attack.answers import TransferSet, buy_cached, digest
from clients.attack.attacks import ATTACKS, Setting, attack_names, attack_settings, run_attack, worst_case
from clients.attack.queries import plan_queries
from clients.attack.student import StudentSpec, distillation
from clients.attack.victim import OnnxVictim, answers, open_endpoint
from clients.client import AstguardError
from evaluation.config import (ENDPOINT, PROTOCOLS, SCALES, EvalConfig, Row, build_rows, default_preset,
                               kd_temperature)
from evaluation.jobs import fan_out
from evaluation.stats import answer_statistics, entropy, entropy_histogram, over_seeds
from service.defenses import DEFENSES
from service.runtime import StartupError
from training.config import Config, make_config, validate
from training.data import DataError, Dataset, Split, load_dataset
from training.distill import LABEL_MODES, kd_recipe, student_targets
from training.export import ExportError
from training.files import exclusive, savez_atomic, write_atomic
from training.loop import Member, RunError, fit_group, predict_logits, resolve_device
from training.losses import sparse_topk_logits, top_k_from_ratio
from training.models import MODELS, create_model
from training.pgd import pgd_linf
from training.robustness import robust_setting
from training.teachers import TEACHERS, Context
from training.train_ast import BASE_FIELDS, load_data, load_trained, run, stage_settings


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def endpoint_answers(url: str, api_key: str | None, sets: dict[str, torch.Tensor], classes: int, cache: Path
                     ) -> dict:
    """The live service's probabilities for each image set, bought through the attacker library and kept in
    `cache` (answers are paid for: a rerun asks only for what is missing)."""
    async def go() -> dict:
        async with open_endpoint(url, api_key, images_per_request=32, concurrency=4, retries=5) as victim:
            card = victim.card
            out = {"card": card, "defense": victim.defense}
            for name, images in sets.items():
                shape = (card.input.channels, card.input.height, card.input.width)
                if tuple(images.shape[1:]) != shape or card.num_classes != classes:
                    raise RunError(f"--url serves {card.name} with input {list(shape)} and {card.num_classes} "
                                   f"classes, but the evaluation has images {list(images.shape[1:])} and {classes} "
                                   "classes: evaluate it on its own data set")
                tag = digest(images)
                path = cache / f"{name}-{card.sha256[:12]}-{tag}.npz"
                legacy = path.with_suffix(".npy")  # where answers bought before 2026-12-02 were kept
                if legacy.exists() and not path.exists():
                    savez_atomic(path, probs=np.load(legacy), sha256=np.asarray(card.sha256), spec=np.asarray(tag))
                probs = await buy_cached(victim, images, path, tag)
                if torch.from_numpy(probs).isnan().any():
                    answered = int((~torch.from_numpy(probs).isnan().any(1)).sum())
                    raise RunError(f"--url stopped answering (budget spent?) after {answered} of {len(images)} "
                                   f"{name} images; the answers so far are kept in {path}")
                out[name] = torch.from_numpy(probs)
            return out

    try:
        return asyncio.run(go())
    except AstguardError as e:
        raise RunError(f"--url {url}: {e}") from None
    except CardError as e:
        raise RunError(f"--url {url}: the server's model card is not valid: {e}") from None


# ---------------------------------------------------------------- one seed

class Evaluation:
    """Everything one invocation needs; `seed_results(seed)` does the work for one seed."""

    def __init__(self, cfg: EvalConfig):
        cfg.check()
        self.eval_cfg = cfg
        self.scale = SCALES[cfg.scale]
        self.work: Path = cfg.work_dir
        self.cache = self.work / ".cache"
        self.device = resolve_device(cfg.device)
        try:  # fail before training, not after
            import matplotlib  # noqa: F401
            if "query" in cfg.protocols:
                import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RunError(f"the evaluation needs {e.name}: pip install -e \".[eval,serve]\" (or [eval,gpu])") from None
        if cfg.out.exists() and not cfg.out.is_dir():
            raise RunError(f"--out {cfg.out} is a file, not a folder")
        self.full = load_dataset(cfg.dataset, cfg.data_root, self.cache / "data")
        preset = cfg.preset or default_preset(self.full)
        teacher_overrides = {**self.scale.teacher, **dict(cfg.set)}
        self.cfg = make_config(preset, dataset=cfg.dataset, data_root=cfg.data_root, **teacher_overrides)
        if self.cfg.ood is None:  # InI's OOD images: TinyImageNet is not here; noise on digits, upscaled digits else
            self.cfg = replace(self.cfg, ood="noise" if self.full.name == "digits" else "digits")
        validate(self.cfg)
        self.top_k = self.cfg.top_k or top_k_from_ratio(self.cfg.sparse_ratio, self.full.num_classes)
        self.rows = build_rows(cfg.teachers, cfg.sweep, self.top_k)
        if cfg.url:
            self.rows.append(Row(ENDPOINT, ENDPOINT))
        self.kd_t = cfg.kd_temperature or kd_temperature(self.full.num_classes)
        self.kd_alpha = cfg.kd_alpha
        self.student_epochs = cfg.student_epochs or self.scale.student_epochs or self.cfg.epochs
        for arch in cfg.students:
            if arch not in MODELS:
                raise ValueError(f"unknown student {arch!r}; known: {', '.join(sorted(MODELS))}")
        self._queries: dict[int, Split] = {}
        self._data: dict[int, Dataset] = {}
        self._networks: dict[int, dict[tuple, dict]] = {}  # teacher seed -> (network, overrides) -> network()
        self._cells: dict[int, dict] = {}  # teacher seed -> the teachers' own cells (accuracy, statistics...)
        if "query" in cfg.protocols:
            self.query_set(cfg.seeds[0])  # fails now, not after the teachers, when there is no held-out data
        elif cfg.url:
            raise ValueError("--url is evaluated with the query protocol; add query to --protocols")
        else:
            served = [r.name for r in self.rows if r.kind == "serving-time defense"]
            if served:
                raise ValueError(f"--teachers {served[0]} is a serving-time defense, evaluated with the query "
                                 "protocol; add query to --protocols")
        self.attacks = attack_names(cfg.attacks, allow_none=True) if "query" in cfg.protocols else []
        for name in self.scale.attacks:  # a scale's attack parameters fail now, not after training
            try:
                self.attack_params(name)
            except ValueError as e:
                raise ValueError(f"scale {cfg.scale}: {e}") from None
        self.trained = {"teacher_epochs": 0, "student_epochs": 0, "attacks": 0}
        self.seconds = {"teachers": 0.0, "paper_students": 0.0, "query_students": 0.0, "attacks": 0.0}

    # -- configurations
    def teacher_cfg(self, row: Row, seed: int) -> Config:
        """The row's network's training: the scale and preset, the scale's reduction of its recipe (which keeps the
        shared base as it is), then the row's own overrides."""
        given = dict(self.eval_cfg.set)  # --set beats the scale, its reductions included
        reduced = {k: v for k, v in self.scale.recipes.get(row.network, {}).items() if k not in given}
        if reduced and self.cfg.base_epochs is None:  # the shared base keeps the scale's epochs and rate
            reduced["base_epochs"] = self.cfg.epochs
        if reduced.get("lr", self.cfg.lr) != self.cfg.lr and self.cfg.base_lr is None:
            reduced["base_lr"] = self.cfg.lr
        return replace(self.cfg, seed=seed, teacher=row.network, **{**reduced, **dict(row.overrides)})

    def recipe_settings(self, row: Row) -> dict:
        """Where a row's network trains otherwise than the scale's teachers (its reduction, its variant's fields)."""
        own, shared = self.teacher_cfg(row, self.teacher_seed(self.eval_cfg.seeds[0])).to_dict(), self.cfg.to_dict()
        return {k: v for k, v in own.items() if k not in ("seed", "teacher") and v != shared[k]}

    def student_cfg(self, arch: str, seed: int) -> Config:
        return replace(self.cfg, seed=seed, arch=arch, epochs=self.student_epochs, base_epochs=None,
                       **self.scale.student)

    def teacher_seed(self, seed: int) -> int:
        """The seed of the teachers (and of their training subset) that the students of `seed` learn from."""
        return seed if self.eval_cfg.teacher_seed is None else self.eval_cfg.teacher_seed

    def network_dir(self, cfg: Config, data: Dataset) -> tuple[Path, Path]:
        top_k = cfg.top_k or top_k_from_ratio(cfg.sparse_ratio, data.num_classes)
        base = stage_settings(cfg, "base", cfg.base_epochs or cfg.epochs, top_k)
        own = stage_settings(cfg, cfg.teacher, cfg.epochs, top_k)
        return (self.work / "teachers" / f"{cfg.teacher}-{settings_hash(own)}",
                self.work / "teachers" / f"base-{settings_hash(base)}")

    # -- teachers
    def network(self, cfg: Config, data: Dataset) -> dict:
        out, base_dir = self.network_dir(cfg, data)
        if cfg.teacher == "base":
            out = base_dir / "served"  # the base is exported beside itself: one network, one directory

        def count(stage, epoch, row):
            self.trained["teacher_epochs"] += 1

        t0 = time.time()
        name = (base_dir if cfg.teacher == "base" else out).name  # the card's model name: the folder's
        summary = run(cfg, out, device=str(self.device), cache_dir=self.cache, resume=True, base_dir=base_dir,
                      name=name, progress=self.eval_cfg.progress, on_epoch_end=count)
        self.seconds["teachers"] += time.time() - t0
        summary["model"] = load_trained(cfg, data, Path(summary["checkpoint"]), self.device)
        summary["key"] = name  # its settings' hash: what its students' caches depend on (an ONNX file's bytes
        return summary         # may differ between exports of the same weights)

    # -- students
    def _student_done(self, out: Path, settings: dict) -> dict | None:
        path = out / "metrics.json"
        if path.exists():
            metrics = json.loads(path.read_text())
            if metrics.get("settings") == settings:
                return metrics
        return None

    def _finish_student(self, member: Member, settings: dict) -> dict:
        h = member.history
        metrics = {"test_accuracy": h[-1]["test_accuracy"], "train_accuracy": h[-1]["train_accuracy"],
                   "epochs": len(h), "train_seconds": round(sum(r["seconds"] for r in h), 2), "settings": settings}
        (member.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    def train_students(self, jobs: list[tuple[str, str, object, dict]], train: Split, test: Split, seed: int,
                       data: Dataset, *, target: torch.Tensor | None = None, prepare=None,
                       kind: str) -> dict[str, dict]:
        """jobs: (key, arch, recipe, settings). Finished ones are read back; the rest train in one lockstep group."""
        outs = [self.work / "students" / f"{arch}-{settings_hash(settings)}" for _, arch, _, settings in jobs]
        with ExitStack() as locks:
            # Two groups may hold the same student (a sweep value equal to the default): under --jobs they take
            # turns, locking in path order so that neither waits for the other, and the second reads it back.
            for out in sorted(set(outs)):
                locks.enter_context(exclusive(out.with_name(out.name + ".lock")))
            results, members = {}, []
            for (key, arch, recipe, settings), out in zip(jobs, outs):
                done = self._student_done(out, settings)
                if done is not None:
                    results[key] = done
                    continue
                cfg = self.student_cfg(arch, seed)
                torch.manual_seed(cfg.seed)
                model = create_model(arch, data.num_classes, data.in_channels, data.image_size, data.mean,
                                     data.std).to(self.device)

                def count(epoch, row):
                    self.trained["student_epochs"] += 1
                members.append((key, Member(model, recipe, Context(cfg, 0), out, settings, count), settings))
            if members:
                t0 = time.time()
                fit_group([m for _, m, _ in members], train, test, epochs=self.student_epochs, device=self.device,
                          target=target, prepare=prepare, resume=True, progress=self.eval_cfg.progress)
                self.seconds[kind] += time.time() - t0
                for key, member, settings in members:
                    results[key] = self._finish_student(member, settings)
        return results

    def student_settings(self, arch: str, seed: int, protocol: str, source: dict) -> dict:
        d = self.student_cfg(arch, seed).to_dict()
        return {**{k: d[k] for k in BASE_FIELDS}, "limit_test": d["limit_test"], "epochs": self.student_epochs,
                "data_seed": self.teacher_seed(seed),
                "protocol": protocol, **source}

    # -- answers
    def served(self, row: Row, net) -> OnnxVictim:
        """What the service would serve for the row: its network's ONNX export in onnxruntime, behind the row's
        output defense, with the other models that defense reads (trained beside it)."""
        return OnnxVictim(net(row)["onnx"], defense=row.defense or "none", params=dict(row.defense_params),
                          models={m: net(Row(m, m))["onnx"] for m in row.models},
                          device="cpu" if self.device.type == "cpu" else str(self.device))

    def served_answers(self, row: Row, net, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(answers(self.served(row, net), images))

    def query_set(self, seed: int) -> Split:
        if seed not in self._queries:  # asked for at start-up, per seed and for the report: drawn once
            self._queries[seed] = self._draw_queries(seed)
        return self._queries[seed]

    def _draw_queries(self, seed: int) -> Split:
        """The thief holds the training images the teacher did not see; it queries a class-balanced subset."""
        held = self.full.held_out(self.cfg.limit_train, seed)
        if len(held.labels) == 0:
            raise RunError("the query protocol needs training images the teacher did not see, and this scale "
                           "trains it on all of them: pass --protocols paper, or a --set limit_train=N")
        n = min(self.scale.query_size or len(held.labels), len(held.labels))
        _, c, h, w = held.images.shape
        return Split(*plan_queries(held, n, channels=c, size=(h, w), seed=seed, balanced=True))

    # -- one seed, every table cell
    def groups(self) -> list[tuple[str, str, Row | None]]:
        """The student groups of one seed, (name, protocol, teacher row); each trains in lockstep and depends only
        on finished teachers. A network's paper-protocol students (e.g. base and st's) form one group."""
        out = [("alone", "alone", None)]
        if "query" in self.eval_cfg.protocols:
            out.append(("reference", "reference", None))
        if "paper" in self.eval_cfg.protocols:
            firsts = {}
            for r in self.rows:  # an endpoint or a serving-time defense has no logits: no paper protocol for them
                if r.white_box:
                    firsts.setdefault((r.network, r.overrides), r)
            out += [(f"paper {r.name}", "paper", r) for r in firsts.values()]
        if "query" in self.eval_cfg.protocols:
            out += [(f"query {r.name}", "query", r) for r in self.rows]
        return out

    def served_endpoint(self, seed: int, test: Split) -> dict:
        return endpoint_answers(self.eval_cfg.url, self.eval_cfg.api_key, {"queries": self.query_set(seed).images,
                                                                   "test": test.images},
                                len(self.full.classes), self.work / "endpoint")

    def seed_results(self, seed: int, only: str | None = None) -> dict:
        """Every table cell of student seed `seed`. `only` names one of groups() (an --jobs worker): that group's
        students are trained, with the teachers they need, and nothing else is computed."""
        student_seed, seed = seed, self.teacher_seed(seed)  # below, `seed` is the teachers' and the data's
        data = self.data(seed)
        networks = self._networks.setdefault(seed, {})  # kept: a worker's next job may need them again

        def net(row: Row) -> dict:  # trained, or read back, on first use
            key = (row.network, row.overrides)
            if key not in networks:
                networks[key] = self.network(self.teacher_cfg(row, seed), data)
            return networks[key]

        answers = {}

        def served() -> dict:  # the live service's answers, bought (or read back) on first use
            if not answers:
                answers.update(self.served_endpoint(seed, data.test))
            return answers
        res = {"teachers": {}, "statistics": {}, "students": {p: {} for p in PROTOCOLS}, "histograms": {},
               "attacks": {}, "robust": {}, "latency_ms": {}}
        if only is None:  # the teachers' cells once per teacher seed; the latencies once, in the first seed's pass
            if seed not in self._cells:
                self._cells[seed] = {k: {} for k in ("teachers", "statistics", "histograms", "robust", "latency_ms")}
                self.teacher_cells(self._cells[seed], data.test, net, served,
                                   latency=student_seed == self.eval_cfg.seeds[0])
            res.update({k: dict(v) for k, v in self._cells[seed].items() if k != "latency_ms"})
            if student_seed == self.eval_cfg.seeds[0]:
                res["latency_ms"] = dict(self._cells[seed]["latency_ms"])
        for name, protocol, row in self.groups():
            if only is None or name == only:
                self.train_group(res, protocol, row, student_seed, seed, data, net, served)
        if only is None and student_seed == self.eval_cfg.seeds[0]:
            res["examples"] = self.examples(networks, data)
        return res

    def teacher_cells(self, res: dict, test: Split, net, served, latency: bool = True) -> None:
        for row in self.rows:
            if row.network == ENDPOINT:  # probabilities only: softmax(log p / T) is the teacher at T
                answers = served()["test"]
                top1, probs = answers.argmax(1), student_targets(answers, "logit", self.kd_t)
            elif row.kind == "serving-time defense":
                # The accuracy a user gets: the served answer's top class. A defense that keeps the top-1 gives the
                # network's own; one that does not (misinformation) is charged for every label it changes.
                served_probs = self.served_answers(row, net, test.images)
                top1 = served_probs.argmax(1)
                probs = student_targets(served_probs, "logit", self.kd_t)
            else:
                logits = predict_logits(net(row)["model"], test.images, self.device, self.cfg.eval_batch_size)
                shown = sparse_topk_logits(logits, row.top_k) if row.top_k else logits
                top1, probs = logits.argmax(1), torch.softmax(shown / self.kd_t, dim=1)
            res["teachers"][row.name] = float((top1 == test.labels).float().mean())
            # Robustness is the network's (measured in training, in its card); an output defense leaves it alone.
            card = served()["card"] if row.network == ENDPOINT else None
            res["robust"][row.name] = card.robustness.get("accuracy") if card else net(row)["robust_accuracy"]
            res["statistics"][row.name] = answer_statistics(probs, test.labels)
            res["histograms"][row.name] = entropy_histogram(probs)
        if latency and "query" in self.eval_cfg.protocols:
            res["latency_ms"] = self.latencies(net, test.images)

    def latencies(self, net, images: torch.Tensor, calls: int = 60) -> dict[str, float]:
        """Each served row's median milliseconds to answer one image in onnxruntime behind its output defense (no
        HTTP), the rows measured in turn so that a slower spell of the machine falls on all of them alike."""
        victims = {r.name: self.served(r, net) for r in self.rows if r.network != ENDPOINT}
        times: dict[str, list[float]] = {name: [] for name in victims}
        for i in range(calls + 5):
            one = images[i % len(images)][None]
            for name, victim in victims.items():
                t0 = time.perf_counter()
                answers(victim, one)
                if i >= 5:  # the first calls warm the session up
                    times[name].append((time.perf_counter() - t0) * 1000)
        return {name: float(np.median(t)) for name, t in times.items()}

    def train_group(self, res: dict, protocol: str, row: Row | None, student_seed: int, seed: int, data: Dataset,
                    net, served) -> None:
        ec, test = self.eval_cfg, data.test
        if protocol == "alone":  # students trained alone: the reference each student's change is measured from
            source = {"paper_size": self.scale.paper_size} if self.scale.paper_size else {}
            alone = [(arch, arch, TEACHERS["base"], self.student_settings(arch, student_seed, "alone", source))
                     for arch in ec.students]
            done = self.train_students(alone, self.paper_train(data, seed), test, student_seed, data,
                                       kind="paper_students")
            res["students"]["alone"] = {k: v["test_accuracy"] for k, v in done.items()}
        elif protocol == "reference":  # the thief's own queries with their true labels: what it would not steal
            queries = self.query_set(seed)
            jobs = [(arch, arch, TEACHERS["base"],
                     self.student_settings(arch, student_seed, "reference", {"queries": len(queries.labels)}))
                    for arch in ec.students]
            done = self.train_students(jobs, queries, test, student_seed, data, kind="query_students")
            res["students"]["reference"] = {k: v["test_accuracy"] for k, v in done.items()}
        elif protocol == "paper":
            teacher = net(row)
            jobs = []
            for r in self.rows:
                if r.white_box and (r.network, r.overrides) == (row.network, row.overrides):
                    source = {"teacher": teacher["key"], "top_k": r.top_k, "kd_temperature": self.kd_t,
                              "kd_alpha": self.kd_alpha}
                    if self.scale.paper_size:
                        source["paper_size"] = self.scale.paper_size
                    for arch in ec.students:
                        jobs.append(((r.name, arch), arch, kd_recipe(self.kd_t, self.kd_alpha, r.top_k),
                                     self.student_settings(arch, student_seed, "paper", source)))

            @torch.no_grad()
            def prepare(batch, model=teacher["model"]):
                return batch._replace(target=model(batch.x).float())

            done = self.train_students(jobs, self.paper_train(data, seed), test, student_seed, data,
                                       prepare=prepare, kind="paper_students")
            for (name, arch), m in done.items():
                res["students"]["paper"].setdefault(name, {})[arch] = m["test_accuracy"]
        else:
            queries = self.query_set(seed)
            if row.network == ENDPOINT:
                probs, sha = served()["queries"], served()["card"].sha256
            else:
                teacher = net(row)
                probs, sha = self.served_answers(row, net, queries.images), teacher["key"]
            source = {"teacher": sha, "top_k": row.top_k, "label_mode": ec.label_mode,
                      "kd_temperature": self.kd_t, "queries": len(queries.labels)}
            if row.kind == "serving-time defense":  # the defense is part of what the students learn from
                source["defense"] = [row.defense, dict(row.defense_params)]
                if row.models:
                    source["models"] = {m: net(Row(m, m))["key"] for m in row.models}
            recipe, targets, top1 = distillation(probs, None, mode=ec.label_mode, temperature=self.kd_t)
            jobs = [(arch, arch, recipe, self.student_settings(arch, student_seed, "query", source))
                    for arch in ec.students]
            done = self.train_students(jobs, Split(queries.images, top1), test, student_seed, data,
                                       target=targets, kind="query_students")
            res["students"]["query"][row.name] = {k: v["test_accuracy"] for k, v in done.items()}
            if self.attacks:
                res["attacks"][row.name], raced = self.attack_row(row, queries, probs, source, student_seed, data,
                                                                  net, served)
                if any(raced.values()):
                    res.setdefault("raced", {})[row.name] = raced

    # -- the attack suite (query protocol)
    def attack_params(self, name: str) -> dict:
        """An attack's parameters: its defaults, and the scale's overrides (a reduced recovery...)."""
        return attack_settings(name, self.scale.attacks.get(name, {}))

    def attack_place(self, arch: str, name: str, student_seed: int, source: dict) -> tuple[dict, Path, Path]:
        """An attack's settings (as JSON stores them, so that the key read back compares equal), its result's folder
        under work/attacks, and where answers that do not depend on the student are kept (bought once for every
        student)."""
        settings = json.loads(json.dumps({**self.student_settings(arch, student_seed, "attack", source),
                                          "attack": name, "attack_params": self.attack_params(name)}))
        bought = {k: v for k, v in settings.items() if k not in ("arch",)}
        return (settings, self.work / "attacks" / f"{arch}-{name}-{settings_hash(settings)}",
                self.work / "attacks" / "answers" / f"{name}-{settings_hash(bought)}")

    def attack_done(self, arch: str, name: str, student_seed: int, source: dict) -> dict | None:
        settings, folder, _ = self.attack_place(arch, name, student_seed, source)
        done = folder / "result.json"
        if done.exists():
            saved = json.loads(done.read_text())
            if saved.get("key") == settings:
                return saved["result"]
        return None

    def race(self, arch: str, student_seed: int, source: dict) -> tuple[list[str], list[str]]:
        """The attacks a student seed runs, and those it leaves out: with the scale's `race` margin, a seed after the
        first runs only the attacks whose student came within `race` points of the row's worst case on the first
        seed (the same teachers and queries: --teacher-seed); every attack where the first seed's results are not
        all there."""
        first = self.eval_cfg.seeds[0]
        if self.scale.race is None or student_seed == first or self.eval_cfg.teacher_seed is None:
            return self.attacks, []
        firsts = {n: self.attack_done(arch, n, first, source) for n in self.attacks}
        if any(r is None or r.get("student_accuracy") is None for r in firsts.values()):
            return self.attacks, []
        best = max(r["student_accuracy"] for r in firsts.values())
        keep = [n for n in self.attacks if firsts[n]["student_accuracy"] >= best - self.scale.race / 100]
        return keep, [n for n in self.attacks if n not in keep]

    def attack_row(self, row: Row, queries: Split, probs: torch.Tensor, source: dict, student_seed: int,
                   data: Dataset, net, served) -> tuple[dict, dict]:
        """Every attack of --attacks against one row, for every student: {arch: {attack: result}}, and the attacks
        this seed left out ({arch: [names]}, see `race`). Each result is kept in its folder under work/attacks by
        its settings; answers an attack buys itself are kept there too."""
        if row.network == ENDPOINT:
            card, defense, test_answers = served()["card"], served()["defense"], served()["test"].numpy()
            url, key = self.eval_cfg.url, self.eval_cfg.api_key

            def ask(images, answers):  # a live service: every answer is paid for, and kept by the attack
                async def go():
                    async with open_endpoint(url, key, images_per_request=32, concurrency=4, retries=5) as v:
                        return await v.answer(images, answers)
                return asyncio.run(go())
        else:
            victim = self.served(row, net)
            card, defense = victim.card, victim.defense
            test_answers = answers(victim, data.test.images)

            def ask(images, answers_):
                return asyncio.run(victim.answer(images, answers_))
        transfer = TransferSet(queries.images, queries.labels, probs.numpy().astype(np.float32), {})
        out, raced = {}, {}
        for arch in self.eval_cfg.students:
            cfg = self.student_cfg(arch, student_seed)
            # The query students' own configuration and normalisation: the label-mode attack is their twin.
            spec = StudentSpec(arch, cfg.epochs, cfg.lr, cfg.batch_size, cfg.crop_pad, cfg.flip, cfg.seed, base=cfg,
                               mean=tuple(data.mean), std=tuple(data.std))
            out[arch] = {}
            names, raced[arch] = self.race(arch, student_seed, source)
            for name in names:
                settings, folder, answers_dir = self.attack_place(arch, name, student_seed, source)
                with exclusive(folder.with_name(folder.name + ".lock")):
                    result = self.attack_done(arch, name, student_seed, source)
                    if result is None:
                        t0 = time.time()
                        setting = Setting(card, defense, ask, transfer, data.test, test_answers, spec, folder,
                                          self.device, temperature=self.kd_t, progress=self.eval_cfg.progress,
                                          seed=cfg.seed, answers_dir=answers_dir)
                        try:
                            with exclusive(answers_dir.with_name(answers_dir.name + ".lock")):
                                result = run_attack(name, setting, **self.attack_params(name))
                        except AstguardError as e:
                            raise RunError(f"--url {self.eval_cfg.url}, during the {name} attack: {e}") from None
                        self.seconds["attacks"] += time.time() - t0
                        self.trained["attacks"] += 1
                        record = {"key": settings, "result": result}
                        write_atomic(folder / "result.json",
                                     lambda tmp: tmp.write_text(json.dumps(record, indent=1, default=str) + "\n"))
                out[arch][name] = result
        return out, raced

    def paper_train(self, data: Dataset, seed: int) -> Split:
        """What the paper protocol's students (and those alone) train on: the teacher's training images, or the
        scale's class-balanced subset of them."""
        return data.limit_train(self.scale.paper_size, seed).train

    def data(self, seed: int) -> Dataset:
        """The data set as the teachers of `seed` see it (their training subset)."""
        if seed not in self._data:
            self._data[seed] = load_data(replace(self.cfg, seed=seed), self.cache)
        return self._data[seed]

    def train_network(self, seed: int, row: Row) -> None:
        """One teacher network of teacher seed `seed`, trained (an --jobs worker's job)."""
        key = (row.network, row.overrides)
        self._networks.setdefault(seed, {})[key] = self.network(self.teacher_cfg(row, seed), self.data(seed))

    def waves(self) -> list[list[tuple[int, str]]]:
        """--jobs: the evaluation as independent jobs (seed, name), in waves that need only earlier waves: the
        base networks, the other teacher networks (which share their base), then every seed's student groups (with
        a race, the later seeds' query groups in a last wave: their suites read the first seed's results)."""
        seeds = list(dict.fromkeys(self.teacher_seed(s) for s in self.eval_cfg.seeds))
        networks = {(r.network, r.overrides): r for r in self.rows if r.network not in (ENDPOINT, "base")}
        models = dict.fromkeys(m for r in self.rows for m in r.models)  # the models defenses read, trained beside
        # The longest jobs first, so that no worker idles at a wave's end: the query groups (with the attack suite).
        groups = sorted(self.groups(), key=lambda g: g[1] != "query")
        students = [(s, name) for name, _, _ in groups for s in self.eval_cfg.seeds]
        waves = [[(s, "network base") for s in seeds],
                 [(s, f"network {r.name}") for s in seeds for r in networks.values()]
                 + [(s, f"model {m}") for s in seeds for m in models]]
        if self.scale.race is not None and self.attacks and self.eval_cfg.teacher_seed is not None:
            # A race: the later seeds' attack suites read the first seed's, so they run in a wave after it.
            first = self.eval_cfg.seeds[0]
            later = {name for name, protocol, _ in groups if protocol == "query"}
            waves += [[(s, n) for s, n in students if s == first or n not in later],
                      [(s, n) for s, n in students if s != first and n in later]]
        else:
            waves.append(students)
        return [w for w in waves if w]

    def run_job(self, seed: int, name: str) -> None:
        kind, _, which = name.partition(" ")
        if kind == "network":
            self.train_network(seed, next((r for r in self.rows if r.name == which), Row("base", "base")))
        elif kind == "model":
            self.train_network(seed, Row(which, which))
        else:
            self.seed_results(seed, only=name)

    def examples(self, networks: dict, data: Dataset, n: int = 4) -> dict:
        """The paper's Fig. 2: answers at temperature T to a few test images (one per class), base also on its
        own PGD image, with their entropies."""
        test = data.test
        idx = [int(torch.nonzero(test.labels == c)[0]) for c in range(min(n, data.num_classes))]
        x = test.images[idx].float().div(255).to(self.device)
        y = test.labels[idx].to(self.device)
        shown = {}
        base = networks.get(("base", ()))
        if base is not None:
            c = self.cfg
            x_adv = pgd_linf(base["model"], x, y, eps=c.pgd_eps, step=c.pgd_step, steps=c.pgd_steps)
            with torch.no_grad():
                shown["base"] = base["model"](x)
                shown["base on its PGD image"] = base["model"](x_adv)
        for (network, overrides), net in networks.items():
            if network != "base" and not overrides and TEACHERS[network].row:
                with torch.no_grad():
                    shown[network] = net["model"](x)
        out = {"indices": idx, "labels": [int(v) for v in y], "class_names": data.classes,
               "temperature": self.kd_t, "answers": {}}
        for name, logits in shown.items():
            p = torch.softmax(logits.float().cpu() / self.kd_t, dim=1)
            out["answers"][name] = {"probs": p.tolist(), "entropy": entropy(p).tolist()}
        return out


# ---------------------------------------------------------------- over seeds

def aggregate(per_seed: list[dict], rows: list[Row], students: list[str], protocols: list[str]) -> dict:
    def cell(get):
        return over_seeds([get(r) for r in per_seed])

    def diff(get):  # a difference taken seed by seed: its paired interval says whether it is real
        return over_seeds([get(r) for r in per_seed], difference=True)

    teachers = {}
    base_name = next((r.name for r in rows if r.kind == "teacher" and r.network == "base"), None)
    for row in rows:
        t = {"accuracy": cell(lambda r: r["teachers"][row.name])}
        if all(r.get("robust", {}).get(row.name) is not None for r in per_seed):
            t["robust_accuracy"] = cell(lambda r: r["robust"][row.name])
        if base_name:
            t["change_from_base"] = diff(lambda r: r["teachers"][row.name] - r["teachers"][base_name])
        teachers[row.name] = t
    out = {"teachers": teachers,
           "students": {"alone": {a: cell(lambda r: r["students"]["alone"][a]) for a in students}},
           "statistics": {}}
    if "reference" in per_seed[0]["students"]:
        out["students"]["reference"] = {a: cell(lambda r: r["students"]["reference"][a]) for a in students}
    for p in protocols:
        out["students"][p] = {}
        for row in rows:
            if row.name not in per_seed[0]["students"][p]:
                continue
            out["students"][p][row.name] = {}
            for a in students:
                c = {"accuracy": cell(lambda r: r["students"][p][row.name][a]),
                     "change_from_alone": diff(lambda r: r["students"][p][row.name][a] - r["students"]["alone"][a])}
                if base_name in per_seed[0]["students"][p]:  # paired: the same student seed against both teachers
                    c["change_from_base"] = diff(lambda r: r["students"][p][row.name][a]
                                                 - r["students"][p][base_name][a])
                out["students"][p][row.name][a] = c
    if per_seed[0].get("latency_ms"):  # measured once, by the sequential pass of the first seed
        out["latency_ms"] = per_seed[0]["latency_ms"]
    attacked = [row for row in rows if row.name in per_seed[0].get("attacks", {})]
    if attacked:
        out["attacks"], out["worst_case"], out["resistance"] = {}, {}, {}
        for row in attacked:
            # An attack raced out after the first seed (Scale.race) is summarised over the seeds that ran it.
            def ran(get, a, name):
                c = over_seeds([get(r["attacks"][row.name][a][name]) for r in per_seed
                                if name in r["attacks"][row.name][a]])
                return c if len(c["values"]) == len(per_seed) else {**c, "raced_out": True}
            table = {a: {name: {"accuracy": ran(lambda x: x["student_accuracy"], a, name),
                                "agreement": ran(lambda x: x["agreement"], a, name)}
                         for name in per_seed[0]["attacks"][row.name][a]} for a in students}
            out["attacks"][row.name] = table
            out["worst_case"][row.name] = {a: _worst_over_seeds(per_seed, row.name, a) for a in students}
            for a in students:  # some seed judged the row by fewer attacks than the first: say so where it is printed
                left_out = sorted({n for r in per_seed for n in r.get("raced", {}).get(row.name, {}).get(a, [])})
                if left_out:
                    out["worst_case"][row.name][a]["raced_out"] = left_out
            if "reference" in per_seed[0]["students"]:  # what the strongest thief gains over labelling its queries
                for a in students:
                    out["worst_case"][row.name][a]["minus_reference"] = diff(
                        lambda r: _worst(r, row.name, a)["student_accuracy"] - r["students"]["reference"][a])
        if base_name in out["worst_case"]:  # what the defense takes from the strongest thief, seed by seed
            for row in attacked:
                out["resistance"][row.name] = {a: diff(lambda r: _worst(r, base_name, a)["student_accuracy"]
                                                       - _worst(r, row.name, a)["student_accuracy"])
                                               for a in students}
                for a in students:  # the same, as the change a reader compares with the other "vs Base" columns
                    out["worst_case"][row.name][a]["change_from_base"] = diff(
                        lambda r: _worst(r, row.name, a)["student_accuracy"]
                        - _worst(r, base_name, a)["student_accuracy"])
    for row in rows:
        out["statistics"][row.name] = {
            stat: {k: cell(lambda r: r["statistics"][row.name][stat][k])["mean"] for k in ("mean", "var", "min", "max")}
            for stat in ("entropy", "within_class_kl")}
    return out


def _worst(seed_result: dict, row: str, arch: str) -> dict:
    return worst_case(seed_result["attacks"][row][arch])


def _worst_over_seeds(per_seed: list[dict], row: str, arch: str) -> dict:
    """The worst case of each seed (its most accurate student over the attacks), over seeds, and which attack it was."""
    worst = [_worst(r, row, arch) for r in per_seed]
    return {"accuracy": over_seeds([w["student_accuracy"] for w in worst]),
            "agreement": over_seeds([w["agreement"] for w in worst]), "attacks": [w["attack"] for w in worst]}


def redact(argv: list[str]) -> list[str]:
    """The command line as recorded in results: without the API key."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--api-key="):
            a = "--api-key=***"
        elif i and argv[i - 1] == "--api-key":
            a = "***"
        out.append(a)
    return out


def evaluate(cfg: EvalConfig) -> dict:
    t0 = time.time()
    ev = Evaluation(cfg)
    if cfg.url:  # answers are paid for: fetched here once, before workers could ask for them twice
        for seed in dict.fromkeys(ev.teacher_seed(s) for s in cfg.seeds):
            ev.served_endpoint(seed, ev.data(seed).test)
    if cfg.jobs > 1:
        fan_out(ev, cfg.jobs)
    per_seed = []
    for seed in cfg.seeds:
        print(f"evaluate: seed {seed}", file=sys.stderr)
        per_seed.append(ev.seed_results(seed))
    results = {
        "command": "python -m evaluation " + " ".join(redact(list(cfg.argv))),
        "settings": {"dataset": cfg.dataset, "scale": cfg.scale, "scale_summary": ev.scale.summary,
                     "seeds": cfg.seeds, "teacher_seed": cfg.teacher_seed,
                     "teachers": [r.name for r in ev.rows if r.sweep is None],
                     "row_kinds": {r.name: r.kind for r in ev.rows},
                     "students": cfg.students, "protocols": cfg.protocols, "teacher_config": ev.cfg.to_dict(),
                     "url": cfg.url,
                     "top_k": ev.top_k, "student_epochs": ev.student_epochs, "kd_temperature": ev.kd_t,
                     "kd_alpha": ev.kd_alpha, "label_mode": cfg.label_mode,
                     "attack_params": {n: ev.attack_params(n) for n in ev.attacks}, "race": ev.scale.race,
                     "recipes": {r.name: ev.recipe_settings(r) for r in ev.rows if r.network != ENDPOINT},
                     "defenses": {r.name: {"defense": r.defense, "params": dict(r.defense_params)}
                                  for r in ev.rows if r.defense},
                     "query_size": len(ev.query_set(ev.teacher_seed(cfg.seeds[0])).labels)
                     if "query" in cfg.protocols else None,
                     "robustness": {"setting": robust_setting(ev.full)[0], **asdict(robust_setting(ev.full)[1])},
                     "device": str(ev.device), "torch": torch.__version__},
        **aggregate(per_seed, ev.rows, cfg.students, cfg.protocols),
        "sweeps": {name: [{"value": v, "row": f"ast {name}={v}"} for v in values] for name, values in cfg.sweep},
        "histograms": per_seed[0]["histograms"],
        "examples": per_seed[0].get("examples"),
        "per_seed": [{k: v for k, v in r.items() if k not in ("histograms", "examples")} for r in per_seed],
        "run": {"wall_seconds": round(time.time() - t0, 1), "jobs": cfg.jobs, "trained": ev.trained,
                "seconds": {k: round(v, 1) for k, v in ev.seconds.items()}},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from evaluation.report import write_report  # matplotlib is only needed here
    write_report(results, cfg.out)
    return results


# ---------------------------------------------------------------- command line

def build_parser() -> Parser:
    epilog = "\n".join([TEACHERS.help("teacher rows"), "  st  Stingy Teacher: the base network answering with its "
                        "top-k (k: the AST setting)", DEFENSES.help("serving-time defense rows (on the base network, "
                                                                    "query protocol)", skip=("none",)),
                        "scales:", *(f"  {k}  {s.summary}" for k, s in SCALES.items()), ATTACKS.help(),
                        LABEL_MODES.help()])
    p = Parser(prog="python -m evaluation", description=__doc__.split("\n\n")[0], epilog=epilog,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, EvalConfig)
    return p


def parse_args(argv: list[str]) -> EvalConfig:
    cfg = from_args(EvalConfig, build_parser().parse_args(argv), argv=tuple(argv))
    cfg.check()
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error
        return int(e.code or 0)
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        results = evaluate(cfg)
    except (DataError, RunError, ExportError, ValueError, StartupError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate: interrupted; the same command continues where it stopped", file=sys.stderr)
        return 130
    print(f"evaluate: {cfg.out / 'results.md'} ({results['run']['wall_seconds']:.0f} s; trained "
          f"{results['run']['trained']['teacher_epochs']} teacher and {results['run']['trained']['student_epochs']} "
          f"student epochs, {results['run']['trained']['attacks']} attacks)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
