"""`mol calibrate RECIPE --text FILE --out W`: closed-form (least-squares) adapter initialisation."""

from __future__ import annotations

from pathlib import Path

from mol.commands import argtypes, load_recipe
from mol.errors import DataError


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="initialise adapters by least squares on calibration text")
    p.add_argument("recipe")
    p.add_argument("--text", action="append", required=True, help="text file(s) or folder(s) to calibrate on")
    p.add_argument("--tokens", type=argtypes.integer(1), default=512, help="calibration tokens (default 512)")
    p.add_argument(
        "--out",
        required=True,
        type=argtypes.output_file,
        help="where to write the adapter weights (.safetensors)",
    )
    p.add_argument("--device", type=argtypes.device, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mol.calibration import calibrate
    from mol.data import read_documents
    from mol.loading import build
    from mol.weights import save_trainable

    texts = [doc.text for doc in read_documents(args.text)]  # missing, binary or empty: a DataError
    if not texts:
        raise DataError(f"The calibration text ({', '.join(args.text)}) is empty.")
    model = build(load_recipe(args.recipe), device=args.device)
    report = calibrate(model, texts, max_tokens=args.tokens)
    for name, err in report.items():
        print(f"{name}: relative residual {err:.3f}")
    save_trainable(model, args.out, metadata={"calibrated_on": [Path(f).name for f in args.text]})
    print(f"wrote {args.out}")
    return 0
