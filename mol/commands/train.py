"""`mol train RECIPE --data prose=a.txt --data code=src/ --steps N`: train adapters and routers, save them (and the
run's config, metrics and loss curve) beside the recipe, or at --out."""

from __future__ import annotations

from pathlib import Path

from mol.commands import add_data, argtypes, load_recipe, print_json
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
    from mol.router_init import ROUTER_INITS
    from mol.training import ADAPTER_INITS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a recipe's adapters and routers on labelled text")
    p.add_argument("recipe", help="recipe YAML file")
    add_data(p)
    p.add_argument(
        "--out",
        type=argtypes.output_file,
        help="weights file to write (default: beside the recipe, <recipe>.safetensors)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out up to --steps")
    count, positive, weight = argtypes.integer(0), argtypes.integer(1), argtypes.number(0)
    p.add_argument("--steps", type=count, default=d.steps)
    p.add_argument("--batch-size", type=argtypes.integer(1, 2**16), default=d.batch_size)
    p.add_argument("--grad-accum", type=argtypes.integer(1, 2**16), default=d.grad_accum)
    p.add_argument("--seq-len", type=argtypes.integer(2, 2**20), default=d.seq_len)
    p.add_argument("--lr", type=argtypes.number(0, above=True), default=d.lr, help="adapter learning rate")
    p.add_argument("--router-lr", type=argtypes.number(0, above=True), default=d.router_lr)
    p.add_argument("--warmup", type=count, default=d.warmup)
    p.add_argument("--weight-decay", type=weight, default=d.weight_decay)
    p.add_argument("--aux-loss-weight", type=weight, default=d.aux_loss_weight)
    p.add_argument("--z-loss-weight", type=weight, default=d.z_loss_weight)
    p.add_argument(
        "--mixed-share",
        type=argtypes.number(0, 1),
        default=d.mixed_share,
        help="share of training rows that interleave chunks of several domains",
    )
    p.add_argument(
        "--distill-weight",
        type=weight,
        default=d.distill_weight,
        help="weight of KL to the source model serving each token's domain (0: off)",
    )
    # Batch k is drawn with seed * 1_000_003 + k, which must stay inside torch's 64-bit seed range.
    p.add_argument("--seed", type=argtypes.integer(0, 2**32 - 1), default=d.seed)
    p.add_argument("--adapter-init", choices=ADAPTER_INITS, default=d.adapter_init)
    p.add_argument("--router-init", choices=ROUTER_INITS, default=d.router_init)
    p.add_argument("--freeze-routers", action="store_true", help="train the adapters only")
    p.add_argument("--freeze-adapters", action="store_true", help="train the routers only")
    p.add_argument(
        "--init-tokens", type=positive, default=d.init_tokens, help="tokens per domain for closed-form inits"
    )
    p.add_argument("--max-tokens", type=positive, help="read at most this many tokens per domain")
    p.add_argument("--save-every", type=count, default=0)
    p.add_argument(
        "--max-seconds", type=argtypes.number(0, above=True), help="stop early after this much training time"
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="DOMAIN=ALIAS",
        help="the model serving a domain (default: the source with the lowest loss on it)",
    )
    p.add_argument(
        "--device",
        type=argtypes.device,
        help="cpu, cuda, cuda:1 (default: cuda if present; launched by torchrun: each process's own GPU)",
    )
    p.add_argument(
        "--device-map",
        choices=("auto", "balanced", "sequential"),
        help="spread the frozen blocks over the GPUs (with torchrun: over each process's share of them)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the training step (torch.compile): faster steps on a GPU after a warm-up",
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
    from mol.training import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        lr=args.lr,
        router_lr=args.router_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        aux_loss_weight=args.aux_loss_weight,
        z_loss_weight=args.z_loss_weight,
        seed=args.seed,
        mixed_share=args.mixed_share,
        distill_weight=args.distill_weight,
        adapter_init=args.adapter_init,
        router_init=args.router_init,
        train_adapters=not args.freeze_adapters,
        train_routers=not args.freeze_routers,
        init_tokens=args.init_tokens,
        max_tokens=args.max_tokens,
        save_every=args.save_every,
        max_seconds=args.max_seconds,
        device=device,
        device_map=args.device_map,
        compile=args.compile,
    )
