"""astguard-steal: steal a served classifier by knowledge distillation, and report how much was stolen.

    python clients/steal.py --url http://127.0.0.1:8000 --queries digits:train --budget 1000 \\
        --student digits_cnn --eval digits:test --out runs/steal-1

It queries the endpoint as a real client would (PNG images, several per request, concurrently, honouring
429/503 Retry-After), keeps every answer in OUT/transfer.npz, trains a student on them with the training
package's loop, and writes OUT/report.json and OUT/report.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the packages importable, keep clients/ off sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from clients.client import (AstguardError, AsyncAstguardClient, BudgetExhausted, Unauthorized,  # noqa: E402
                            Unavailable, Unreachable, encode_png)
from training.config import make_config  # noqa: E402
from training.data import DataError, Split, batch_crop_flip, channel_stats, load_split, parse_spec  # noqa: E402
from training.distill import LABEL_MODES, train_student  # noqa: E402
from training.files import savez_atomic  # noqa: E402
from training.loop import predict_logits, resolve_device  # noqa: E402
from training.models import create_model, list_models  # noqa: E402

TRANSFER, EVAL_ANSWERS = "transfer.npz", "eval_answers.npz"


class StealError(Exception):
    """A problem the user can fix; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- the query plan

def fit_to_victim(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the victim's colour mode and input size, as the server would make them."""
    x = images.float()
    if x.shape[1] != channels:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True) if channels == 1 \
            else x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def query_plan(spec: str, budget: int, *, channels: int, size: tuple[int, int], augment: bool, flip: bool,
               seed: int, data_root: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images to send (uint8 [budget, C, H, W]) and their true labels when the set has them.

    A set smaller than the budget is cycled; repeats are always augmented (a random crop, and flips with
    --flip), so most repeats differ from the original (an unshifted crop, 1 in (2*pad+1)^2, does not).
    `noise` is uniform random pixels.
    """
    g = torch.Generator().manual_seed(seed)
    if spec == "noise":
        return torch.randint(0, 256, (budget, channels, *size), generator=g, dtype=torch.uint8), None
    _, split = load_split(spec, data_root, cache_dir, default_split="train")
    n = len(split.labels)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-budget // n))])[:budget]
    images = fit_to_victim(split.images[order], channels, size)
    repeat = torch.arange(budget) >= n
    if augment or repeat.any():
        pad = max(1, size[0] // 8)
        (augmented,) = batch_crop_flip([images], pad, flip, g)
        images = torch.where((repeat | augment)[:, None, None, None], augmented, images)
    return images, split.labels[order]


# ---------------------------------------------------------------- querying

@dataclass
class Transfer:
    images: torch.Tensor  # uint8 [B, C, H, W]: the plan
    labels: torch.Tensor | None  # true labels, when known
    probs: np.ndarray  # float32 [B, classes]; NaN rows are unanswered
    meta: dict

    @property
    def answered(self) -> np.ndarray:
        return ~np.isnan(self.probs).any(1)

    def save(self, path: Path) -> None:
        savez_atomic(path, images=self.images.numpy(), probs=self.probs,
                     labels=self.labels.numpy() if self.labels is not None else np.zeros(0, np.int64),
                     meta=np.asarray(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: Path) -> "Transfer":
        z = np.load(path, allow_pickle=False)
        labels = torch.from_numpy(z["labels"]) if len(z["labels"]) else None
        return cls(torch.from_numpy(z["images"]), labels, z["probs"], json.loads(str(z["meta"])))


async def query_victim(client: AsyncAstguardClient, images: torch.Tensor, probs: np.ndarray, *,
                       images_per_request: int, concurrency: int, progress: bool) -> tuple[str, float]:
    """Fill the NaN rows of `probs` with the victim's answers for `images`. Returns (why it stopped, seconds).

    Stops at the end of the plan or when the server's budget runs out; a server that stops answering raises
    Unreachable/Unavailable after the client's retries, with every answer so far already in `probs`.
    """
    todo = np.flatnonzero(np.isnan(probs).any(1))
    chunks = asyncio.Queue()
    for i in range(0, len(todo), images_per_request):
        chunks.put_nowait(todo[i:i + images_per_request])
    stop = {"reason": "plan complete"}
    bar = tqdm(total=len(todo), desc="querying", unit="img", disable=not progress)

    async def send(idx: np.ndarray) -> None:
        blobs = await asyncio.to_thread(lambda: [encode_png(images[i].numpy()) for i in idx])
        try:
            result = await client.predict_encoded(blobs)
        except BudgetExhausted as e:
            stop["reason"] = "server budget exhausted"
            left = e.budget_remaining or 0
            if not 0 < left < len(idx):
                return
            try:  # spend what is left on part of the chunk; another worker may get there first
                idx, result = idx[:left], await client.predict_encoded(blobs[:left])
            except BudgetExhausted:
                return
        probs[idx] = np.stack([p.probabilities for p in result.predictions])
        bar.update(len(idx))

    failures: list[BaseException] = []

    async def worker() -> None:
        while stop["reason"] == "plan complete" and not chunks.empty() and not failures:
            try:
                await send(chunks.get_nowait())
            except Exception as e:  # stop the others from starting new requests; theirs in flight finish
                failures.append(e)

    start = time.perf_counter()
    try:
        # Every worker ends before this returns, so answers already paid for are in `probs` when the caller saves.
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        bar.close()
    if failures:
        raise failures[0]
    return stop["reason"], time.perf_counter() - start


# ---------------------------------------------------------------- evaluation

def kl_victim_student(victim: np.ndarray, student_logits: torch.Tensor) -> float:
    """Mean KL(victim || student) in nats, with 0 log 0 = 0 where a defense zeroed classes."""
    p = torch.from_numpy(victim).double()
    log_q = F.log_softmax(student_logits.double(), dim=1)
    return float((torch.special.xlogy(p, p) - p * log_q).sum(1).mean())


async def victim_answers_on(client: AsyncAstguardClient, images: torch.Tensor, classes: int, sha: str, spec: str,
                            out: Path, *, images_per_request: int, concurrency: int,
                            progress: bool) -> np.ndarray | None:
    """The victim's answers on the evaluation set, cached per victim; None if its budget ran out."""
    cache = out / EVAL_ANSWERS
    probs = np.full((len(images), classes), np.nan, np.float32)
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["sha256"]) == sha and str(z["spec"]) == spec and z["probs"].shape == probs.shape:
            probs = z["probs"]  # a partial set is completed, not queried again
    try:
        if np.isnan(probs).any():
            await query_victim(client, images, probs, images_per_request=images_per_request,
                               concurrency=concurrency, progress=progress)
    finally:  # answers are kept whatever happened: they were paid for
        savez_atomic(cache, probs=probs, sha256=np.asarray(sha), spec=np.asarray(spec))
    return None if np.isnan(probs).any() else probs


