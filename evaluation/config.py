"""What an evaluation runs: its typed config, the scales (named data), and the rows of its tables.

A row is a teacher recipe's network (every key of training.teachers.TEACHERS), the Stingy Teacher (`st`: the base
network answering with its top-k), a serving-time output defense on the base network (any key of
service.defenses.DEFENSES but `none`), an ablation's AST variant, or a live endpoint (`--url`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from astguard.cli import option, parse_assignment, parse_names, parse_value
from clients.attack.attacks import attack_names
from service.defenses import DEFENSES
from training.config import PRESETS, Config
from training.data import Dataset
from training.distill import LABEL_MODES
from training.teachers import TEACHERS

PROTOCOLS = ("paper", "query")
STINGY = "st"  # the base network, answering with its top-k
ENDPOINT = "endpoint"  # the row of a live service given by --url: query protocol only (a black box has no logits)
KD_ALPHA = 0.9  # knowledge distillation of the paper's protocol: alpha 0.9, T 4 on CIFAR-10 and 20 on CIFAR-100


def kd_temperature(num_classes: int) -> float:
    return 4.0 if num_classes <= 10 else 20.0


@dataclass(frozen=True)
class Scale:
    """How big an evaluation is: overrides of the preset for the teachers, and the students' budget."""
    summary: str
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)  # the students' optimisation, where it differs from the teachers'
    student_epochs: int | None = None  # None: the teacher's epochs
    query_size: int | None = None  # None: every held-out training image
    recipes: dict = field(default_factory=dict)  # per teacher recipe: overrides of `teacher` (a reduced InI, LTD...)
    paper_size: int | None = None  # paper protocol (and the students alone): KD on this many of the teacher's
    #                                training images, a class-balanced subset (None: all of them)
    attacks: dict = field(default_factory=dict)  # per attack: overrides of its parameters (a reduced recovery...)
    race: float | None = None  # points: the student seeds after the first run only the attacks whose student came
    #                            within this of the row's worst case on the first seed (None: every attack, every seed)


SCALES: dict[str, Scale] = {
    "smoke": Scale("seconds, for tests", dict(epochs=4, limit_train=600, limit_test=300, pgd_steps=5,
                                              pgd_step=0.06), student_epochs=2, query_size=600),
    # 2 CPU cores, CIFAR-10: about 20 minutes of teachers, then 10 a student seed (docs/results/cifar10-cpu/README.md).
    # ResNet-20 needs its 30 epochs to beat a cnn5 trained alone on the same 4,000 images (12 did not).
    "cpu": Scale("CIFAR-10 on 2 CPU cores: ResNet-20 teachers on 4,000 images, cnn5 students; hours with every "
                 "row and attack (see the README)",
                 dict(arch="resnet20", epochs=30, limit_train=4000, limit_test=2000, schedule="cosine",
                      milestones=(), lr=0.1, pgd_steps=10, pgd_step=0.03),
                 student=dict(lr=0.05), student_epochs=10, query_size=4000),
    # 2 CPU cores, CIFAR-10, every row and attack at 3 seeds in 115 minutes with --jobs 2 (issue 17 asked for 100)
    # (docs/results/cifar10-cpu-full/README.md): a ResNet-20 base on 45,000 images in bf16 and channels_last, the
    # other 5,000 the thief's queries; the defended teachers start from the base (see `recipes`).
    "cpu-full": Scale("CIFAR-10 on 2 CPU cores, every row and attack: a ResNet-20 base on 45,000 images (10 epochs, "
                      "bf16), the defended teachers fine-tuned from it, cnn5 thieves with the other 5,000 as "
                      "queries; 115 minutes with --jobs 2",
                      dict(arch="resnet20", epochs=10, limit_train=45000, batch_size=256, lr=0.2, schedule="cosine",
                           milestones=(), pgd_steps=5, pgd_step=0.06, precision="bf16", channels_last=True,
                           test_every=0, robust_images=1000),
                      student=dict(lr=0.05), student_epochs=5, paper_size=5000,
                      # Reduced recipes: every defended teacher starts from the base and trains 2 epochs at lr 0.05
                      # (InI, double backpropagation: 1 epoch at 0.02; LTD: 1 epoch, 3 PGD steps per batch instead
                      # of 10); the misinformation model (a network of its own): 2 epochs from scratch.
                      recipes={"ast": dict(init_from_base=True, epochs=2, lr=0.05),
                               "nt": dict(init_from_base=True, epochs=2, lr=0.05),
                               "stt": dict(init_from_base=True, epochs=2, lr=0.05),
                               "ini": dict(init_from_base=True, epochs=1, lr=0.02),
                               "ltd": dict(init_from_base=True, epochs=1, lr=0.05, ltd_steps=3, ltd_step=3 / 255),
                               "misinformation": dict(epochs=2)},
                      # recovery's own teacher pair: 2 epochs (not the student's 5), its MLP 100 epochs (not 300)
                      attacks={"recovery": dict(epochs=2, mlp_epochs=100)},
                      race=3.0),
    "paper": Scale("the paper's presets: full training set, 160/200 epochs; for a GPU"),
}


