"""`mol eval RECIPE [--weights W] --data prose=a.txt --data code=b.py`: per-domain perplexity, router agreement
with the domain labels and expert load per routed slot, beside every source model alone on the same tokens."""

from __future__ import annotations

from pathlib import Path

from mol.commands import add_data, argtypes, load_recipe, print_json
from mol.commands.train import parse_pairs


def register(sub) -> None:
    import inspect

    from mol.evaluation import evaluate

    # The defaults are evaluate()'s own, stated once there.
    d = {name: param.default for name, param in inspect.signature(evaluate).parameters.items()}
    p = sub.add_parser(
        "eval", help="perplexity, routing agreement and load, side by side with the source models"
    )
    p.add_argument("recipe", help="recipe YAML file")
    add_data(p)
    p.add_argument("--weights", help="trained adapters/routers (.safetensors) saved by `mol train`")
    p.add_argument(
        "--out",
        type=argtypes.output_file,
        help="write OUT.json and OUT.csv (default: beside the weights, or the recipe)",
    )
    p.add_argument("--seq-len", type=argtypes.integer(2, 2**20), default=d["seq_len"])
    p.add_argument("--batch-size", type=argtypes.integer(1, 2**16), default=d["batch_size"])
    p.add_argument(
        "--max-tokens", type=argtypes.integer(1), help="evaluate at most this many tokens per domain"
    )
    p.add_argument("--oracle", action="store_true", help="also route every slot by the true domain label")
    p.add_argument("--no-sources", action="store_true", help="skip the source models alone")
    p.add_argument(
        "--expert",
        action="append",
        metavar="DOMAIN=ALIAS",
        help="the model serving a domain (default: the source with the lowest loss on it)",
    )
    p.add_argument("--device", type=argtypes.device, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from mol import distributed
    from mol.evaluation import evaluate
    from mol.planning import plan

    recipe = load_recipe(args.recipe)
    argtypes.check_context(plan(recipe), args.seq_len, "--seq-len")  # before any weights are read
    # Launched by torchrun / accelerate: the processes share the windows; each gets the whole report, rank 0 writes.
    with distributed.session(args.device) as device:
        main = distributed.is_main()
        report = evaluate(
            recipe,
            args.data,
            weights=args.weights,
            sources=not args.no_sources,
            oracle=args.oracle,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            domain_experts=parse_pairs(args.expert, "--expert") or None,
            device=device,
        )
    if not main:
        return 0
    if args.out:
        prefix = Path(args.out)
    else:
        anchor = (
            Path(args.weights) if args.weights else Path(args.recipe if args.recipe != "-" else recipe.name)
        )
        prefix = anchor.with_name(anchor.name.split(".")[0] + ".eval")
    json_path, csv_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".csv")
    report.write(json_path, csv_path)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(report.table())
    print(f"domain experts: {', '.join(f'{d} -> {a}' for d, a in report.domain_experts.items()) or 'none'}")
    print(f"wrote {json_path} and {csv_path}")
    return 0