def describe(acc):
    return None if acc is None else round(float(acc), 4)


# ---------------------------------------------------------------- the attack

async def attack(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    client = AsyncAstguardClient(args.url, args.api_key, concurrency=args.concurrency,
                                 batch_size=args.images_per_request, retries=args.retries)
    try:
        info = await client.model_info()
        card = info["card"]
        _, channels, height, width = card["input"]["shape"]
        classes = len(card["class_names"])
        transfer_path = out / TRANSFER
        meta = {"victim_sha256": card["sha256"], "queries": args.queries, "budget": args.budget,
                "augment": args.augment, "flip": args.flip, "seed": args.seed}
        if args.reuse or args.resume:
            if not transfer_path.exists():
                raise StealError(f"--{'reuse' if args.reuse else 'resume'}: no transfer set in {out}")
            transfer = Transfer.load(transfer_path)
            if args.resume and transfer.meta != meta:
                raise StealError(f"--resume: {transfer_path} was made with other settings or another victim "
                                 f"({transfer.meta}); use the same options, or --overwrite")
        else:
            if transfer_path.exists() and not args.overwrite:
                old = Transfer.load(transfer_path)
                raise StealError(f"{out} already holds {int(old.answered.sum())} answered queries: --reuse to "
                                 "train on them, --resume to continue querying, or --overwrite to start again")
            images, labels = query_plan(args.queries, args.budget, channels=channels, size=(height, width),
                                        augment=args.augment, flip=args.flip, seed=args.seed,
                                        data_root=args.data_root, cache_dir=args.cache_dir)
            transfer = Transfer(images, labels, np.full((len(images), classes), np.nan, np.float32), meta)

        stop_reason, query_s, asked = "reused", 0.0, int((~transfer.answered).sum())
        if not args.reuse:
            try:
                stop_reason, query_s = await query_victim(
                    client, transfer.images, transfer.probs, images_per_request=args.images_per_request,
                    concurrency=args.concurrency, progress=not args.no_progress)
            except (Unreachable, Unavailable) as e:
                raise StealError(f"the server stopped answering after {int(transfer.answered.sum())} of "
                                 f"{len(transfer.probs)} queries ({e.message}); the answers so far are saved in "
                                 f"{transfer_path}: rerun the same command with --resume to continue, or with "
                                 "--reuse to train on what was saved", 3) from None
            finally:  # whatever happened: the answers were paid for
                transfer.save(transfer_path)
        answered = transfer.answered
        newly = asked - int((~answered).sum()) if not args.reuse else 0
        if not answered.any():
            raise StealError("the victim answered no queries (its budget for this key may be spent already)")
        images = transfer.images[torch.from_numpy(answered)]
        probs = torch.from_numpy(transfer.probs[answered])
        labels = transfer.labels[torch.from_numpy(answered)] if transfer.labels is not None else None

        # Evaluation set: the attacker's own labelled data, resized to the victim's input.
        test, victim_eval = None, None
        if args.eval:
            _, ev = load_split(args.eval, args.data_root, args.cache_dir, default_split="test")
            test = Split(fit_to_victim(ev.images, channels, (height, width)), ev.labels)
            try:
                victim_eval = await victim_answers_on(client, test.images, classes, card["sha256"], args.eval, out,
                                                      images_per_request=args.images_per_request,
                                                      concurrency=args.concurrency, progress=not args.no_progress)
            except (Unreachable, Unavailable) as e:
                raise StealError(f"the server stopped answering while the evaluation set was queried ({e.message});"
                                 f" the answers so far are saved in {out}: rerun the same command with --reuse to "
                                 "finish the evaluation without querying the transfer set again", 3) from None
    except Unauthorized as e:
        raise StealError(f"the server refused the API key ({e.message})") from None
    except Unreachable as e:
        raise StealError(e.message) from None
    except AstguardError as e:
        raise StealError(f"the server answered {e.message}") from None
    finally:
        await client.aclose()

    eval_split = test or Split(images, probs.argmax(1))
    mean, std = channel_stats(images)
    cfg = make_config(arch=args.student, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      crop_pad=args.crop_pad, flip=args.flip, seed=args.seed)
    torch.manual_seed(args.seed)
    student = create_model(args.student, classes, channels, height, mean, std).to(device)
    t1 = time.perf_counter()
    history = train_student(student, cfg, images, probs, labels if args.use_labels else None, eval_split,
                            out / "student", mode=args.label_mode, temperature=args.temperature,
                            alpha=args.alpha if args.use_labels else 1.0, device=device,
                            progress=not args.no_progress)
    train_s = time.perf_counter() - t1

    report = {
        "victim": {"url": args.url, "name": card["name"], "version": card["version"], "sha256": card["sha256"],
                   "teacher": card.get("teacher", {}).get("type"), "output_defense": info["output_defense"]},
        "victim_accuracy": None, "student_accuracy": None, "agreement": None, "kl": None,
        "reference_accuracy": None, "chance": round(1 / classes, 4),
        "queries_used": newly if not args.reuse else 0, "transfer_set_size": int(answered.sum()),
        "queries_planned": len(transfer.probs), "stop_reason": stop_reason, "eval_queries": 0,
        "images_per_s": round(newly / query_s, 1) if query_s else None, "query_seconds": round(query_s, 2),
        "train_seconds": round(train_s, 2), "student_last_epoch": history[-1] if history else None,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("api_key", "compare")},
    }
    if test is not None:
        logits = predict_logits(student, test.images, device)
        report["student_accuracy"] = describe((logits.argmax(1) == test.labels).float().mean())
        if victim_eval is not None:
            victim_top1 = torch.from_numpy(victim_eval.argmax(1))
            report["eval_queries"] = len(test.labels)
            report["victim_accuracy"] = describe((victim_top1 == test.labels).float().mean())
            report["agreement"] = describe((logits.argmax(1) == victim_top1).float().mean())
            report["kl"] = round(kl_victim_student(victim_eval, logits), 4)
        if labels is not None and args.reference:
            torch.manual_seed(args.seed)
            scratch = create_model(args.student, classes, channels, height, mean, std).to(device)
            train_student(scratch, cfg, images, F.one_hot(labels, classes).float(), labels, test,
                          out / "reference", mode="hard", temperature=1.0, alpha=1.0, device=device,
                          progress=not args.no_progress)
            scratch_logits = predict_logits(scratch, test.images, device)
            report["reference_accuracy"] = describe((scratch_logits.argmax(1) == test.labels).float().mean())
    report["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if args.compare:
        report["compared_with"] = compare(report, json.loads(Path(args.compare).read_text()), str(args.compare))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
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
    lines = [f"# Stealing {v['name']} v{v['version']} ({v['teacher'] or 'unknown'} teacher, output defense "
             f"{v['output_defense']['name']})", "",
             f"{report['queries_used']} queries, student `{report['settings']['student']}`, label mode "
             f"`{report['settings']['label_mode']}`; stopped: {report['stop_reason']}.", ""]
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

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="astguard-steal", description=__doc__.split("\n\n")[0],
                epilog="students: " + ", ".join(list_models()) + "\nquery sets: digits, cifar10, cifar100, an "
                       "ImageFolder dir/.zip (NAME[:SPLIT]), or noise", formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--url", required=True, help="the victim's base URL, e.g. http://127.0.0.1:8000")
    a("--api-key", help="API key (also ASTGUARD_API_KEY)")
    a("--queries", default="digits:train", help="query set spec, or noise (default: digits:train)")
    a("--budget", type=int, default=1000, help="images to query at most (default: 1000)")
    a("--augment", action="store_true", help="randomly crop every query image (repeats always are)")
    a("--flip", action=argparse.BooleanOptionalAction, default=False,
      help="random horizontal flips in augmentation and student training (not for digits)")
    a("--label-mode", choices=LABEL_MODES, default="soft", help="soft, logit or hard (default: soft)")
    a("--temperature", type=float, default=4.0, help="distillation temperature T (default: 4)")
    a("--use-labels", action="store_true", help="mix in cross-entropy on the query set's true labels")
    a("--alpha", type=float, default=0.9, help="with --use-labels: weight of the distillation term (default 0.9)")
    a("--student", default="digits_cnn", help="student architecture (default: digits_cnn)")
    a("--epochs", type=int, default=20, help="student epochs (default: 20)")
    a("--lr", type=float, default=0.05, help="student SGD learning rate (default: 0.05)")
    a("--batch-size", type=int, default=64, help="student batch size (default: 64)")
    a("--crop-pad", type=int, default=1, help="student random-crop padding (default: 1)")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    a("--eval", help="labelled evaluation set spec, e.g. digits:test")
    a("--no-reference", dest="reference", action="store_false",
      help="skip the reference student trained on the true labels of the same queries")
    a("--images-per-request", type=int, default=16, help="images per HTTP request (default: 16)")
    a("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    a("--retries", type=int, default=6, help="retries per request on 429/503/connection errors (default: 6)")
    a("--out", type=Path, required=True, help="output folder")
    a("--reuse", action="store_true", help="train on the saved transfer set without querying again")
    a("--resume", action="store_true", help="continue an interrupted querying run")
    a("--overwrite", action="store_true", help="discard a saved transfer set and query afresh")
    a("--compare", type=Path, help="report.json of another run to compare with")
    a("--data-root", default="data", help="where cifar10/cifar100 live (default: data)")
    a("--cache-dir", type=Path, help="decoded data sets (default: <out>/../.cache/data)")
    a("--no-progress", action="store_true")
    return p


def validate(args: argparse.Namespace) -> None:
    import os

    args.api_key = args.api_key or os.environ.get("ASTGUARD_API_KEY")
    args.cache_dir = args.cache_dir or args.out.parent / ".cache" / "data"
    checks = [
        (args.budget >= 1, f"--budget must be at least 1, got {args.budget}"),
        (args.student in list_models(), f"unknown --student {args.student!r}; known: {', '.join(list_models())}"),
        (args.temperature > 0, "--temperature must be positive"),
        (0 <= args.alpha <= 1, "--alpha must be in [0, 1]"),
        (args.epochs >= 1 and args.batch_size >= 1 and args.lr > 0, "--epochs, --batch-size, --lr must be positive"),
        (args.images_per_request >= 1 and args.concurrency >= 1, "--images-per-request, --concurrency >= 1"),
        (not (args.reuse and args.resume), "--reuse and --resume exclude each other"),
        (args.compare is None or args.compare.is_file(), f"--compare: no file {args.compare}"),
        (args.url.startswith(("http://", "https://")), f"--url must start with http:// or https://: {args.url}"),
    ]
    for ok, message in checks:
        if not ok:
            raise StealError(message)
    for spec in (args.queries if args.queries != "noise" else None, args.eval):
        if spec:
            parse_spec(spec)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        report = asyncio.run(attack(args))
    except StealError as e:
        print(f"astguard-steal: error: {e}", file=sys.stderr)
        return e.code
    except (DataError, ValueError) as e:
        print(f"astguard-steal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"astguard-steal: interrupted; answers so far are in {args.out / TRANSFER}: rerun with --resume",
              file=sys.stderr)
        return 130
    print(json.dumps({k: report[k] for k in ("victim_accuracy", "student_accuracy", "agreement", "kl",
                                             "reference_accuracy", "queries_used", "stop_reason", "images_per_s")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
