"""The model card is the one contract between training and the service: written, read and validated in one place."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from astguard.card import (PROBABILITIES, CardError, ModelCard, read_card, sha256_file, verified_card,
                           write_card)
from conftest import REPO


@pytest.fixture
def card_dict(digits_run) -> dict:
    return json.loads((digits_run[0] / "model.json").read_text())


def test_a_card_training_wrote_reads_back_to_the_same_json_key_for_key(digits_run, card_dict):
    card = read_card(digits_run[0] / "model.json")
    assert card.to_dict() == card_dict and list(card.to_dict()) == list(card_dict)
    assert card.input.channels == 1 and (card.input.height, card.input.width) == (8, 8)
    assert card.input.color_mode == "L" and card.num_classes == 10 and card.teacher_type == "ast"
    assert card.sha256 == sha256_file(digits_run[0] / "model.onnx")


def test_write_card_then_read_card_round_trips_and_keeps_keys_it_does_not_know(tmp_path, card_dict):
    card = ModelCard.from_dict({**card_dict, "owner": {"team": "vision"}})
    path = write_card(card, tmp_path / "model.json")
    again = read_card(path)
    assert again == card and again.extra == {"owner": {"team": "vision"}}


def test_a_dataset_entry_needs_only_its_name_and_keeps_what_it_gave(card_dict):
    card = ModelCard.from_dict({**card_dict, "dataset": {"name": "synthetic", "spec": None, "num_classes": 10}})
    assert card.dataset.train_size is None
    assert card.to_dict()["dataset"] == {"name": "synthetic", "num_classes": 10}


def test_a_minimal_hand_written_card_gets_the_documented_defaults(card_dict):
    minimal = {k: card_dict[k] for k in ("name", "version", "sha256", "class_names")}
    card = ModelCard.from_dict({**minimal, "version": 3, "input": {"shape": [-1, 3, 32, 32]}})
    assert card.version == "3" and card.input.color_mode == "RGB" and card.input.name == "image"
    assert [(o.name, o.shape) for o in card.outputs] == [(PROBABILITIES, (-1, 10))]
    assert card.teacher is None and card.teacher_type is None


@pytest.mark.parametrize("change, words", [
    (lambda d: d.pop("name"), "name: missing"),
    (lambda d: d.update(name=""), "name: must not be empty"),
    (lambda d: d.update(sha256="abc"), "sha256: must be 64 lowercase hex digits"),
    (lambda d: d.update(class_names=[]), "class_names: must be a non-empty list"),
    (lambda d: d.update(class_names="0123456789"), "class_names: expected list"),
    (lambda d: d["input"].update(shape=[-1, 8, 8]), "input.shape: expected 4 integers"),
    (lambda d: d["input"].update(shape=[-1, 2, 8, 8]), "C 1 or 3"),
    (lambda d: d["input"].update(color_mode="RGB"), "input.color_mode: 'RGB' does not fit 1 channels"),
    (lambda d: d.update(outputs=[{"name": "logits", "shape": [-1, 10]}]), "no 'probabilities' output"),
    (lambda d: d["outputs"][0].update(shape=[-1, 9]), "has 9 classes but class_names has 10"),
    (lambda d: d.update(card_version=99), "card_version 99 is newer"),
    (lambda d: d.update(version=True), "version: expected str/int"),
    (lambda d: d.update(teacher={"summary": "no type"}), "teacher.type: missing"),
    (lambda d: d["input"].update(name=5), "input.name: expected str, got int"),
    (lambda d: d["input"].update(value_range=3), "input.value_range: expected list, got int"),
    (lambda d: d["input"].update(value_range=[0, "one"]), "input.value_range: expected 2 numbers"),
    (lambda d: d["outputs"][0].update(shape=[-1, "ten"]), "outputs.0.shape: expected 2 integers"),
    (lambda d: d["dataset"].pop("name"), "dataset.name: missing"),
])
def test_an_invalid_card_is_refused_naming_the_field(tmp_path, card_dict, change, words):
    change(card_dict)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(card_dict))
    with pytest.raises(CardError) as e:
        read_card(path)
    assert words in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("text, words", [("{", "not JSON"), ("[1, 2]", "a JSON object, not list")])
def test_a_card_that_is_not_a_json_object_is_refused(tmp_path, text, words):
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(CardError, match=words):
        read_card(tmp_path / "model.json")


def test_verified_card_checks_the_file_exists_has_a_card_and_matches_its_sha256(tmp_path, digits_run):
    with pytest.raises(CardError, match="does not exist"):
        verified_card(tmp_path / "none.onnx")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes((digits_run[0] / "model.onnx").read_bytes())
    with pytest.raises(CardError, match="no model card beside"):
        verified_card(onnx)
    (tmp_path / "model.json").write_text((digits_run[0] / "model.json").read_text())
    assert verified_card(onnx).name == "digits-ast"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    with pytest.raises(CardError, match="does not match its model card"):
        verified_card(onnx)


# ---------------------------------------------------------------- nothing else spells the contract

PRODUCT = ("astguard", "training", "service", "clients", "evaluation", "benchmarks")
CONTRACT = REPO / "astguard" / "card.py"


def _product_files() -> list[Path]:
    return [p for package in PRODUCT for p in sorted((REPO / package).rglob("*.py")) if p != CONTRACT]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            ids.add(id(node.body[0].value))
    return ids


def spelled_output_names(source: str) -> list[int]:
    """Lines where code (not a docstring) spells the served output's name as a string."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and (n.value == PROBABILITIES or f"'{PROBABILITIES}'" in n.value
                                       or f'"{PROBABILITIES}"' in n.value)]


def card_key_lookups(source: str) -> list[int]:
    """Lines that read a card as a dict: `card["sha256"]`, `model.card["name"]`, `card.get("teacher")`."""
    def card_named(node) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return "card" in name.lower()
    lines = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Subscript) and card_named(n.value) and isinstance(n.slice, ast.Constant):
            lines.append(n.lineno)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" \
                and card_named(n.func.value):
            lines.append(n.lineno)
    return lines


def test_the_checks_find_what_they_look_for():
    code = 'def f(card, m):\n    """probabilities"""\n    x = card["sha256"]\n    y = m.card.get("name")\n' \
           '    s.run(["probabilities"], {})\n    raise E(f"needs a \'probabilities\' output")\n    info["card"]\n'
    assert card_key_lookups(code) == [3, 4]
    assert spelled_output_names(code) == [5, 6]


def test_only_the_contract_spells_the_output_name_or_reads_a_card_as_a_dict():
    found = [f"{p.relative_to(REPO)}:{line}" for p in _product_files()
             for line in spelled_output_names(p.read_text()) + card_key_lookups(p.read_text())]
    assert not found, found