def default_preset(dataset: Dataset) -> str:
    if dataset.name == "digits":
        return "digits"
    by_classes = {10: "cifar10-resnet18", 100: "cifar100-resnet18"}
    if dataset.num_classes not in by_classes:
        raise ValueError(f"{dataset.name} has {dataset.num_classes} classes; pass --preset "
                         f"({', '.join(PRESETS)})")
    return by_classes[dataset.num_classes]


def serving_defenses() -> list[str]:
    """The output defenses an evaluation row can be: every registered one but `none` (that is the base row)."""
    return [d for d in DEFENSES if d != "none"]


def teacher_rows() -> list[str]:
    """The teacher recipes that are rows of their own (the misinformation model only serves beside another)."""
    return [t for t in TEACHERS if TEACHERS[t].row]


def default_rows() -> list[str]:
    """Every teacher recipe that is a row, the Stingy Teacher, and the defenses registered as default rows."""
    return [*teacher_rows(), STINGY, *[d for d in serving_defenses() if DEFENSES.entry(d).get("default_row")]]


def row_names() -> list[str]:
    return [*teacher_rows(), STINGY, *serving_defenses()]


# ---------------------------------------------------------------- parsing options

def parse_seeds(text: str) -> list[int]:
    """`3` -> seeds 0, 1, 2; `0,3,7` -> those."""
    try:
        if "," in text:
            return [int(v) for v in text.split(",")]
        n = int(text)
    except ValueError:
        raise ValueError(f"expected a count or a list of seeds, got {text!r}") from None
    if n < 1:
        raise ValueError("--seeds must be at least 1")
    return list(range(n))


SWEEPABLE = tuple(p for p in TEACHERS.entry("ast").params if p != "top_k") + ("sparse_ratio",)


