"""`mol train RECIPE --data prose=a.txt --data code=src/ --steps N`: train adapters and routers, save them (and the
run's config, metrics and loss curve) beside the recipe, or at --out."""

from __future__ import annotations

from pathlib import Path

from mol.commands import add_config_options, add_data, argtypes, config_from_args, load_recipe, print_json
from mol.errors import DataError


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise DataError(f"{what} '{item}': write name=value.")
        out[name.strip()] = value.strip()
    return out


def register(sub) -> None:
    from mol.training import TrainConfig

    p = sub.add_parser("train", help="train a recipe's adapters and routers on labelled text")
    p.add_argument("recipe", help="recipe YAML file")
    add_data(p)
    p.add_argument(
        "--out",
        type=argtypes.output_file,
        help="weights file to write (default: beside the recipe, <recipe>.safetensors)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out up to --steps")
    # One option per TrainConfig field (--steps, --lr, --router-lr, ..., --compile / --no-compile), built from
    # the dataclass: its defaults, help texts and bounds are stated once, in mol/training.py.
    add_config_options(p, TrainConfig, type_for={"device": argtypes.device})
    p.add_argument(
        "--freeze-routers",
        dest="train_routers",
        action="store_false",
        help="train the adapters only (the same as --no-train-routers)",
    )
    p.add_argument(
        "--freeze-adapters",
        dest="train_adapters",
        action="store_false",
        help="train the routers only (the same as --no-train-adapters)",
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="DOMAIN=ALIAS",
        help="the model serving a domain (default: the source with the lowest loss on it)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the run's metrics as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from mol import distributed
    from mol.planning import plan
    from mol.training import train

    recipe = load_recipe(args.recipe)
    argtypes.check_context(plan(recipe), args.seq_len, "--seq-len")  # before any weights are read
    out = (
        Path(args.out)
        if args.out
        else (
            Path(args.recipe).with_suffix(".safetensors")
            if args.recipe != "-"
            else Path(f"{recipe.name}.safetensors")
        )
    )
    # Launched by torchrun / accelerate: this process is one rank of the run (rank 0 writes and prints).
    with distributed.session(args.device, spread=args.device_map is not None) as device:
        main = distributed.is_main()
        result = train(
            recipe,
            args.data,
            _config(args, device),
            out=out,
            resume=args.resume,
            progress=not args.no_progress,
            domain_experts=parse_pairs(args.expert, "--expert") or None,
        )
    if not main:
        return 0
    if args.json:
        print_json({"weights": str(result.weights_path), **result.metrics})
        return 0
    m = result.metrics
    print(
        f"trained {m['steps']} steps ({m['tokens']:,} tokens, {m['train_seconds']:.0f} s), "
        f"final loss {m['final_loss']}, {m['trainable_parameters']:,} trainable parameters"
    )
    print(f"weights: {result.weights_path}")
    return 0


def _config(args, device: str | None):
    """The run's TrainConfig: every field from its option, the device from the distributed session."""
    from mol.training import TrainConfig

    return config_from_args(TrainConfig, args, device=device)
