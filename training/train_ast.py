"""astguard-train: base model -> PGD adversarial training set -> defended teacher -> verified ONNX + model card.

    python training/train_ast.py --dataset digits --out runs/digits-ast
    astguard-train --preset cifar10-resnet18 --dataset ../shared/data/cifar10-jpeg.zip --out runs/c10-ast
    torchrun --nproc_per_node 4 training/train_ast.py --preset cifar10-resnet18 --out runs/c10-ast --distributed

Layout of --out: model.onnx, model.json, metrics.json, log.jsonl, checkpoint.pt for the teacher, and the same
for the base model under base/. A finished stage with the same settings is reused, an interrupted one continues
with --resume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` importable and keep training/ off sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from astguard.card import CardError, DatasetInfo, ModelCard, TeacherInfo, read_card, sha256_file  # noqa: E402
from astguard.cli import Parser, add_options, given  # noqa: E402
from training import distributed  # noqa: E402
from training.config import PRESETS, Config, make_config, validate  # noqa: E402
from training.data import DataError, Dataset, convert_images, load_dataset, load_split  # noqa: E402
from training.export import ExportError, export_verified  # noqa: E402
from training.files import run_lock  # noqa: E402
from training.loop import RunError, accuracy, fit, resolve_device  # noqa: E402
from training.losses import DIVERGENCES, top_k_from_ratio  # noqa: E402
from training.models import MODELS, create_model  # noqa: E402
from training.pgd import PGDConfig, adversarial_set  # noqa: E402
from training.robustness import robustness  # noqa: E402
from training.teachers import TEACHERS, Context  # noqa: E402

# What the base model depends on: a change elsewhere (alpha, T, PGD...) reuses the cached base.
BASE_FIELDS = ("dataset", "limit_train", "arch", "batch_size", "lr", "momentum", "weight_decay", "schedule",
               "milestones", "gamma", "crop_pad", "flip", "seed")


def stage_settings(cfg: Config, teacher: str, epochs: int, top_k: int) -> dict:
    """Everything a stage's result depends on; a finished stage is reused only when these match."""
    d = {**cfg.to_dict(), "top_k": top_k}  # the k actually used, whether from --top-k or --sparse-ratio
    if teacher == "base" and cfg.base_lr is not None:  # the base trains at its own rate (a fine-tuning's is --lr)
        d["lr"] = cfg.base_lr
    settings = {**{k: d[k] for k in BASE_FIELDS + TEACHERS[teacher].params}, "teacher": teacher, "epochs": epochs}
    if TEACHERS[teacher].needs_base:  # trained against the base model: depends on how long that trained
        settings["base_epochs"] = cfg.base_epochs or cfg.epochs
    if cfg.init_from_base and teacher != "base":  # only when set: the runs cached before the option keep their key
        settings["init_from_base"] = True
        settings["base_epochs"] = cfg.base_epochs or cfg.epochs
    if cfg.base_lr is not None and teacher != "base" and (TEACHERS[teacher].needs_base or cfg.init_from_base):
        settings["base_lr"] = cfg.base_lr
    return settings


def load_data(cfg: Config, cache_dir: Path) -> Dataset:
    """The data set a configuration trains and evaluates on."""
    data = load_dataset(cfg.dataset, cfg.data_root, cache_dir / "data")
    return data.limit_train(cfg.limit_train, cfg.seed).limit_test(cfg.limit_test)


def build_model(cfg: Config, data: Dataset, device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return create_model(cfg.arch, data.num_classes, data.in_channels, data.image_size, data.mean, data.std).to(device)


def load_trained(cfg: Config, data: Dataset, checkpoint: Path, device) -> torch.nn.Module:
    """A finished stage's model, in eval mode."""
    model = build_model(cfg, data, device)
    model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=False)["model"])
    return model.eval()


