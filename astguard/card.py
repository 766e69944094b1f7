"""The model card: the contract between training, which writes it beside model.onnx, and the service, which checks
the file against it and serves by it. Neither side owns it; both read and write it only through this module, and
no card key (nor an ONNX input or output name) is spelled anywhere else.

A card is JSON (model.json, or <stem>.json beside the ONNX file). `read_card` validates it and says in one line
what is wrong; `write_card` writes what `ModelCard.to_dict` gives, key for key the format of card_version 1.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_VERSION = 1
INPUT_NAME = "image"  # float32 [N, C, H, W] pixels in [0,1]; the normalisation is inside the graph
PROBABILITIES = "probabilities"  # the softmax: the one output the service reads and serves
LOGITS = "logits"  # exported for training-side checks; never served, since it would undo an output defense
OUTPUT_NAMES = (PROBABILITIES, LOGITS)
COLOR_MODES = {1: "L", 3: "RGB"}


class CardError(ValueError):
    """A card that is missing, unreadable, invalid, or does not describe its file."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, int, int, int]  # [-1, C, H, W]: -1 is the dynamic batch axis
    name: str = INPUT_NAME
    dtype: str = "float32"
    layout: str = "NCHW"
    color_mode: str = ""  # "L" or "RGB"; empty: from the channels
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not self.color_mode and self.shape[1] in COLOR_MODES:
            object.__setattr__(self, "color_mode", COLOR_MODES[self.shape[1]])

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]


@dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: tuple[int, int]  # [-1, classes]
    dtype: str = "float32"


