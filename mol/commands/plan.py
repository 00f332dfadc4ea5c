"""`mol plan RECIPE`: validate a recipe against its models and show what building it would read."""

from __future__ import annotations

from mol.commands import add_allow_bin, load_recipe, print_json
from mol.plan import plan


def register(sub) -> None:
    p = sub.add_parser("plan", help="validate a recipe: tensors to read, bytes, memory estimate, warnings")
    p.add_argument("recipe", help="recipe YAML file ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_allow_bin(p)
    p.set_defaults(func=run)


def run(args) -> int:
    the_plan = plan(load_recipe(args.recipe), allow_bin=args.allow_bin)
    if args.json:
        print_json(the_plan.to_dict())
    else:
        print(the_plan.summary())
        print("OK: the recipe is valid.")
    return 0
