"""`mol db ...`: back up, export, restore and check the studio's database. Registered with the `mol` CLI
through the `mol.commands` entry point, so `mol` itself never imports the studio."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("db", help="back up, export, restore or check the studio's recipe database")
    p.add_argument("--url", help="database URL (default: MANGO_DB_URL, else mango.db in the data folder)")
    actions = p.add_subparsers(dest="db_action", metavar="ACTION")
    actions.required = True
    for name, help_text in (
        ("backup", "copy the whole database into one SQLite file"),
        ("export", "write every row as JSON"),
        ("restore", "replace the database with a backup or JSON export (the current one is kept aside)"),
    ):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("path")
        if name != "restore":
            a.add_argument("--overwrite", action="store_true", help="replace an existing file")
    actions.add_parser("check", help="schema revision, integrity check and row counts")
    p.set_defaults(func=run)


def run(args) -> int:
    from studio.db import Repository

    repo = Repository(args.url)
    try:
        if args.db_action == "backup":
            print(f"backed up to {repo.backup(args.path, overwrite=args.overwrite)}")
        elif args.db_action == "export":
            print(f"exported to {repo.export_json(args.path, overwrite=args.overwrite)}")
        elif args.db_action == "restore":
            kept = repo.restore(args.path)
            print(
                f"restored from {args.path}" + (f"; the previous database is kept at {kept}" if kept else "")
            )
        else:
            recipes = repo.list_recipes(deleted=None)
            print(f"schema revision: {repo.schema_revision()}")
            print(f"integrity: {repo.integrity_check()}")
            print(f"recipes: {len(recipes)}")
    finally:
        repo.close()
    return 0
