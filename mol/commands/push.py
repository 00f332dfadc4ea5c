"""`mol push RECIPE REPO_ID`: export and upload to the Hugging Face Hub (needs a token and network)."""

from __future__ import annotations

from pathlib import Path

from mol.commands import load_recipe


def register(sub) -> None:
    p = sub.add_parser("push", help="export a recipe (or upload an exported folder) to a Hub repository")
    p.add_argument("recipe", help="recipe YAML file, or a folder written by `mol export`")
    p.add_argument("repo_id", help="Hub repository, 'user-or-org/name' (created if missing)")
    p.add_argument("--weights", help="trained adapters/routers (.safetensors) saved by `mol train`")
    p.add_argument("--format", choices=["auto", "standard", "mol"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mol.export.push import hub_token, push

    hub_token(args.token)  # fail on offline / no token before reading any model
    folder = Path(args.recipe)
    source = folder if folder.is_dir() else load_recipe(args.recipe)
    options = {} if folder.is_dir() else {"format": args.format, "dtype": args.dtype}
    url = push(source, args.repo_id, args.weights, token=args.token, private=args.private, **options)
    print(f"Pushed to {args.repo_id}: {url}")
    return 0
