"""`mol train`'s options are built from `TrainConfig`'s fields: every field has its option with the field's
default, and a value given on the command line reaches the TrainConfig the command trains with."""

import math
import typing
from dataclasses import MISSING, fields

import pytest

from mol.cli import build_parser, main
from mol.commands.train import _config
from mol.training import TrainConfig

BASE = ["train", "r.yaml", "--data", "p=x.txt"]
HINTS = typing.get_type_hints(TrainConfig)


def parse(*extra: str):
    argv = [*BASE, *extra]
    return build_parser(argv).parse_args(argv)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def value_type(hint):
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner[0] if inner else hint


def non_default(f) -> tuple[list[str], object]:
    """Command-line words giving field `f` a value other than its default, and that value."""
    meta, kind, default = f.metadata, value_type(HINTS[f.name]), f.default
    if kind is bool:
        return [f"--no-{flag(f.name)[2:]}" if default else flag(f.name)], not default
    if "choices" in meta:
        choice = next(c for c in meta["choices"] if c != default)
        return [flag(f.name), choice], choice
    if f.name == "device":
        return [flag(f.name), "cpu"], "cpu"
    low, high = meta.get("low", -math.inf), meta.get("high", math.inf)
    if kind is int:
        value = (default if default is not None else max(low, 1)) + 1
        assert low <= value <= high, f.name
        return [flag(f.name), str(value)], value
    if kind is float:
        value = next(
            v
            for v in (0.25, 0.5, 0.75, 2.5)
            if v != default and (v > low if meta.get("above") else v >= low) and v <= high
        )
        return [flag(f.name), str(value)], value
    raise AssertionError(f"no test value for TrainConfig.{f.name} of type {HINTS[f.name]}")


def test_every_field_has_an_option_with_the_fields_default():
    args = parse()
    for f in fields(TrainConfig):
        assert f.default is not MISSING, f.name
        assert hasattr(args, f.name), f"TrainConfig.{f.name} has no `mol train` option"
        assert getattr(args, f.name) == f.default, f.name
    assert _config(args, None) == TrainConfig()


@pytest.mark.parametrize("f", fields(TrainConfig), ids=lambda f: f.name)
def test_a_value_on_the_command_line_reaches_the_config(f):
    words, value = non_default(f)
    args = parse(*words)
    config = _config(args, args.device)
    assert getattr(config, f.name) == value != f.default
    others = {g.name for g in fields(TrainConfig)} - {f.name}
    assert all(getattr(config, n) == getattr(TrainConfig(), n) for n in others)


def test_all_values_at_once_and_the_legacy_flags():
    words, expected = [], {}
    for f in fields(TrainConfig):
        w, v = non_default(f)
        words += w
        expected[f.name] = v
    args = parse(*words)
    assert _config(args, args.device) == TrainConfig(**expected)
    config = _config(parse("--freeze-adapters", "--freeze-routers", "--compile"), None)
    assert (config.train_adapters, config.train_routers, config.compile) == (False, False, True)
    config = _config(parse("--steps", "3", "--lr", "0.01", "--router-lr", "0.02", "--max-seconds", "9"), None)
    assert (config.steps, config.lr, config.router_lr, config.max_seconds) == (3, 0.01, 0.02, 9.0)


def test_help_lists_every_field(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert flag(f.name) in out, f.name
    assert "--no-train-adapters" in out and "--freeze-adapters" in out and "adapter learning rate" in out


@pytest.mark.parametrize(
    "option, value",
    [
        ("--min-lr-ratio", "2"),
        ("--min-lr-ratio", "nan"),
        ("--mixed-chunk", "0"),
        ("--grad-clip", "-1"),
        ("--adapter-init", "nope"),
        ("--router-init", "nope"),
        ("--device-map", "everywhere"),
        ("--steps", "1.5"),
    ],
)
def test_bad_values_of_generated_options_are_one_line_errors(capsys, option, value):
    assert main([*BASE, option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"argument {option}" in err, err