@dataclass(frozen=True)
class TeacherInfo:
    type: str  # the teacher recipe's registry key
    summary: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    spec: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    class_names: tuple[str, ...]
    input: InputSpec
    sha256: str
    outputs: tuple[OutputSpec, ...] = ()  # empty: PROBABILITIES alone, one per class
    file: str = "model.onnx"
    teacher: TeacherInfo | None = None
    dataset: DatasetInfo | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # test accuracy: {"teacher": ..., "base": ...}
    training: dict[str, Any] = field(default_factory=dict)  # every training setting of the teacher's stage
    robustness: dict[str, Any] = field(default_factory=dict)  # test accuracy under an attack, and the attack
    opset: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)  # onnxruntime against PyTorch, per batch size
    software: dict[str, str] = field(default_factory=dict)
    created: str = ""
    card_version: int = CARD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    def __post_init__(self):
        if not self.outputs:
            object.__setattr__(self, "outputs", (OutputSpec(PROBABILITIES, (-1, len(self.class_names))),))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def teacher_type(self) -> str | None:
        return self.teacher.type if self.teacher else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the order card_version 1 writes it."""
        d: dict[str, Any] = {"card_version": self.card_version}
        if self.created:
            d["created"] = self.created
        d.update(name=self.name, version=self.version, class_names=list(self.class_names))
        if self.teacher is not None:
            d["teacher"] = {"type": self.teacher.type, "summary": self.teacher.summary,
                            "hyperparameters": dict(self.teacher.hyperparameters)}
        if self.dataset is not None:
            ds = self.dataset
            full = {"name": ds.name, "spec": ds.spec, "train_size": ds.train_size, "test_size": ds.test_size,
                    "num_classes": ds.num_classes, "mean": list(ds.mean) if ds.mean is not None else None,
                    "std": list(ds.std) if ds.std is not None else None}
            d["dataset"] = {k: v for k, v in full.items() if v is not None}  # what a hand-written card gave
        for key in ("accuracy", "training", "robustness"):
            if getattr(self, key):
                d[key] = dict(getattr(self, key))
        i = self.input
        d.update(file=self.file, sha256=self.sha256,
                 input={"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "layout": i.layout,
                        "color_mode": i.color_mode, "value_range": list(i.value_range)},
                 outputs=[{"name": o.name, "shape": list(o.shape), "dtype": o.dtype} for o in self.outputs])
        if self.opset is not None:
            d["opset"] = self.opset
        for key in ("verification", "software"):
            if getattr(self, key):
                d[key] = dict(getattr(self, key))
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelCard":
        """A validated card; CardError names the first bad field (`input.shape`, `teacher.type`...)."""
        if not isinstance(d, dict):
            raise CardError(f"a model card is a JSON object, not {type(d).__name__}")
        known = {"card_version", "created", "name", "version", "class_names", "teacher", "dataset", "accuracy",
                 "training", "robustness", "file", "sha256", "input", "outputs", "opset", "verification", "software"}
        version = _get(d, "card_version", int, CARD_VERSION)
        if version > CARD_VERSION:
            raise CardError(f"card_version {version} is newer than this astguard reads ({CARD_VERSION}); "
                            "upgrade astguard")
        class_names = _get(d, "class_names", list)
        if not class_names or not all(isinstance(c, str) for c in class_names):
            raise CardError("class_names: must be a non-empty list of strings")
        sha = _get(d, "sha256", str)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise CardError("sha256: must be 64 lowercase hex digits")
        name = _get(d, "name", str)
        if not name.strip():
            raise CardError("name: must not be empty")
        card = cls(
            name=name, version=str(_get(d, "version", (str, int))), class_names=tuple(class_names),
            input=_input(_get(d, "input", dict)), sha256=sha,
            outputs=tuple(_output(o, f"outputs.{i}.") for i, o in enumerate(_get(d, "outputs", list, []))),
            file=_get(d, "file", str, "model.onnx"),
            teacher=_teacher(_get(d, "teacher", dict, None)), dataset=_dataset(_get(d, "dataset", dict, None)),
            accuracy=_get(d, "accuracy", dict, {}), training=_get(d, "training", dict, {}),
            robustness=_get(d, "robustness", dict, {}),
            opset=_get(d, "opset", int, None), verification=_get(d, "verification", dict, {}),
            software=_get(d, "software", dict, {}), created=_get(d, "created", str, ""), card_version=version,
            extra={k: v for k, v in d.items() if k not in known})
        probs = next((o for o in card.outputs if o.name == PROBABILITIES), None)
        if probs is None:
            raise CardError(f"outputs: no {PROBABILITIES!r} output")
        if probs.shape[-1] != card.num_classes:
            raise CardError(f"outputs: {PROBABILITIES!r} has {probs.shape[-1]} classes but class_names has "
                            f"{card.num_classes}")
        return card


_MISSING = object()


def _get(d: dict, key: str, kind, default: Any = _MISSING, where: str = "") -> Any:
    """d[key], of type `kind`; absent (or null, where there is a default): the default. `where` prefixes the field
    name in errors (`input.`)."""
    if key not in d or (d[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise CardError(f"{where}{key}: missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds and
                                       any(k in (int, float) for k in kinds)):
        names = "/".join(k.__name__ for k in kinds)
        raise CardError(f"{where}{key}: expected {names}, got {type(value).__name__}")
    return value


def _numbers(d: dict, key: str, n: int | None, where: str, kind=int, default: Any = _MISSING) -> tuple | None:
    """d[key] as a tuple of n integers (or numbers, with kind=float); n None: any length."""
    if default is not _MISSING and d.get(key) is None:
        return None if default is None else tuple(default)
    values = _get(d, key, list, where=where)
    kinds = (int,) if kind is int else (int, float)
    if (n is not None and len(values) != n) or not all(isinstance(v, kinds) and not isinstance(v, bool)
                                                       for v in values):
        what = "integers" if kind is int else "numbers"
        raise CardError(f"{where}{key}: expected {n if n is not None else 'a list of'} {what}")
    return tuple(values)


def _input(d: dict) -> InputSpec:
    shape = _numbers(d, "shape", 4, "input.")
    if shape[1] not in COLOR_MODES or shape[2] < 1 or shape[3] < 1:
        raise CardError(f"input.shape: expected [N, C, H, W] with C 1 or 3 and H, W >= 1, got {list(shape)}")
    mode = _get(d, "color_mode", str, "", "input.")
    if mode and mode != COLOR_MODES[shape[1]]:
        raise CardError(f"input.color_mode: {mode!r} does not fit {shape[1]} channels")
    value_range = _numbers(d, "value_range", 2, "input.", kind=float, default=[0.0, 1.0])
    return InputSpec(shape, _get(d, "name", str, INPUT_NAME, "input."), _get(d, "dtype", str, "float32", "input."),
                     _get(d, "layout", str, "NCHW", "input."), mode, value_range)


def _output(d: Any, where: str) -> OutputSpec:
    if not isinstance(d, dict):
        raise CardError(f"{where.rstrip('.')}: expected an object")
    return OutputSpec(_get(d, "name", str, where=where), _numbers(d, "shape", 2, where),
                      _get(d, "dtype", str, "float32", where))


def _teacher(d: dict | None) -> TeacherInfo | None:
    if d is None:
        return None
    w = "teacher."
    return TeacherInfo(_get(d, "type", str, where=w), _get(d, "summary", str, "", w),
                       _get(d, "hyperparameters", dict, {}, w))


def _dataset(d: dict | None) -> DatasetInfo | None:
    """What the teacher was trained on; only its name is required (hand-written cards may know no more)."""
    if d is None:
        return None
    w = "dataset."
    return DatasetInfo(_get(d, "name", str, where=w), _get(d, "spec", str, None, w),
                       _get(d, "train_size", int, None, w), _get(d, "test_size", int, None, w),
                       _get(d, "num_classes", int, None, w), _numbers(d, "mean", None, w, float, None),
                       _numbers(d, "std", None, w, float, None))


def card_candidates(onnx_path: str | Path) -> list[Path]:
    """Where the card of an ONNX file may lie: <stem>.json, then model.json, beside it."""
    onnx_path = Path(onnx_path)
    return [onnx_path.with_suffix(".json"), onnx_path.parent / "model.json"]


def find_card(onnx_path: str | Path) -> Path:
    candidates = card_candidates(onnx_path)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise CardError(f"no model card beside {onnx_path} (looked for {', '.join(map(str, candidates))}); "
                        "export the model with astguard-train")
    return found


def read_card(path: str | Path) -> ModelCard:
    """The card in the JSON file `path`, validated."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CardError(f"cannot read model card {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CardError(f"model card {path} is not valid: not JSON ({e})") from None
    try:
        return ModelCard.from_dict(data)
    except CardError as e:
        raise CardError(f"model card {path} is not valid: {e}") from None


def write_card(card: ModelCard, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path


def verified_card(onnx_path: str | Path) -> ModelCard:
    """The card beside an ONNX file, after checking that the file exists and its sha256 is the card's."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CardError(f"model file {onnx_path} does not exist")
    card_path = find_card(onnx_path)
    card = read_card(card_path)
    actual = sha256_file(onnx_path)
    if actual != card.sha256:
        raise CardError(f"{onnx_path} does not match its model card {card_path}: sha256 {actual[:12]}... "
                        f"!= {card.sha256[:12]}...; the file was changed or the card belongs to another")
    return card
