"""`mol import-mergekit CONFIG.yml` and `mol export-mergekit RECIPE`: mergekit's `slices:` passthrough format."""

from __future__ import annotations

import sys
from pathlib import Path

from mol.commands import load_recipe


def register(sub) -> None:
    p = sub.add_parser("import-mergekit", help="turn a mergekit passthrough (slices:) config into a recipe")
    p.add_argument("config", help="mergekit YAML file ('-' for stdin)")
    p.add_argument("--name", help="recipe name (default: mergekit-import)")
    p.add_argument("-o", "--output", help="write the recipe YAML here instead of printing it")
    p.set_defaults(func=run_import)

    p = sub.add_parser(
        "export-mergekit", help="write a recipe as a mergekit passthrough config, or say why not"
    )
    p.add_argument("recipe", help="recipe YAML file ('-' for stdin)")
    p.add_argument("--weights", help="trained adapters/routers; trained adapters have no mergekit equivalent")
    p.add_argument("--dtype", help="dtype line of the config (e.g. bfloat16)")
    p.add_argument("-o", "--output", help="write the config here instead of printing it")
    p.set_defaults(func=run_export)


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
        print(f"Wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def run_import(args) -> int:
    from mol.export.mergekit import import_mergekit

    source = sys.stdin.read() if args.config == "-" else Path(args.config)
    result = import_mergekit(source, name=args.name)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    _emit(result.recipe.to_yaml(), args.output)
    return 0


def run_export(args) -> int:
    from mol.export.mergekit import export_mergekit

    _emit(
        export_mergekit(load_recipe(args.recipe), dtype=args.dtype, weights=args.weights, public=False),
        args.output,
    )
    return 0