def train_stage(teacher: str, cfg: Config, data: Dataset, out_dir: Path, device, *, epochs: int, top_k: int,
                base=None, pair=None, resume=False, overwrite=False, progress=True, on_epoch_end=None
                ) -> tuple[torch.nn.Module, dict]:
    """Train one model (or reuse a finished run with the same settings); returns it and its metrics."""
    settings = stage_settings(cfg, teacher, epochs, top_k)
    metrics_path, ckpt_path = out_dir / "metrics.json", out_dir / "checkpoint.pt"
    model = build_model(cfg, data, device)
    if overwrite and distributed.is_main():
        for p in (metrics_path, ckpt_path):
            p.unlink(missing_ok=True)
    distributed.barrier()  # every rank sees the run directory as rank 0 left it
    if metrics_path.exists() and ckpt_path.exists():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(metrics.get("settings", {}))
                             if settings.get(k) != metrics.get("settings", {}).get(k))
            raise RunError(f"{out_dir} holds a finished {teacher} run with other settings (differs in: "
                           f"{', '.join(changed)}); use another --out, or --overwrite to replace it")
        model.load_state_dict(torch.load(ckpt_path, map_location=device, weights_only=False)["model"])
        if distributed.is_main():
            print(f"[{teacher}] reusing the finished run in {out_dir} (test accuracy {metrics['test_accuracy']:.4f})",
              file=sys.stderr)
        # Measured again for a run finished before robustness was measured, or on another number of test images
        # than asked for now (robust_images is not part of the stage's key: it changes no weights).
        images = len(data.limit_test(cfg.robust_images).test.labels) if cfg.robust_images else len(data.test.labels)
        if metrics.get("robustness", {}).get("images") != images:
            metrics["robustness"] = robustness(model, data, device, seed=cfg.seed, images=cfg.robust_images)
            distributed.main_only(metrics_path.write_text, json.dumps(metrics, indent=2) + "\n")
        return model.eval(), metrics
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if not resume:
            raise RunError(f"{out_dir} holds an interrupted {teacher} run (epoch {state['epoch']}/{epochs}); "
                           "pass --resume to continue it, or --overwrite to start again")
        if state.get("meta") != settings:
            raise RunError(f"cannot resume {out_dir}: its checkpoint was made with other settings; "
                           "use the same options, another --out, or --overwrite")
    t0 = time.time()
    shadow = None
    if TEACHERS[teacher].needs_shadow:  # InI's thief stand-in: the architecture, randomly initialised, frozen
        shadow = build_model(replace(cfg, seed=cfg.seed + 1), data, device).eval()
    if cfg.init_from_base and teacher != "base":
        if base is None:
            raise ValueError("--init-from-base needs the base model; it is trained first by the pipeline")
        model.load_state_dict(base.state_dict())  # InI's shadow stays a fresh initialisation
    ctx = Context(cfg, top_k, base if TEACHERS[teacher].needs_base else None, shadow)
    history = fit(model, TEACHERS[teacher], ctx, data.train, data.test, out_dir, epochs=epochs, device=device,
                  pair=pair, resume=resume, progress=progress, meta=settings, on_epoch_end=on_epoch_end)
    metrics = {"teacher": teacher, "test_accuracy": history[-1]["test_accuracy"],
               "train_accuracy": history[-1]["train_accuracy"], "epochs": epochs,
               "skipped_steps": sum(r["skipped_steps"] for r in history),
               "train_seconds": round(sum(r["seconds"] for r in history), 2),
               "wall_seconds_this_run": round(time.time() - t0, 2), "settings": settings}
    metrics["robustness"] = robustness(model, data, device, seed=cfg.seed, images=cfg.robust_images)
    distributed.main_only(metrics_path.write_text, json.dumps(metrics, indent=2) + "\n")
    return model.eval(), metrics


def ood_images(cfg: Config, data: Dataset, cache_dir: Path) -> torch.Tensor:
    """An out-of-distribution image for every training image (uint8, the training images' shape): `noise` (uniform
    pixels), or a data set spec's training split converted to the model's colour mode and size, drawn with the
    seed; a set smaller than the training set repeats."""
    c, h, w = data.train.images.shape[1:]
    g = torch.Generator().manual_seed(cfg.seed + 2)
    n = len(data.train.labels)
    if cfg.ood == "noise":
        return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    _, split = load_split(cfg.ood, cfg.data_root, cache_dir / "data", default_split="train")
    pool = convert_images(split.images, c, (h, w))
    return pool[torch.randperm(max(n, len(pool)), generator=g)[:n] % len(pool)]


