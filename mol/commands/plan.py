"""`mol plan RECIPE`: validate a recipe against its models and show what building it would read."""

from __future__ import annotations

import os

from mol.commands import access_policy, add_allow_bin, argtypes, load_recipe, print_json
from mol.planning import plan


def register(sub) -> None:
    p = sub.add_parser("plan", help="validate a recipe: tensors to read, bytes, memory estimate, warnings")
    p.add_argument("recipe", help="recipe YAML file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--world-size",
        type=argtypes.integer(1),
        help="data-parallel processes (default: $WORLD_SIZE when set): also say what each one holds",
    )
    add_allow_bin(p)
    p.set_defaults(func=run)


def run(args) -> int:
    the_plan = plan(load_recipe(args.recipe), policy=access_policy(args))
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "0"))
    if world:  # only then: mol.distributed imports torch, which a plan does not need
        from mol.distributed import memory_line, memory_per_rank
    if args.json:
        print_json(
            {**the_plan.to_dict(), **({"per_rank": memory_per_rank(the_plan, world)} if world else {})}
        )
    else:
        print(the_plan.summary())
        if world:
            print(memory_line(the_plan, world))
        print("OK: the recipe is valid.")
    return 0
