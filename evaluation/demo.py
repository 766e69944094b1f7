"""The main job: train an AST teacher on digits (reusing a cached run), serve it and its base model, steal from
both with the same budget, and print the side-by-side comparison.

    python -m evaluation.demo [--out runs/demo] [--budget 1000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from clients.steal import StealConfig, StealError, attack, validate
from service.process import running
from training.config import make_config
from training.train_ast import run as train


@contextmanager
def serving(model: Path, budget_db: Path):
    with running(model, "--budget-db", str(budget_db), "--log-level", "warning", quiet=True) as r:
        yield r.url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where runs and reports go")
    p.add_argument("--budget", type=int, default=1000, help="queries the thief may send to each victim")
    p.add_argument("--epochs", type=int, default=15, help="student epochs")
    args = p.parse_args(argv)
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
                              progress=False, compare=args.out / "steal-base" / "report.json" if name == "ast" else None)
            try:
                reports[name] = attack(validate(cfg))
            except StealError as e:
                print(f"demo: error: {e}", file=sys.stderr)
                return e.code

    print("\n3/3 the same theft against each teacher:\n")
    rows = [("teacher test accuracy", "victim_accuracy"), ("stolen student accuracy", "student_accuracy"),
            ("student agrees with teacher", "agreement"), ("KL(teacher || student)", "kl"),
            ("student trained on true labels", "reference_accuracy"), ("queries used", "queries_used")]
    print(f"| {'':32} | {'base':>8} | {'AST':>8} |\n| {'-' * 32} | {'-' * 8} | {'-' * 8} |")
    for label, key in rows:
        print(f"| {label:32} | {reports['base'][key]!s:>8} | {reports['ast'][key]!s:>8} |")
    drop = reports["base"]["student_accuracy"] - reports["ast"]["student_accuracy"]
    print(f"\nThe AST teacher cost the thief {drop * 100:+.1f} points of student accuracy (a positive number "
          f"means the defense helped). Reports: {args.out}/steal-*/report.md. Took {time.time() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
