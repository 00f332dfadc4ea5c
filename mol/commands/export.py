"""`mol export RECIPE OUT`: write the fused model as a Hugging Face folder (standard architecture when the
recipe allows it, else MoLForCausalLM with its code)."""

from __future__ import annotations

import json
from pathlib import Path

from mol.commands import argtypes, load_recipe, print_json
from mol.errors import DataError


def register(sub) -> None:
    p = sub.add_parser("export", help="write a recipe as a Hugging Face model folder (safetensors + config)")
    p.add_argument("recipe", help="recipe YAML file ('-' for stdin)")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--weights", help="trained adapters/routers (.safetensors) saved by `mol train`")
    p.add_argument(
        "--format",
        choices=["auto", "standard", "mol"],
        default="auto",
        help="standard: the source architecture (plain same-architecture stacks only); mol: "
        "MoLForCausalLM; auto (default): standard whenever possible",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights")
    p.add_argument(
        "--shard-size",
        type=argtypes.size,
        default="5GB",
        help="largest safetensors shard, e.g. 500MB, 2GB (default 5GB)",
    )
    p.add_argument(
        "--max-size",
        type=argtypes.size,
        default="64GiB",
        help="refuse, before writing, an export larger than this (default 64GiB; 0: no limit)",
    )
    p.add_argument("--allow-large", action="store_true", help="no size limit (as --max-size 0)")
    p.add_argument("--eval-json", help="JSON file {metric: value} to show in the model card")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def read_evaluation(path: str | None) -> dict | list | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read evaluation results from '{path}': {exc}.") from None
    if not isinstance(data, dict | list):
        raise DataError(f"'{path}' should hold {{metric: value}} or a list of {{name, value}}.")
    return data


def run(args) -> int:
    from mol.export import export

    result = export(
        load_recipe(args.recipe),
        args.out,
        args.weights,
        format=args.format,
        dtype=args.dtype,
        max_shard_size=args.shard_size,
        overwrite=args.force,
        evaluation=read_evaluation(args.eval_json),
        max_size=None if args.allow_large or not args.max_size else args.max_size,
    )
    if args.json:
        print_json(result.to_dict())
        return 0
    kind = "standard checkpoint" if result.format == "standard" else "MoLForCausalLM (custom code included)"
    print(
        f"Wrote {result.path}: {kind}, {result.layers} layers, {result.dtype}, "
        f"{len(result.shards)} shard(s), {result.total_bytes / 2**20:.1f} MiB."
    )
    for reason in result.not_standard_because:
        print(f"  not standard: {reason}")
    return 0
