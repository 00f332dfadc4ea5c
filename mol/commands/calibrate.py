"""`mol calibrate RECIPE --text FILE --out W`: closed-form (least-squares) adapter initialisation."""

from __future__ import annotations

from pathlib import Path

from mol.commands import load_recipe
from mol.errors import DataError


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="initialise adapters by least squares on calibration text")
    p.add_argument("recipe")
    p.add_argument("--text", action="append", required=True, help="text file(s) to calibrate on")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--out", required=True, help="where to write the adapter weights (.safetensors)")
    p.add_argument("--device")
    p.set_defaults(func=run)


def run(args) -> int:
    from mol.calibrate import calibrate
    from mol.loading import build
    from mol.weights import save_trainable

    texts = []
    for f in args.text:
        path = Path(f)
        if not path.is_file():
            raise DataError(f"Calibration text '{f}' does not exist.")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    model = build(load_recipe(args.recipe), device=args.device)
    report = calibrate(model, texts, max_tokens=args.tokens)
    for name, err in report.items():
        print(f"{name}: relative residual {err:.3f}")
    save_trainable(model, args.out, metadata={"calibrated_on": [Path(f).name for f in args.text]})
    print(f"wrote {args.out}")
    return 0