def export_stage(model, out_dir: Path, data: Dataset, cfg: Config, teacher: str, metrics: dict, name: str,
                 version: str, base_accuracy: float, pairs_with: dict | None = None) -> ModelCard:
    card_path, onnx_path = out_dir / "model.json", out_dir / "model.onnx"
    if card_path.exists() and onnx_path.exists():
        try:
            card = read_card(card_path)
        except CardError:
            card = None  # unreadable: export again
        if (card is not None and card.sha256 == sha256_file(onnx_path) and card.training == metrics["settings"]
                and card.name == name and card.version == version and card.robustness == metrics["robustness"]):
            return card
    sample = data.test.images[:16].float() / 255.0
    recipe = TEACHERS.entry(teacher)
    hyper = {k: metrics["settings"][k] for k in recipe.params}
    if pairs_with is not None:  # the misinformation model names the model trained beside it
        hyper["pairs_with"] = pairs_with
    return export_verified(
        model, out_dir, sample, name=name, version=version, class_names=data.classes,
        teacher=TeacherInfo(teacher, recipe.summary, hyper),
        dataset=DatasetInfo(data.name, cfg.dataset, len(data.train.labels), len(data.test.labels), data.num_classes,
                            tuple(data.mean), tuple(data.std)),
        accuracy={"teacher": metrics["test_accuracy"], "base": base_accuracy}, training=metrics["settings"],
        robustness=metrics["robustness"])


def run(cfg: Config, out: Path, *, device: str = "auto", cache_dir: Path | None = None, resume: bool = False,
        overwrite: bool = False, name: str | None = None, version: str = "1", progress: bool = True,
        on_epoch_end=None, base_dir: Path | None = None, data: Dataset | None = None, export: bool = True) -> dict:
    """The whole pipeline; `on_epoch_end(stage, epoch, row)` is called after every epoch of every stage.
    The base model lives in `base_dir` (default: out/base), so several teachers can share one. `data` replaces the
    configuration's data set (a thief training its own teachers on its queries; `cfg.dataset` then only names it
    in the settings); `export=False` trains without writing ONNX files or cards."""
    t0 = time.time()
    def hook(stage):
        return partial(on_epoch_end, stage) if on_epoch_end else None

    validate(cfg)
    dev = resolve_device(device)
    cache_dir = cache_dir or out.parent / ".cache"
    if data is None:
        with distributed.main_first():  # one process decodes and caches the data set
            data = load_data(cfg, cache_dir)
    main = distributed.is_main()
    top_k = cfg.top_k or top_k_from_ratio(cfg.sparse_ratio, data.num_classes)
    if top_k > data.num_classes:
        raise ValueError(f"--top-k {top_k} exceeds the number of classes ({data.num_classes})")
    name = name or out.resolve().name
    recipe = TEACHERS[cfg.teacher]
    if recipe.single_process and distributed.active():
        raise ValueError(f"--teacher {cfg.teacher} runs in one process (its step takes gradients inside the step, "
                         "which DDP cannot split); run it without --distributed")
    if main:
        where = f"{distributed.world_size()} processes on {dev.type}" if distributed.active() else f"device {dev}"
        print(f"astguard-train: {cfg.teacher} teacher, {cfg.arch} on {data.name} ({len(data.train.labels)} train / "
              f"{len(data.test.labels)} test, {data.num_classes} classes), {where}", file=sys.stderr)

    base_epochs = cfg.base_epochs or cfg.epochs
    base_dir = base_dir or out / "base"
    # A shared base (several teachers' base_dir) keeps one name, so it is exported once.
    base_name = f"{name}-base" if base_dir == out / "base" else base_dir.resolve().name
    # Runs that share a stage's directory (evaluate --jobs: teachers sharing one base) take turns: the next one
    # finds the stage finished and reuses it.
    with run_lock(base_dir / ".lock"):
        base_cfg = cfg if cfg.base_lr is None else replace(cfg, lr=cfg.base_lr)
        base, base_metrics = train_stage("base", base_cfg, data, base_dir, dev, epochs=base_epochs, top_k=top_k,
                                         resume=resume, overwrite=overwrite, progress=progress,
                                         on_epoch_end=hook("base"))
        base_acc = base_metrics["test_accuracy"]
        if export:
            distributed.main_only(export_stage, base, base_dir, data, cfg, "base", base_metrics, base_name, version,
                                  base_acc)

    summary = {"base": {"test_accuracy": base_acc, "robust_accuracy": base_metrics["robustness"]["accuracy"]}}
    pair = None
    if recipe.needs_ood:
        pair = ood_images(cfg, data, cache_dir)
    if recipe.needs_adversarial:
        pgd = PGDConfig(cfg.pgd_eps, cfg.pgd_step, cfg.pgd_steps, cfg.pgd_random_start, cfg.seed)
        t1 = time.time()
        pair = adversarial_set(base, data.train.images, data.train.labels, pgd, cache_dir=cache_dir / "adversarial",
                               batch_size=cfg.eval_batch_size, device=dev, progress=progress,
                               precision=cfg.precision)
        adv_acc = accuracy(base, pair, data.train.labels, dev, cfg.eval_batch_size, sharded=True)
        summary["pgd"] = {"base_accuracy_on_adversarial_train": adv_acc, "seconds": round(time.time() - t1, 2),
                          "max_linf": float((pair.float() - data.train.images.float() / 255).abs().max())}

    with run_lock(out / ".lock"):
        if cfg.teacher == "base":
            model, metrics, checkpoint = base, base_metrics, base_dir / "checkpoint.pt"
        else:
            checkpoint = out / "checkpoint.pt"
            model, metrics = train_stage(cfg.teacher, cfg, data, out, dev, epochs=cfg.epochs, top_k=top_k,
                                         base=base if recipe.needs_base or cfg.init_from_base else None, pair=pair,
                                         resume=resume,
                                         overwrite=overwrite, progress=progress, on_epoch_end=hook(cfg.teacher))

        def finish() -> dict:  # rank 0 exports and reports
            summary.update({"teacher": cfg.teacher, "test_accuracy": metrics["test_accuracy"],
                            "accuracy_change_from_base": metrics["test_accuracy"] - base_acc, "top_k": top_k,
                            "robust_accuracy": metrics["robustness"]["accuracy"]})
            if export:
                pairs = None
                if cfg.teacher == "misinformation":
                    base_card = read_card(base_dir / "model.json")
                    pairs = {"name": base_card.name, "version": base_card.version, "sha256": base_card.sha256}
                card = export_stage(model, out, data, cfg, cfg.teacher, metrics, name, version, base_acc, pairs)
                summary.update({"onnx": str(out / "model.onnx"), "sha256": card.sha256})
            summary["checkpoint"] = str(checkpoint)
            if export:
                summary["verification"] = card.verification
            summary["wall_seconds"] = round(time.time() - t0, 2)
            metrics.update(summary)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            return summary
        return distributed.main_only(finish) or {}


