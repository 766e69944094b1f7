"""The evaluation: train the comparison teachers and their students, and report what each defense costs the
teacher and what it costs a thief, in the shape of the paper's tables.

    python -m training.evaluate --dataset digits --scale smoke --out results/digits-smoke
    python -m training.evaluate --dataset ../shared/data/cifar10-jpeg.zip --scale cpu --seeds 2 \\
        --out results/cifar10-cpu

Two protocols, both reported for every teacher and student:
- `paper`: knowledge distillation on the teacher's own training set, with the true labels, from the teacher's
  logits (white-box): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
- `query`: no labels; the student fits the probabilities the served (ONNX) teacher returns for a query set
  held out from the teacher's training data, as clients/steal.py does. `--url` adds a live endpoint.
Stingy Teacher (`st`) is the base network with its top-k logits kept (paper) or the service's top-k defense
(query). Every teacher, adversarial set and student is cached under --work-dir by its settings: an interrupted
or extended evaluation redoes nothing. Students of one network and seed train in lockstep on the same batches
and share the teacher's forward pass (training.loop.fit_group); each ends as if trained alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.config import PRESETS, Config, make_config, validate
from training.data import DataError, Dataset, Split, balanced_subset, iterate_in_order, load_dataset
from training.distill import LABEL_MODES, kd_recipe, student_recipe, student_targets
from training.export import ExportError
from training.files import exclusive, write_atomic
from training.loop import Member, RunError, fit_group, predict_logits, resolve_device
from training.losses import sparse_topk_logits, top_k_from_ratio
from training.models import create_model, list_models
from training.pgd import pgd_linf
from training.stats import answer_statistics, entropy, entropy_histogram, over_seeds
from training.teachers import TEACHERS, Context
from training.train_ast import BASE_FIELDS, _parse_ints, load_data, load_trained, run, stage_settings

PROTOCOLS = ("paper", "query")
STINGY = "st"  # the base network, answering with its top-k only


@dataclass(frozen=True)
class Scale:
    """How big an evaluation is: overrides of the preset for the teachers, and the students' budget."""
    summary: str
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)  # the students' optimisation, where it differs from the teachers'
    student_epochs: int | None = None  # None: the teacher's epochs
    query_size: int | None = None  # None: every held-out training image


SCALES: dict[str, Scale] = {
    "smoke": Scale("seconds, for tests", dict(epochs=4, limit_train=600, limit_test=300, pgd_steps=5,
                                              pgd_step=0.06), student_epochs=2, query_size=600),
    # 2 CPU cores, CIFAR-10: about 20 minutes of teachers, then 10 a student seed (docs/results/cifar10-cpu/README.md).
    # ResNet-20 needs its 30 epochs to beat a cnn5 trained alone on the same 4,000 images (12 did not).
    "cpu": Scale("CIFAR-10 on 2 CPU cores: ResNet-20 teachers on 4,000 images, cnn5 students, under an hour "
                 "with --teacher-seed 0 --seeds 2",
                 dict(arch="resnet20", epochs=30, limit_train=4000, limit_test=2000, schedule="cosine",
                      milestones=(), lr=0.1, pgd_steps=10, pgd_step=0.03),
                 student=dict(lr=0.05), student_epochs=10, query_size=4000),
    "paper": Scale("the paper's presets: full training set, 160/200 epochs; for a GPU"),
}
# Knowledge distillation of the paper's protocol: alpha 0.9, T 4 on CIFAR-10 and 20 on CIFAR-100.
KD_ALPHA = 0.9


def kd_temperature(num_classes: int) -> float:
    return 4.0 if num_classes <= 10 else 20.0


def default_preset(dataset: Dataset) -> str:
    if dataset.name == "digits":
        return "digits"
    by_classes = {10: "cifar10-resnet18", 100: "cifar100-resnet18"}
    if dataset.num_classes not in by_classes:
        raise ValueError(f"{dataset.name} has {dataset.num_classes} classes; pass --preset "
                         f"({', '.join(PRESETS)})")
    return by_classes[dataset.num_classes]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- what is evaluated

