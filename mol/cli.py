"""The `mol` command line. Each subcommand lives in `mol/commands/<name>.py` with `register(subparsers)`;
user errors (`MolError`) print one clear line and exit with status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from importlib.metadata import entry_points

from mol.errors import MolError

# Subcommand modules, in the order `mol --help` lists them.
COMMANDS = ["inspect", "plan", "run", "calibrate"]
OPTIONAL_COMMANDS = ["train", "eval", "export", "mergekit", "push"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other user error (the full usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command that argv names is imported (`mol export` does not pay for
    the modules behind `mol train`, nor `mol db` for torch), and plug-in commands only when argv names none of
    mol's own."""
    parser = _Parser(prog="mol", description="Fuse transformer blocks from different language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and tracebacks) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    names = COMMANDS + OPTIONAL_COMMANDS
    top_help = wanted is not None and any(a in ("-h", "--help") for a in argv[: argv.index(wanted)])
    if wanted is not None and wanted not in names and not top_help:
        plugin = next((ep for ep in entry_points(group="mol.commands") if ep.name == wanted), None)
        if plugin is not None:  # a plug-in's command: it alone (mol's own names are never a plug-in's)
            _add_plugin(sub, plugin)
            return parser
    if not (wanted in names and not top_help and _register(sub, wanted)):
        for name in names:  # `mol --help`, or a usage error (which lists them all)
            _register(sub, name)
    # Packages built on mol (the studio's `mol db`) add subcommands through this entry-point group, so mol
    # itself never imports them; nor does `mol plan` (or any own command): it neither pays for nor depends on
    # the plug-ins' packages.
    if wanted not in sub.choices:
        for ep in entry_points(group="mol.commands"):
            if ep.name not in sub.choices:
                _add_plugin(sub, ep)
    return parser


def _register(sub, name: str) -> bool:
    """Add mol's own command `name` to `sub` (False: it is not part of this installation)."""
    if name in sub.choices:
        return True
    try:
        module = importlib.import_module(f"mol.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"mol.commands.{name}":
            return False
        raise
    module.register(sub)
    return True


def _add_plugin(sub, ep) -> None:
    try:
        ep.load()(sub)
    except (
        ImportError
    ) as exc:  # installed without its extra: this command alone fails, saying what to install
        if ep.name in sub.choices:
            return
        hint, reason = _install_hint(ep, exc.name), str(exc)
        p = sub.add_parser(ep.name, help=f"(not installed: {hint})", add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

        def unavailable(args) -> int:
            raise MolError(
                f"`mol {ep.name}` needs packages this installation lacks ({reason}); install them with: "
                f"{hint}"
            )

        p.set_defaults(func=unavailable)


def _install_hint(ep, missing: str | None) -> str:
    """`pip install 'dist[extra]'` for the extra of the plug-in's distribution that requires the missing module."""
    dist = ep.dist
    if dist is None:
        return f"the package that provides {ep.value}"
    top = (missing or "").split(".")[0].lower().replace("-", "_")
    for req in dist.requires or []:
        name, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([\w.-]+)["']""", marker)
        if extra and re.match(r"[\w.-]+", name.strip()).group(0).lower().replace("-", "_") == top:
            return f"pip install '{dist.name}[{extra.group(1)}]'"
    return f"pip install '{dist.name}'"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
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
