"""Typed configs on the command line: a dataclass's fields become options, FIELD=VALUE overrides read alike."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from astguard.cli import Parser, add_options, from_args, given, option, parse_assignment, parse_value


@dataclass(frozen=True)
class Demo:
    out: Path = option(help="where")
    budget: int = option(1000, "how many")
    ratio: float | None = option(None, "a share")
    flip: bool = option(False, "flip images")
    names: list[str] = option(["a"], "names")
    milestones: tuple[int, ...] = option((), "epochs")
    mode: str = option("soft", "a mode", choices=("soft", "hard"))
    sets: list[tuple] = option([], "overrides", parse=lambda t: tuple(t.split("=")), append=True)
    hidden: int = option(7, cli=False)


def parse(*argv: str) -> Demo:
    p = Parser(prog="demo")
    add_options(p, Demo)
    return from_args(Demo, p.parse_args(list(argv)))


def test_fields_become_typed_options_with_their_defaults():
    d = parse("--out", "x", "--budget", "5", "--ratio", "0.5", "--flip", "--names", "b,c", "--milestones", "3,6",
              "--mode", "hard", "--sets", "a=1", "--sets", "b=2")
    assert d == Demo(Path("x"), 5, 0.5, True, ["b", "c"], (3, 6), "hard", [("a", "1"), ("b", "2")])
    assert parse("--out", "y") == Demo(Path("y"))
    assert parse("--out", "y", "--no-flip").flip is False


def test_list_defaults_are_not_shared_between_configs():
    a, b = parse("--out", "1"), parse("--out", "2")
    a.names.append("z")
    assert b.names == ["a"]


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: --out"),
    (["--out", "x", "--budget", "lots"], "argument --budget: invalid int value: 'lots'"),
    (["--out", "x", "--milestones", "3,x"], "expected comma-separated integers"),
    (["--out", "x", "--mode", "warm"], "invalid choice: 'warm'"),
    (["--out", "x", "--hidden", "1"], "unrecognized arguments: --hidden 1"),
])
def test_a_bad_option_is_one_line_and_exit_status_2(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("demo: error:") and words in err[0]


def test_deferred_defaults_leave_unset_options_none_so_presets_can_sit_between():
    p = Parser(prog="demo")
    add_options(p, Demo, defer_defaults=True)
    args = p.parse_args(["--out", "x", "--budget", "3"])
    assert given(Demo, args) == {"out": Path("x"), "budget": 3}
    assert "how many (default: 1000)" in " ".join(p.format_help().split())


def test_field_assignments_read_values_as_the_command_line_would():
    assert parse_value(Demo, "milestones", "10,20") == (10, 20)
    assert parse_value(Demo, "flip", "false") is False
    assert parse_assignment(Demo, "ratio=0.25") == ("ratio", 0.25)
    with pytest.raises(ValueError, match="--set takes FIELD=VALUE with FIELD a training option other than out"):
        parse_assignment(Demo, "out=x", forbidden=("out",))
    with pytest.raises(ValueError, match="budget: cannot read 'many'"):
        parse_assignment(Demo, "budget=many")
    with pytest.raises(ValueError, match="--set takes FIELD=VALUE"):
        parse_assignment(Demo, "colour=red")


def test_a_command_whose_extra_is_missing_is_one_line_naming_the_extra(capsys):
    from astguard.cli import launch

    def load():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    assert launch("astguard-steal", "attack", load) == 2
    assert capsys.readouterr().err == ("astguard-steal: error: torch is not installed; this command needs "
                                       "pip install 'astguard[attack]'\n")
    assert launch("astguard-steal", "attack", lambda: (lambda: 0)) == 0


def test_a_missing_module_of_our_own_is_a_bug_and_not_hidden():
    from astguard.cli import launch

    def load():
        raise ModuleNotFoundError("No module named 'clients.stael'", name="clients.stael")

    with pytest.raises(ModuleNotFoundError):
        launch("astguard-steal", "attack", load)