def parse_sweep(text: str) -> tuple[str, tuple]:
    """`alpha=0.03,0.035` -> ("alpha", (0.03, 0.035)); the field must be an AST hyperparameter."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in SWEEPABLE or not values.strip():
        raise ValueError(f"--sweep takes FIELD=V1,V2,... with FIELD one of {', '.join(SWEEPABLE)}; got {text!r}")
    return name, tuple(parse_value(Config, name, v.strip()) for v in values.split(",") if v.strip())


FIXED = ("dataset", "data_root", "seed", "teacher")  # set by --dataset, --data-root, --seeds and --teachers


def parse_set(text: str) -> tuple[str, object]:
    return parse_assignment(Config, text, forbidden=FIXED)


@dataclass(frozen=True)
class EvalConfig:
    out: Path = option(help="results folder: results.json, results.md, figures")
    dataset: str = option("digits", "data set spec (digits, cifar10, cifar100, an ImageFolder dir/.zip)")
    data_root: str = option("data", "where cifar10/cifar100 live in torchvision's format")
    teachers: list[str] = option(default_rows(), "teacher rows: every teacher recipe, st, an output defense on the "
                                 "base network (listed below), or a recipe's variant RECIPE:FIELD=VALUE (e.g. "
                                 "nt:nt_weight=0.004); default: every teacher recipe, st, and the defenses marked as "
                                 "default rows", parse=parse_names)
    students: list[str] = option(["cnn5"], "student architectures")
    scale: str = option("smoke", "how big (listed below)", choices=tuple(SCALES))
    seeds: list[int] = option([0], "a count N (seeds 0..N-1) or a list 0,3,7", parse=parse_seeds, shown="1")
    teacher_seed: int | None = option(None, "train the teachers once, with this seed, for every student seed "
                                            "(default: each seed trains its own teachers)")
    protocols: list[str] = option(list(PROTOCOLS), "paper, query or both")
    sweep: list[tuple] = option([], "an ablation of one AST hyperparameter (alpha, temperature, sparse_ratio, "
                                "divergence...); repeatable", parse=parse_sweep, append=True, metavar="FIELD=V1,V2")
    set: list[tuple] = option([], "override a training option of the scale and preset (e.g. alpha=0.1); repeatable",
                              parse=parse_set, append=True, metavar="FIELD=VALUE")
    preset: str | None = option(None, "training preset (default: by data set)", choices=tuple(PRESETS))
    student_epochs: int | None = option(None, "student epochs (default: the scale's)")
    kd_temperature: float | None = option(None, "distillation temperature (default: 4 for 10 classes, else 20)")
    kd_alpha: float = option(KD_ALPHA, "paper protocol's KD weight")
    label_mode: str = option("soft", "query protocol's student targets (registry key)", choices=tuple(LABEL_MODES))
    attacks: str = option("all", "the attack suite run against every row in the query protocol: a comma-separated "
                                 "list, all, or none (listed below); its worst case is what each defense is judged "
                                 "by")
    url: str | None = option(None, "also evaluate a live astguard service (query protocol; its answers are paid "
                                   "for once)")
    api_key: str | None = option(None, "API key for --url")
    work_dir: Path = option(Path("runs/evaluate"), "models and caches")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    jobs: int = option(1, "run independent teachers and student groups in this many processes, over every GPU "
                          "(or sharing the CPU cores)")
    progress: bool = option(True, "progress bars")
    argv: tuple[str, ...] = option((), cli=False)  # the command line, as recorded in the results (key redacted)

    def check(self) -> None:
        """Reject option values that cannot work, naming the option (before anything is trained)."""
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol {bad[0]!r}; use {', '.join(PROTOCOLS)}")
        checks = [
            (self.student_epochs is None or self.student_epochs >= 1, "--student-epochs must be at least 1"),
            (self.kd_temperature is None or self.kd_temperature > 0,
             f"--kd-temperature must be positive, got {self.kd_temperature}"),
            (len(set(self.seeds)) == len(self.seeds), f"--seeds repeats a seed: {self.seeds}"),
            (len({n for n, _ in self.sweep}) == len(self.sweep),
             "--sweep names a field twice; give all its values in one --sweep"),
            (self.jobs >= 1, f"--jobs must be at least 1, got {self.jobs}"),
            (0 <= self.kd_alpha <= 1, f"--kd-alpha must be in [0, 1], got {self.kd_alpha}"),
        ]
        attack_names(self.attacks, allow_none=True)  # an unknown attack fails here, naming the known ones
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------- rows

@dataclass(frozen=True)
class Row:
    """One teacher row of the tables: a trained network, maybe behind an output defense."""
    name: str
    network: str  # a TEACHERS key, or ENDPOINT
    overrides: tuple = ()  # (field, value) pairs of Config: an ablation's variant
    top_k: int | None = None  # Stingy Teacher: white-box students see the top-k logits only
    defense: str | None = None  # the output defense its served answers pass through (query protocol)
    defense_params: tuple = ()  # (param, value) pairs
    models: tuple[str, ...] = ()  # the teacher recipes of the other models the defense reads (trained beside)
    sweep: tuple | None = None  # (field, value) when the row belongs to a sweep

    @property
    def kind(self) -> str:
        if self.network == ENDPOINT:
            return "endpoint"
        if self.top_k is not None:
            return "stingy"
        return "serving-time defense" if self.defense else "teacher"

    @property
    def white_box(self) -> bool:
        """Whether the paper protocol (KD from logits) applies: not to a black box or a serving-time defense."""
        return self.kind in ("teacher", "stingy")


def parse_variant(text: str) -> tuple[str, tuple]:
    """`nt:nt_weight=0.004` -> ("nt", (("nt_weight", 0.004),)): a teacher recipe with some of its own
    hyperparameters changed (several: `ast:alpha=0.1:temperature=4`)."""
    recipe, *assignments = text.split(":")
    assignments = [a for a in assignments if a.strip()]
    if recipe not in teacher_rows():
        raise ValueError(f"unknown teacher {recipe!r} in {text!r}; a variant is RECIPE:FIELD=VALUE with RECIPE one "
                         f"of {', '.join(teacher_rows())}")
    params = TEACHERS.entry(recipe).params
    out = []
    for a in assignments:
        name, _, value = a.partition("=")
        name = name.strip().replace("-", "_")
        if name not in params or not value.strip():
            raise ValueError(f"{text!r}: {recipe}'s hyperparameters are {', '.join(params) or 'none'} "
                             "(RECIPE:FIELD=VALUE)")
        out.append((name, parse_value(Config, name, value.strip())))
    if not out:
        raise ValueError(f"{text!r}: a variant names at least one FIELD=VALUE after the recipe")
    return recipe, tuple(out)


def build_rows(teachers: list[str], sweeps: list[tuple[str, tuple]], top_k: int) -> list[Row]:
    rows = []
    for t in teachers:
        if ":" in t:  # a recipe's variant: its own row and network, e.g. nt:nt_weight=0.004
            recipe, overrides = parse_variant(t)
            rows.append(Row(recipe + " " + " ".join(f"{k}={v}" for k, v in overrides), recipe, overrides))
        elif t == STINGY:
            rows.append(Row(STINGY, "base", top_k=top_k, defense="topk", defense_params=(("k", top_k),)))
        elif t in teacher_rows():
            rows.append(Row(t, t))
        elif t in serving_defenses():
            rows.append(Row(t, "base", defense=t, defense_params=tuple(defense_defaults(t).items()),
                            models=tuple(DEFENSES.entry(t).get("models", ()))))
        else:
            raise ValueError(f"unknown teacher {t!r}; known: {', '.join(row_names())}")
    for name, values in sweeps:
        for v in values:
            # A preset's explicit top_k would override the ratio being swept.
            overrides = ((name, v), ("top_k", None)) if name == "sparse_ratio" else ((name, v),)
            rows.append(Row(f"ast {name}={v}", "ast", overrides, sweep=(name, v)))
    names = [r.name for r in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the row {twice[0]!r} is asked for twice (--teachers and --sweep name the same teacher)")
    return rows


def defense_defaults(name: str) -> dict:
    """A defense's parameters as the service starts with them (service.config.Settings' defaults)."""
    from service.config import Settings  # pydantic-settings: the serve extra, which the query protocol needs anyway

    return {p: Settings.model_fields[f"defense_{p}"].default for p in DEFENSES.entry(name).params}
