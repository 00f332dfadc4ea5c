"""The `mol` command line. Each subcommand lives in `mol/commands/<name>.py` with `register(subparsers)`;
user errors (`MolError`) print one clear line and exit with status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import entry_points

from mol.errors import MolError

# Subcommand modules, in the order `mol --help` lists them.
COMMANDS = ["inspect", "plan", "run", "calibrate"]
OPTIONAL_COMMANDS = ["train", "eval", "export", "mergekit", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mol", description="Fuse transformer blocks from different language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS + OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(f"mol.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mol.commands.{name}":
                continue  # not part of this installation
            raise
        module.register(sub)
    # Packages built on mol (the studio's `mol db`) add subcommands through this entry-point group, so mol
    # itself never imports them.
    for ep in entry_points(group="mol.commands"):
        if ep.name not in sub.choices:
            ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except MolError as exc:
        if args.verbose:
            logging.exception("details")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
