"""`mol run RECIPE --prompt TEXT`: build the fused model, generate, print the text and a routing summary."""

from __future__ import annotations

import sys

import torch

from mol.commands import access_policy, add_allow_bin, argtypes, load_recipe, print_json
from mol.errors import ResourceError


def register(sub) -> None:
    p = sub.add_parser("run", help="generate text with a recipe and summarise its routing")
    p.add_argument("recipe", help="recipe YAML file ('-' for stdin)")
    p.add_argument("--prompt", "-p", required=True, type=argtypes.text, help="prompt text")
    p.add_argument("--max-new-tokens", "-n", type=argtypes.integer(1, 4096), default=64, help="1 to 4096")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=argtypes.number(0, above=True), default=0.8)
    p.add_argument("--top-p", type=argtypes.number(0, 1, above=True), default=0.95)
    p.add_argument("--seed", type=argtypes.integer(0, 2**64 - 1), default=0)
    p.add_argument("--weights", help="trained adapters/routers (.safetensors) saved by `mol train`")
    p.add_argument("--device", type=argtypes.device, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print the text and the full trace as JSON")
    add_allow_bin(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mol.loading import build

    model = build(
        load_recipe(args.recipe), device=args.device, weights=args.weights, policy=access_policy(args)
    )
    tok = model.tokenizer
    if tok is None:
        raise ResourceError("The base model has no tokenizer files; `mol run` needs them to read the prompt.")
    enc = tok(args.prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    if n == 0:
        raise ResourceError("The prompt gives no tokens; give some text.")
    argtypes.check_context(
        model.plan, n + args.max_new_tokens, f"The prompt ({n} tokens) plus --max-new-tokens"
    )
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    streamed: list[int] = []

    def stream(tokens):
        if not args.json:
            streamed.append(int(tokens[0]))
            sys.stdout.write(tok.decode([streamed[-1]]))
            sys.stdout.flush()

    if not args.json:
        sys.stdout.write(args.prompt)
    out = model.generate(
        enc["input_ids"],
        attention_mask=enc.get("attention_mask"),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        generator=gen,
        streamer=stream,
        return_trace=True,
    )
    text = tok.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    trace = out.trace
    tokens = [tok.decode([i]) for i in trace.token_ids[0].tolist()]
    if args.json:
        print_json({"prompt": args.prompt, "completion": text, "trace": trace.to_dict(0, tokens)})
        return 0
    print()
    print(routing_summary(trace, tokens))
    return 0


def routing_summary(trace, tokens: list[str]) -> str:
    if not trace.slots:
        return "routing: no routed slots (plain stack)."
    lines = ["routing:"]
    for s in trace.slots:
        load = s.load()
        shares = ", ".join(f"{name} {share:.0%}" for name, share in zip(s.experts, load, strict=True))
        lines.append(f"  slot {s.slot} ({s.router}): {shares}")
    return "\n".join(lines)