@dataclass(frozen=True)
class Row:
    """One teacher row of the tables: a trained network, maybe with a top-k filter on its answers."""
    name: str
    network: str  # a TEACHERS key
    overrides: tuple = ()  # (field, value) pairs of Config: an ablation's variant
    top_k: int | None = None  # Stingy Teacher: answers keep their top-k only
    sweep: tuple | None = None  # (field, value) when the row belongs to a sweep


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def _parse_value(name: str, text: str):
    kinds = {f.name: f.type for f in fields(Config)}
    kind = {"float": float, "int": int, "int | None": int, "str": str, "bool": _bool,
            "tuple[int, ...]": _parse_ints}.get(kinds.get(name))  # the same list syntax as astguard-train's
    try:
        return kind(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{name}: cannot read {text!r} as {kinds.get(name)}") from None


def parse_sweep(text: str) -> tuple[str, list]:
    """`alpha=0.03,0.035` -> ("alpha", [0.03, 0.035]); the field must be an AST hyperparameter."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    allowed = [p for p in TEACHERS["ast"].params if p != "top_k"] + ["sparse_ratio"]
    if not sep or name not in allowed or not values.strip():
        raise ValueError(f"--sweep takes FIELD=V1,V2,... with FIELD one of {', '.join(allowed)}; got {text!r}")
    return name, [_parse_value(name, v.strip()) for v in values.split(",") if v.strip()]


def build_rows(teachers: list[str], sweeps: list[tuple[str, list]], top_k: int) -> list[Row]:
    rows = []
    for t in teachers:
        if t == STINGY:
            rows.append(Row(STINGY, "base", top_k=top_k))
        elif t in TEACHERS:
            rows.append(Row(t, t))
        else:
            raise ValueError(f"unknown teacher {t!r}; known: {', '.join([*TEACHERS, STINGY])}")
    for name, values in sweeps:
        for v in values:
            # A preset's explicit top_k would override the ratio being swept.
            overrides = ((name, v), ("top_k", None)) if name == "sparse_ratio" else ((name, v),)
            rows.append(Row(f"ast {name}={v}", "ast", overrides, sweep=(name, v)))
    return rows


ENDPOINT = "endpoint"  # the row of a live service given by --url: query protocol only (a black box has no logits)


def endpoint_answers(url: str, api_key: str | None, sets: dict[str, torch.Tensor], classes: int, cache: Path
                     ) -> dict:
    """The live service's probabilities for each image set, queried as clients/steal.py does and kept in `cache`
    (answers are paid for: a rerun asks only for what is missing)."""
    import asyncio

    from clients.client import AstguardError, AsyncAstguardClient
    from clients.steal import query_victim

    async def go() -> dict:
        async with AsyncAstguardClient(url, api_key, concurrency=4, batch_size=32) as client:
            card = (await client.model_info())["card"]
            out = {"card": card}
            for name, images in sets.items():
                shape = tuple(card["input"]["shape"][1:])
                if tuple(images.shape[1:]) != shape or len(card["class_names"]) != classes:
                    raise RunError(f"--url serves {card['name']} with input {list(shape)} and "
                                   f"{len(card['class_names'])} classes, but the evaluation has images "
                                   f"{list(images.shape[1:])} and {classes} classes: evaluate it on its own data set")
                digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:12]  # which images, not just how many
                path = cache / f"{name}-{card['sha256'][:12]}-{digest}.npy"
                probs = np.load(path) if path.exists() else np.full((len(images), len(card["class_names"])),
                                                                    np.nan, np.float32)
                if np.isnan(probs).any():
                    try:
                        await query_victim(client, images, probs, images_per_request=32, concurrency=4,
                                           progress=False)
                    finally:  # kept whatever happened: they were paid for
                        write_atomic(path, lambda tmp: np.save(tmp, probs))
                if np.isnan(probs).any():
                    raise RunError(f"--url stopped answering (budget spent?) after {int((~np.isnan(probs).any(1)).sum())}"
                                   f" of {len(images)} {name} images; the answers so far are kept in {path}")
                out[name] = torch.from_numpy(probs)
            return out

    cache.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(go())
    except AstguardError as e:
        raise RunError(f"--url {url}: {e}") from None


# ---------------------------------------------------------------- one seed

class Evaluation:
    """Everything one invocation needs; `seed_results(seed)` does the work for one seed."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.scale = SCALES[args.scale]
        self.work: Path = args.work_dir
        self.cache = self.work / ".cache"
        self.device = resolve_device(args.device)
        try:  # fail before training, not after
            import matplotlib  # noqa: F401
            if "query" in args.protocols:
                import onnxruntime  # noqa: F401
        except ImportError as e:
            raise RunError(f"the evaluation needs {e.name}: pip install -e \".[eval,serve]\" (or [eval,gpu])") from None
        if args.out.exists() and not args.out.is_dir():
            raise RunError(f"--out {args.out} is a file, not a folder")
        self.full = load_dataset(args.dataset, args.data_root, self.cache / "data")
        preset = args.preset or default_preset(self.full)
        teacher_overrides = {**self.scale.teacher, **dict(args.set)}
        self.cfg = make_config(preset, dataset=args.dataset, data_root=args.data_root, **teacher_overrides)
        validate(self.cfg)
        self.top_k = self.cfg.top_k or top_k_from_ratio(self.cfg.sparse_ratio, self.full.num_classes)
        self.rows = build_rows(args.teachers, args.sweep, self.top_k)
        if args.url:
            self.rows.append(Row(ENDPOINT, ENDPOINT))
        self.kd_t = args.kd_temperature or kd_temperature(self.full.num_classes)
        self.kd_alpha = args.kd_alpha
        self.student_epochs = args.student_epochs or self.scale.student_epochs or self.cfg.epochs
        for arch in args.students:
            if arch not in list_models():
                raise ValueError(f"unknown student {arch!r}; known: {', '.join(list_models())}")
        self._queries: dict[int, Split] = {}
        self._data: dict[int, Dataset] = {}
        self._networks: dict[int, dict[tuple, dict]] = {}  # teacher seed -> (network, overrides) -> network()
        if "query" in args.protocols:
            self.query_set(args.seeds[0])  # fails now, not after the teachers, when there is no held-out data
        elif args.url:
            raise ValueError("--url is evaluated with the query protocol; add query to --protocols")
        self.trained = {"teacher_epochs": 0, "student_epochs": 0}
        self.seconds = {"teachers": 0.0, "paper_students": 0.0, "query_students": 0.0}

    # -- configurations
    def teacher_cfg(self, row: Row, seed: int) -> Config:
        return replace(self.cfg, seed=seed, teacher=row.network, **dict(row.overrides))

    def student_cfg(self, arch: str, seed: int) -> Config:
        return replace(self.cfg, seed=seed, arch=arch, epochs=self.student_epochs, base_epochs=None,
                       **self.scale.student)

    def teacher_seed(self, seed: int) -> int:
        """The seed of the teachers (and of their training subset) that the students of `seed` learn from."""
        return seed if self.args.teacher_seed is None else self.args.teacher_seed

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
                      name=name, progress=self.args.progress, on_epoch_end=count)
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
                          target=target, prepare=prepare, resume=True, progress=self.args.progress)
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
    def served_answers(self, onnx_path: str, images: torch.Tensor, top_k: int | None) -> torch.Tensor:
        """The probabilities the service would return: the ONNX model in onnxruntime, then its output defense."""
        try:
            from service.defenses import make_defense
            from service.runtime import OnnxModel
        except ImportError as e:
            raise RunError(f"the query protocol needs onnxruntime ({e}); install the `serve` extra or run "
                           "--protocols paper") from None
        model = OnnxModel(Path(onnx_path), device="cpu" if self.device.type == "cpu" else str(self.device),
                          intra_op_threads=torch.get_num_threads())
        defense, _ = make_defense("topk", k=top_k) if top_k else make_defense("none")
        out = [defense(model.predict(x.numpy())[0]) for x in iterate_in_order(images, 512)]
        return torch.from_numpy(np.concatenate(out))

    def query_set(self, seed: int) -> Split:
        if seed not in self._queries:  # asked for at start-up, per seed and for the report: drawn once
            self._queries[seed] = self._draw_queries(seed)
        return self._queries[seed]

    def _draw_queries(self, seed: int) -> Split:
        held = self.full.held_out(self.cfg.limit_train, seed)
        if len(held.labels) == 0:
            raise RunError("the query protocol needs training images the teacher did not see, and this scale "
                           "trains it on all of them: pass --protocols paper, or a --set limit_train=N")
        n = min(self.scale.query_size or len(held.labels), len(held.labels))
        idx = balanced_subset(held.labels, n, seed)
        return Split(held.images[idx], held.labels[idx])

    # -- one seed, every table cell
    def groups(self) -> list[tuple[str, str, Row | None]]:
        """The student groups of one seed, (name, protocol, teacher row); each trains in lockstep and depends only
        on finished teachers. A network's paper-protocol students (e.g. base and st's) form one group."""
        out = [("alone", "alone", None)]
        if "paper" in self.args.protocols:
            firsts = {}
            for r in self.rows:  # the endpoint has no logits: no paper protocol for it
                if r.network != ENDPOINT:
                    firsts.setdefault((r.network, r.overrides), r)
            out += [(f"paper {r.name}", "paper", r) for r in firsts.values()]
        if "query" in self.args.protocols:
            out += [(f"query {r.name}", "query", r) for r in self.rows]
        return out

    def served_endpoint(self, seed: int, test: Split) -> dict:
        return endpoint_answers(self.args.url, self.args.api_key, {"queries": self.query_set(seed).images,
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
        res = {"teachers": {}, "statistics": {}, "students": {p: {} for p in PROTOCOLS}, "histograms": {}}
        if only is None:
            self.teacher_cells(res, data.test, net, served)
        for name, protocol, row in self.groups():
            if only is None or name == only:
                self.train_group(res, protocol, row, student_seed, seed, data, net, served)
        if only is None and student_seed == self.args.seeds[0]:
            res["examples"] = self.examples(networks, data)
        return res

    def teacher_cells(self, res: dict, test: Split, net, served) -> None:
        for row in self.rows:
            if row.network == ENDPOINT:  # probabilities only: softmax(log p / T) is the teacher at T
                answers = served()["test"]
                top1, probs = answers.argmax(1), student_targets(answers, "logit", self.kd_t)
            else:
                logits = predict_logits(net(row)["model"], test.images, self.device, self.cfg.eval_batch_size)
                shown = sparse_topk_logits(logits, row.top_k) if row.top_k else logits
                top1, probs = logits.argmax(1), torch.softmax(shown / self.kd_t, dim=1)
            res["teachers"][row.name] = float((top1 == test.labels).float().mean())
            res["statistics"][row.name] = answer_statistics(probs, test.labels)
            res["histograms"][row.name] = entropy_histogram(probs)

    def train_group(self, res: dict, protocol: str, row: Row | None, student_seed: int, seed: int, data: Dataset,
                    net, served) -> None:
        args, test = self.args, data.test
        if protocol == "alone":  # students trained alone: the reference each student's change is measured from
            alone = [(arch, arch, TEACHERS["base"], self.student_settings(arch, student_seed, "alone", {}))
                     for arch in args.students]
            done = self.train_students(alone, data.train, test, student_seed, data, kind="paper_students")
            res["students"]["alone"] = {k: v["test_accuracy"] for k, v in done.items()}
        elif protocol == "paper":
            teacher = net(row)
            jobs = []
            for r in self.rows:
                if (r.network, r.overrides) == (row.network, row.overrides):
                    source = {"teacher": teacher["key"], "top_k": r.top_k, "kd_temperature": self.kd_t,
                              "kd_alpha": self.kd_alpha}
                    for arch in args.students:
                        jobs.append(((r.name, arch), arch, kd_recipe(self.kd_t, self.kd_alpha, r.top_k),
                                     self.student_settings(arch, student_seed, "paper", source)))

            @torch.no_grad()
            def prepare(batch, model=teacher["model"]):
                return batch._replace(target=model(batch.x).float())

            done = self.train_students(jobs, data.train, test, student_seed, data, prepare=prepare,
                                       kind="paper_students")
            for (name, arch), m in done.items():
                res["students"]["paper"].setdefault(name, {})[arch] = m["test_accuracy"]
        else:
            queries = self.query_set(seed)
            recipe = student_recipe(args.label_mode, self.kd_t, 1.0, use_labels=False)
            if row.network == ENDPOINT:
                probs, sha = served()["queries"], served()["card"]["sha256"]
            else:
                teacher = net(row)
                probs, sha = self.served_answers(teacher["onnx"], queries.images, row.top_k), teacher["key"]
            source = {"teacher": sha, "top_k": row.top_k, "label_mode": args.label_mode,
                      "kd_temperature": self.kd_t, "queries": len(queries.labels)}
            jobs = [(arch, arch, recipe, self.student_settings(arch, student_seed, "query", source))
                    for arch in args.students]
            targets = student_targets(probs.float(), args.label_mode, self.kd_t)
            # No labels: the teacher's top-1 stands in for them in the logged train accuracy.
            done = self.train_students(jobs, Split(queries.images, probs.argmax(1)), test, student_seed, data,
                                       target=targets, kind="query_students")
            res["students"]["query"][row.name] = {k: v["test_accuracy"] for k, v in done.items()}

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
        base networks, the other teacher networks (which share their base), then every seed's student groups."""
        seeds = list(dict.fromkeys(self.teacher_seed(s) for s in self.args.seeds))
        networks = {(r.network, r.overrides): r for r in self.rows if r.network not in (ENDPOINT, "base")}
        return [[(s, "network base") for s in seeds],
                [(s, f"network {r.name}") for s in seeds for r in networks.values()],
                [(s, name) for s in self.args.seeds for name, _, _ in self.groups()]]

    def run_job(self, seed: int, name: str) -> None:
        kind, _, which = name.partition(" ")
        if kind == "network":
            self.train_network(seed, next((r for r in self.rows if r.name == which), Row("base", "base")))
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
            if network != "base" and not overrides:
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
        values = [get(r) for r in per_seed]
        return over_seeds(values)

    teachers = {}
    base_name = next((r.name for r in rows if r.network == "base" and r.top_k is None), None)
    for row in rows:
        t = {"accuracy": cell(lambda r: r["teachers"][row.name])}
        if base_name:
            t["change_from_base"] = cell(lambda r: r["teachers"][row.name] - r["teachers"][base_name])
        teachers[row.name] = t
    out = {"teachers": teachers,
           "students": {"alone": {a: cell(lambda r: r["students"]["alone"][a]) for a in students}},
           "statistics": {}}
    for p in protocols:
        out["students"][p] = {
            row.name: {a: {"accuracy": cell(lambda r: r["students"][p][row.name][a]),
                           "change_from_alone": cell(lambda r: r["students"][p][row.name][a]
                                                     - r["students"]["alone"][a])}
                       for a in students}
            for row in rows if row.name in per_seed[0]["students"][p]}
    for row in rows:
        out["statistics"][row.name] = {
            stat: {k: cell(lambda r: r["statistics"][row.name][stat][k])["mean"] for k in ("mean", "var", "min", "max")}
            for stat in ("entropy", "within_class_kl")}
    return out


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


# ---------------------------------------------------------------- --jobs: independent jobs in worker processes

_WORKER: Evaluation | None = None


def _start_worker(args: argparse.Namespace, devices: list[str], threads: int, counter) -> None:
    global _WORKER
    with counter.get_lock():  # worker i takes device i (round robin): one GPU each while there are enough
        i, counter.value = counter.value, counter.value + 1
    # Each worker's own output goes to its log; what the parent shows is one line per finished job.
    log = args.work_dir / "logs" / f"worker-{i}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    torch.set_num_threads(threads)
    _WORKER = Evaluation(argparse.Namespace(**{**vars(args), "device": devices[i % len(devices)],
                                               "progress": False}))


def _run_job(seed: int, name: str) -> tuple[dict, dict]:
    ev = _WORKER
    ev.trained, ev.seconds = {k: 0 for k in ev.trained}, {k: 0.0 for k in ev.seconds}
    ev.run_job(seed, name)
    return ev.trained, ev.seconds


def worker_devices(device: torch.device, requested: str) -> list[str]:
    """Where --jobs workers run: every visible GPU when the device is CUDA and not one named GPU, else `device`."""
    if device.type == "cuda" and requested in ("auto", "cuda"):
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]


def fan_out(ev: Evaluation, jobs: int) -> None:
    """Run the evaluation's independent jobs (Evaluation.waves) in `jobs` processes; their results land in the
    work directory's caches, where the sequential pass that follows reads them back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn is the same on every platform
    devices = worker_devices(ev.device, ev.args.device)
    threads = max(1, torch.get_num_threads() // jobs) if ev.device.type == "cpu" else torch.get_num_threads()
    waves = ev.waves()
    total, done = sum(len(w) for w in waves), 0
    print(f"evaluate: {total} jobs in {jobs} processes on {', '.join(devices)}"
          + (f", {threads} threads each" if ev.device.type == "cpu" else "")
          + f"; their logs in {ev.work / 'logs'}", file=sys.stderr)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker,
                             initargs=(ev.args, devices, threads, ctx.Value("i", 0))) as pool:
        for wave in waves:
            futures = {pool.submit(_run_job, seed, name): (seed, name) for seed, name in wave}
            try:
                for f in as_completed(futures):
                    trained, seconds = f.result()
                    done += 1
                    for k, v in trained.items():
                        ev.trained[k] += v
                    for k, v in seconds.items():
                        ev.seconds[k] += v
                    seed, name = futures[f]
                    print(f"evaluate: [{done}/{total}] seed {seed} {name} done", file=sys.stderr)
            except BrokenProcessPool:
                raise RunError("an evaluation worker process died (out of memory?); run again to continue from "
                               "what finished, or with fewer --jobs") from None
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def evaluate(args: argparse.Namespace) -> dict:
    t0 = time.time()
    ev = Evaluation(args)
    if args.url:  # answers are paid for: fetched here once, before workers could ask for them twice
        for seed in dict.fromkeys(ev.teacher_seed(s) for s in args.seeds):
            ev.served_endpoint(seed, ev.data(seed).test)
    if args.jobs > 1:
        fan_out(ev, args.jobs)
    per_seed = []
    for seed in args.seeds:
        print(f"evaluate: seed {seed}", file=sys.stderr)
        per_seed.append(ev.seed_results(seed))
    results = {
        "command": "python -m training.evaluate " + " ".join(redact(args.argv)),
        "settings": {"dataset": args.dataset, "scale": args.scale, "scale_summary": ev.scale.summary,
                     "seeds": args.seeds, "teacher_seed": args.teacher_seed, "teachers": [r.name for r in ev.rows if r.sweep is None],
                     "students": args.students, "protocols": args.protocols, "teacher_config": ev.cfg.to_dict(),
                     "url": args.url,
                     "top_k": ev.top_k, "student_epochs": ev.student_epochs, "kd_temperature": ev.kd_t,
                     "kd_alpha": ev.kd_alpha, "label_mode": args.label_mode,
                     "query_size": len(ev.query_set(ev.teacher_seed(args.seeds[0])).labels) if "query" in args.protocols else None,
                     "device": str(ev.device), "torch": torch.__version__},
        **aggregate(per_seed, ev.rows, args.students, args.protocols),
        "sweeps": {name: [{"value": v, "row": f"ast {name}={v}"} for v in values] for name, values in args.sweep},
        "histograms": per_seed[0]["histograms"],
        "examples": per_seed[0].get("examples"),
        "per_seed": [{k: v for k, v in r.items() if k not in ("histograms", "examples")} for r in per_seed],
        "run": {"wall_seconds": round(time.time() - t0, 1), "jobs": args.jobs, "trained": ev.trained,
                "seconds": {k: round(v, 1) for k, v in ev.seconds.items()}},
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from training.report import write_report  # matplotlib is only needed here
    write_report(results, out)
    return results


# ---------------------------------------------------------------- command line

def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(v) for v in text.split(",")]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a list of seeds, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds must be at least 1")
    return list(range(n))


FIXED = ("dataset", "data_root", "seed", "teacher")  # set by --dataset, --data-root, --seeds and --teachers


def _assignment(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in {f.name for f in fields(Config)} or name in FIXED:
        raise argparse.ArgumentTypeError(f"--set takes FIELD=VALUE with FIELD a training option other than "
                                         f"{', '.join(FIXED)}; got {text!r}")
    try:
        return name, _parse_value(name, value.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="scales: " + "; ".join(f"{k} ({s.summary})" for k, s in SCALES.items()))
    a = p.add_argument
    a("--dataset", default="digits", help="data set spec (digits, cifar10, cifar100, an ImageFolder dir/.zip)")
    a("--data-root", default="data", help="where cifar10/cifar100 live in torchvision's format")
    a("--teachers", type=_names, default=["base", "ast", "nt", "stt", STINGY],
      help="teacher rows: " + ", ".join([*TEACHERS, STINGY]) + " (default: all)")
    a("--students", type=_names, default=["cnn5"], help="student architectures (default: cnn5)")
    a("--scale", choices=list(SCALES), default="smoke", help="smoke, cpu or paper (default: smoke)")
    a("--seeds", type=_seeds, default=[0], help="a count N (seeds 0..N-1) or a list 0,3,7 (default: 1)")
    a("--teacher-seed", type=int, help="train the teachers once, with this seed, for every student seed "
                                       "(default: each seed trains its own teachers)")
    a("--protocols", type=_names, default=list(PROTOCOLS), help="paper, query or both (default: both)")
    a("--sweep", action="append", default=[], type=str, metavar="FIELD=V1,V2",
      help="an ablation of one AST hyperparameter (alpha, temperature, sparse_ratio, divergence...); repeatable")
    a("--set", action="append", default=[], type=_assignment, metavar="FIELD=VALUE",
      help="override a training option of the scale and preset (e.g. alpha=0.1); repeatable")
    a("--preset", choices=list(PRESETS), help="training preset (default: by data set)")
    a("--student-epochs", type=int, help="student epochs (default: the scale's)")
    a("--kd-temperature", type=float, help="distillation temperature (default: 4 for 10 classes, else 20)")
    a("--kd-alpha", type=float, default=KD_ALPHA, help=f"paper protocol's KD weight (default: {KD_ALPHA})")
    a("--label-mode", choices=LABEL_MODES, default="soft", help="query protocol's student targets (default: soft)")
    a("--url", help="also evaluate a live astguard service (query protocol; its answers are paid for once)")
    a("--api-key", help="API key for --url")
    a("--out", type=Path, required=True, help="results folder: results.json, results.md, figures")
    a("--work-dir", type=Path, help="models and caches (default: runs/evaluate)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--jobs", type=int, default=1, help="run independent teachers and student groups in this many processes, "
                                           "over every GPU (or sharing the CPU cores) (default: 1)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.work_dir = args.work_dir or Path("runs/evaluate")
    bad = [p for p in args.protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol {bad[0]!r}; use {', '.join(PROTOCOLS)}")
    args.sweep = [parse_sweep(s) for s in args.sweep]
    if args.student_epochs is not None and args.student_epochs < 1:
        raise ValueError("--student-epochs must be at least 1")
    if args.kd_temperature is not None and args.kd_temperature <= 0:
        raise ValueError(f"--kd-temperature must be positive, got {args.kd_temperature}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}")
    swept = [name for name, _ in args.sweep]
    if len(set(swept)) != len(swept):
        raise ValueError("--sweep names a field twice; give all its values in one --sweep")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if not 0 <= args.kd_alpha <= 1:
        raise ValueError(f"--kd-alpha must be in [0, 1], got {args.kd_alpha}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error
        return int(e.code or 0)
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        results = evaluate(args)
    except (DataError, RunError, ExportError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate: interrupted; the same command continues where it stopped", file=sys.stderr)
        return 130
    print(f"evaluate: {args.out / 'results.md'} ({results['run']['wall_seconds']:.0f} s; trained "
          f"{results['run']['trained']['teacher_epochs']} teacher and {results['run']['trained']['student_epochs']} "
          "student epochs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
