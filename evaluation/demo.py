"""The main job: train an AST teacher on digits (reusing a cached run), serve it and its base model, steal from
both with the same budget, and print the side-by-side comparison.

    python -m evaluation.demo [--out runs/demo] [--budget 1000]
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from astguard.cli import Parser, add_options, from_args, option
from clients.steal import StealConfig, StealError, attack, validate
from service.process import running
from training.config import make_config
from training.data import DataError
from training.export import ExportError
from training.loop import RunError
from training.train_ast import run as train


@dataclass(frozen=True)
class DemoConfig:
    out: Path = option(Path("runs/demo"), "where runs and reports go")
    budget: int = option(1000, "queries the thief may send to each victim (per attack)")
    epochs: int = option(15, "student epochs")
    attack: str = option("all", "the attack suite, as astguard-steal --attack takes it")


@contextmanager
def serving(model: Path, budget_db: Path):
    with running(model, "--budget-db", str(budget_db), "--log-level", "warning", quiet=True) as r:
        yield r.url


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m evaluation.demo", description=__doc__.split("\n\n")[0])
    add_options(p, DemoConfig)
    try:
        return demo(from_args(DemoConfig, p.parse_args(argv)))
    except (StealError, DataError, RunError, ExportError, ValueError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)


def demo(args: DemoConfig) -> int:
    t0 = time.time()
    os.environ.setdefault("TQDM_DISABLE", "1")

    print("1/3 training the AST teacher and its base model on digits (reused when cached)...", flush=True)
    run_dir = args.out / "digits-ast"
    summary = train(make_config("digits"), run_dir, progress=False)
    print(f"    base {summary['base']['test_accuracy']:.4f}, AST {summary['test_accuracy']:.4f} test accuracy")

    reports = {}
    for name, model in (("base", run_dir / "base" / "model.onnx"), ("ast", run_dir / "model.onnx")):
        print(f"2/3 serving the {name} teacher and stealing it with {args.budget} queries...", flush=True)
        with serving(model, args.out / f"budgets-{name}.sqlite") as url:
            cfg = StealConfig(url=url, out=args.out / f"steal-{name}", queries="digits:train", budget=args.budget,
                              eval="digits:test", student="digits_cnn", epochs=args.epochs, overwrite=True,
                              progress=False, attack=args.attack,
                              compare=args.out / "steal-base" / "report.json" if name == "ast" else None)
            reports[name] = attack(validate(cfg))

    print("\n3/3 the same thefts against each teacher:\n")
    b, a = reports["base"], reports["ast"]
    single = "soft" if "soft" in b["attacks"] else next(iter(b["attacks"]))

    def cell(r: dict, key: str, attack_name: str | None = None):
        return r["attacks"][attack_name][key] if attack_name else r[key]

    rows = [("teacher test accuracy", "victim_accuracy", None),
            (f"stolen student accuracy ({single})", "student_accuracy", single),
            ("  ... agrees with teacher", "agreement", single),
            (f"worst case over {len(b['attacks'])} attacks", "student_accuracy", None),
            ("  ... agrees with teacher", "agreement", None),
            ("student trained on true labels", "reference_accuracy", None), ("queries used", "queries_used", None)]
    print(f"| {'':34} | {'base':>8} | {'AST':>8} |\n| {'-' * 34} | {'-' * 8} | {'-' * 8} |")
    for label, key, which in rows:
        print(f"| {label:34} | {cell(b, key, which)!s:>8} | {cell(a, key, which)!s:>8} |")
    print(f"| {'worst-case attack':34} | {b['worst_case']['attack']:>8} | {a['worst_case']['attack']:>8} |")
    drop = b["student_accuracy"] - a["student_accuracy"]
    print(f"\nAgainst the worst case, the AST teacher cost the thief {drop * 100:+.1f} points of student accuracy "
          f"(a positive number means the defense helped; {single} alone: "
          f"{(cell(b, 'student_accuracy', single) - cell(a, 'student_accuracy', single)) * 100:+.1f}). "
          f"Reports: {args.out}/steal-*/report.md. Took {time.time() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
