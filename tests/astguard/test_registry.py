"""One registry idiom for every extension point, and the README's tables are the registries' own."""
from __future__ import annotations

import pytest

from astguard.registry import Registry, UnknownName
from clients.attack.attacks import ATTACKS
from conftest import REPO
from service.defenses import DEFENSES
from training.distill import LABEL_MODES
from training.losses import DIVERGENCES
from training.models import MODELS
from training.teachers import TEACHERS


def test_an_entry_is_found_by_name_with_its_summary_and_parameters():
    r = Registry("colour")
    r.register("red", 1, summary="warm", params=("hue",), bright=True)

    @r.register("blue", summary="cold")
    def blue():
        return 2

    assert r["red"] == 1 and r["blue"] is blue and list(r) == ["red", "blue"] and len(r) == 2
    assert r.entry("red").params == ("hue",) and r.entry("red").get("bright") is True
    assert "red" in r and "green" not in r and r.get("green") is None  # a Mapping: `in` and .get work


def test_an_unknown_name_is_an_error_that_lists_the_known_ones():
    r = Registry("output defense")
    r.register("none", 0, summary="as is")
    r.register("topk", 1, summary="k largest")
    with pytest.raises(UnknownName) as e:
        r["blur"]
    assert str(e.value) == "unknown output defense 'blur'; known: none, topk"
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)  # a CLI's one-line error, and Mapping


def test_a_name_registers_once_and_needs_a_one_line_summary():
    r = Registry("thing")
    r.register("a", 1, summary="one")
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        r.register("a", 2, summary="again")
    with pytest.raises(ValueError, match="one-line summary"):
        r.register("b", 2, summary="")
    with pytest.raises(ValueError, match="one-line summary"):
        r.register("c", 3, summary="two\nlines")


def test_help_lists_every_entry_with_its_summary():
    r = Registry("label mode")
    r.register("soft", 0, summary="the `p` as returned")
    r.register("hard", 1, summary="top-1")
    assert r.help() == "label modes:\n  soft  the p as returned\n  hard  top-1"


# ---------------------------------------------------------------- the README's tables come from the registries

README_TABLES = {
    "architectures": lambda: MODELS.markdown(params=False),
    "teacher recipes": lambda: TEACHERS.markdown(),
    "divergences": lambda: DIVERGENCES.markdown(params=False),
    "output defenses": lambda: DEFENSES.markdown(extra={
        "keeps the top-1": lambda e: ("yes" if e.get("keeps_top1") else "no")
        + (f": {e.get('top1_note')}" if e.get("top1_note") else "")}),
    "label modes": lambda: LABEL_MODES.markdown(),
    "attacks": lambda: ATTACKS.markdown(extra={"the thief has": lambda e: e.value.assumes,
                                               "queries": lambda e: e.value.cost,
                                               "in `all`": lambda e: "yes" if e.get("in_all", True) else "no"}),
}


@pytest.mark.parametrize("name", README_TABLES)
def test_the_readme_table_of_each_registry_is_the_one_it_generates(name):
    table = README_TABLES[name]()
    assert table in (REPO / "README.md").read_text(), f"README.md should hold this {name} table:\n\n{table}\n"


def test_every_teacher_recipe_and_defense_reaches_the_evaluation_and_its_help():
    from evaluation.config import EvalConfig, row_names
    from evaluation.evaluate import build_parser

    help_text = build_parser().format_help()
    rows = help_text.split("serving-time defense rows")[1].split("scales:")[0]
    for name in TEACHERS:
        assert f"\n  {name} " in help_text, name
    for name in DEFENSES:
        assert (f"\n  {name} " in rows) == (name != "none"), name  # `none` is the base row itself
    assert set(EvalConfig(out=REPO).teachers) == {*TEACHERS, "st"}  # the default rows: every registered teacher
    assert set(row_names()) == {*TEACHERS, "st", *DEFENSES} - {"none"}