# ---------------------------------------------------------------- command line

def build_parser() -> Parser:
    epilog = "\n".join(["presets: " + ", ".join(PRESETS), MODELS.help(), TEACHERS.help(), DIVERGENCES.help()])
    p = Parser(prog="astguard-train", description=__doc__.split("\n\n")[0], epilog=epilog,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--preset", choices=list(PRESETS), help="start from the paper's (or the digits) settings")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--cache-dir", type=Path, help="decoded data and PGD sets (default: <out>/../.cache)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace finished or interrupted runs in --out")
    p.add_argument("--name", help="model name in the card (default: the --out folder's name)")
    p.add_argument("--version", default="1", help="model version in the card (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes torchrun starts (one per GPU, or gloo on CPU)")
    add_options(p, Config, defer_defaults=True)  # defaults <- --preset <- these
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    try:
        cfg = make_config(args.preset, **given(Config, args))
        if args.distributed:
            device = str(distributed.setup(args.device))
        summary = run(cfg, args.out, device=device, cache_dir=args.cache_dir, resume=args.resume,
                      overwrite=args.overwrite, name=args.name, version=args.version, progress=not args.no_progress)
        distributed.barrier()  # every rank leaves the group together
        if distributed.is_main():
            print(json.dumps(summary, indent=2))
    except (DataError, RunError, ExportError, ValueError, distributed.PeerFailed) as e:
        print(f"astguard-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"astguard-train: interrupted; continue with the same command and --resume (checkpoints in "
              f"{args.out})", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
