"""Training a fused model's adapters and routers (source blocks and embeddings stay frozen; the final norm and
head too unless `train_head`).

    result = train(Path("assets/recipes/fused-token.yaml"), ["prose=prose.txt", "code=code.txt"], TrainConfig(steps=300))

Loss: next-token cross-entropy + aux_loss_weight * Switch load balancing + z_loss_weight * router z-loss.
AdamW, linear warm-up then cosine decay, gradient accumulation, bf16 autocast on GPU (fp32 on CPU). Batch k is a
function of (seed, k) alone, so a fixed seed gives the same weights, and a resumed run the same weights as an
uninterrupted one. Launched on N processes (torchrun, accelerate: mol.distributed), `batch_size` is per process:
each takes its rows of the global batch of N x batch_size, and the result is one process's with that batch (up
to float rounding). A run writes three files next to each other (rank 0 writes them):

    W.safetensors        adapters and routers only, and the final norm and head with `train_head` (load with
                         `mol.build(recipe, weights=W)`)
    W.train.json         config, data, metrics, loss curve, hardware
    W.optim.safetensors  optimizer moments, for `resume`"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mol import distributed
from mol.data import DomainTokens, TrainBatches, load_domains, tokenize_domains
from mol.errors import CheckpointError, DataError
from mol.fused import FusedModel, MoLOutput
from mol.router_init import ROUTER_INITS, init_routers
from mol.stitch_init import STITCH_INITS, init_stitches

log = logging.getLogger(__name__)
ADAPTER_INITS = ("identity", "lstsq", "lstsq-zero-out")
DEVICE_MAPS = ("auto", "balanced", "sequential")


def _option(default, help: str, **limits):
    """A TrainConfig field with what `mol train` builds its option from (mol.commands.train): the help text and,
    for numbers, `low` / `high` (`above`: low itself excluded), for text, `choices`."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class TrainConfig:
    steps: int = _option(200, "optimizer steps", low=0)
    batch_size: int = _option(
        8, "rows per process (the global batch is this times the number of processes)", low=1, high=2**16
    )
    grad_accum: int = _option(1, "micro-batches accumulated per step", low=1, high=2**16)
    seq_len: int = _option(256, "tokens per row", low=2, high=2**20)
    mixed_share: float = _option(
        0.0, "share of training rows that interleave chunks of several domains", low=0, high=1
    )
    mixed_chunk: int = _option(128, "mean chunk length, in tokens, of those rows", low=1)
    # Adam moves every weight by about lr per step; adapters read residual streams with large channels, so small.
    lr: float = _option(3e-4, "adapter learning rate", low=0, above=True)
    router_lr: float = _option(1e-3, "router learning rate", low=0, above=True)
    warmup: int = _option(20, "linear warm-up steps", low=0)
    min_lr_ratio: float = _option(
        0.1, "final learning rate, as a share of the peak (cosine decay)", low=0, high=1
    )
    # Adapters start at a meaningful map (identity / least squares), not at zero.
    weight_decay: float = _option(0.0, "adapter weight decay", low=0)
    grad_clip: float = _option(1.0, "gradient norm clip", low=0)
    aux_loss_weight: float = _option(0.01, "weight of the Switch load-balancing loss", low=0)
    z_loss_weight: float = _option(0.0, "weight of the router z-loss", low=0)
    # Weight of KL(teacher || fused model), each token's teacher being the source model alone that serves its
    # domain label (the label picks a loss target; routers never see it). 0: plain language modelling.
    distill_weight: float = _option(
        0.0, "weight of KL to the source model serving each token's domain (0: off)", low=0
    )
    # Batch k is drawn with seed * 1_000_003 + k, which must stay inside torch's 64-bit seed range.
    seed: int = _option(0, "random seed (batches and random inits)", low=0, high=2**32 - 1)
    # lstsq-zero-out: least-squares maps into each foreign block, zero maps out of it, so every foreign block
    # starts as a no-op and the model as its base path.
    adapter_init: str = _option(
        "identity",
        "identity, lstsq (closed form, as mol calibrate), or lstsq-zero-out",
        choices=ADAPTER_INITS,
    )
    router_init: str = _option(
        "uniform", "uniform, random, ridge (closed form from the domain labels) or keep", choices=ROUTER_INITS
    )
    # lstsq: each stitch's map fitted on sample text (source state -> target state); lstsq-gradient: fitted to
    # the loss's descent direction where its update is added (mol.stitch_init). Gates stay at zero.
    stitch_init: str = _option(
        "random",
        "random (the stitches' maps as built), lstsq (closed form on sample text: source state to target "
        "state) or lstsq-gradient (to the loss's descent direction); gates stay at zero",
        choices=STITCH_INITS,
    )
    train_adapters: bool = _option(True, "train the adapters")
    train_routers: bool = _option(True, "train the routers")
    # The head trains with the adapter learning rate (`lr`), in a group of its own without weight decay; a head
    # tied to the input embedding is untied first (MoLNetwork.train_head), so the embedding stays the source's.
    train_head: bool = _option(False, "also train the base's final norm and head (for lanes: every lane's)")
    init_tokens: int = _option(
        2048, "tokens per domain for closed-form inits (least-squares adapters, ridge routers)", low=1
    )
    max_tokens: int | None = _option(None, "read at most this many tokens per domain", low=1)
    save_every: int = _option(0, "also checkpoint every N steps (0: only at the end)", low=0)
    max_seconds: float | None = _option(
        None, "stop early after this much training time (makes results speed-dependent)", low=0, above=True
    )
    device: str | None = _option(
        None, "cpu, cuda, cuda:1 (default: cuda if present; launched by torchrun: each process's own GPU)"
    )
    device_map: str | None = _option(
        None,
        "spread the frozen blocks over the GPUs (with torchrun: over each process's share of them), for "
        "sources too large for one (mol.placement)",
        choices=DEVICE_MAPS,
    )
    autocast: bool = _option(True, "bf16 autocast on GPU (CPU always runs fp32)")
    compile: bool = _option(
        False, "compile the training step (torch.compile): faster steps on a GPU after a warm-up"
    )

    def __post_init__(self) -> None:
        if self.adapter_init not in ADAPTER_INITS:
            raise DataError(f"adapter_init '{self.adapter_init}' is not one of: {', '.join(ADAPTER_INITS)}.")
        if self.router_init not in ROUTER_INITS:
            raise DataError(f"router_init '{self.router_init}' is not one of: {', '.join(ROUTER_INITS)}.")
        if self.stitch_init not in STITCH_INITS:
            raise DataError(f"stitch_init '{self.stitch_init}' is not one of: {', '.join(STITCH_INITS)}.")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1.")
        if self.steps < 0:
            raise DataError("steps must be zero or more.")
        # NaN passes every comparison, so the finite check comes first: a NaN rate would train to garbage.
        for name, low, high, open_low in (
            ("lr", 0.0, math.inf, True),
            ("router_lr", 0.0, math.inf, True),
            ("min_lr_ratio", 0.0, 1.0, False),
            ("mixed_share", 0.0, 1.0, False),
            ("weight_decay", 0.0, math.inf, False),
            ("grad_clip", 0.0, math.inf, False),
            ("aux_loss_weight", 0.0, math.inf, False),
            ("z_loss_weight", 0.0, math.inf, False),
            ("distill_weight", 0.0, math.inf, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
            if not ok or (open_low and value == low):
                bound = f"above {low:g}" if open_low else f"at least {low:g}"
                upper = f" and at most {high:g}" if math.isfinite(high) else ""
                raise DataError(f"{name} must be a finite number {bound}{upper}, got {value!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    model: FusedModel
    steps: int
    curve: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    weights_path: Path | None = None


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def companion_paths(weights: str | Path) -> tuple[Path, Path, Path]:
    """(weights, run JSON, optimizer state) of one run."""
    w = Path(weights)
    stem = w.name[: -len(".safetensors")] if w.name.endswith(".safetensors") else w.name
    return w, w.with_name(stem + ".train.json"), w.with_name(stem + ".optim.safetensors")


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


# ---- pieces of a run -------------------------------------------------------------------------------------------
def _model(model_or_recipe, config: TrainConfig) -> FusedModel:
    if isinstance(model_or_recipe, FusedModel):
        return model_or_recipe
    from mol.loading import build

    max_memory = distributed.rank_max_memory() if config.device_map else None
    return build(
        model_or_recipe,
        device=distributed.rank_device(config.device),
        dtype=torch.float32,
        device_map=config.device_map,
        max_memory=max_memory,
    )


def _tokens(model: FusedModel, datasets, config: TrainConfig) -> tuple[dict[str, DomainTokens], dict]:
    if (
        isinstance(datasets, dict)
        and datasets
        and all(isinstance(v, DomainTokens) for v in datasets.values())
    ):
        return dict(datasets), {n: {"tokens": len(t)} for n, t in datasets.items()}
    domains = load_domains(datasets)
    tokens = tokenize_domains(model.tokenizer, domains, max_tokens=config.max_tokens)
    described = {d.name: {"paths": [str(p) for p in d.paths], "tokens": len(tokens[d.name])} for d in domains}
    return tokens, described


def _param_groups(model: FusedModel, config: TrainConfig) -> list[dict]:
    if config.train_head:
        model.train_head()
    adapters, routers, head = [], [], []
    heads = model.head_names()
    for name, p in model.trainable_parameters().items():
        owner, leaf = name.rsplit(".", 1)
        if leaf in getattr(model.get_submodule(owner), "fixed", ()):
            continue  # fixed by design, e.g. a bottleneck adapter's calibrated map
        if name in heads:
            head.append((name, p))
        else:
            (routers if ".router." in name or name.startswith("gate.") else adapters).append((name, p))
    for part, on in (
        (adapters, config.train_adapters),
        (routers, config.train_routers),
        (
            head,
            config.train_head,
        ),  # a head trained by an earlier run stays as it is unless this one trains it
    ):
        for _, p in part:
            p.requires_grad_(on)  # switched on again by a later run that trains it
    wanted = (
        (config.train_adapters, adapters, config.lr, config.weight_decay),
        (config.train_routers, routers, config.router_lr, 0.0),
        (config.train_head, head, config.lr, 0.0),
    )
    return [
        {
            "params": [p for _, p in part],
            "names": [n for n, _ in part],
            "lr": lr,
            "base_lr": lr,
            "weight_decay": decay,
        }
        for on, part, lr, decay in wanted
        if on and part
    ]


def initialise(
    model: FusedModel,
    tokens: dict[str, DomainTokens],
    config: TrainConfig,
    domain_experts: dict[str, str] | None = None,
) -> dict:
    """Adapters (identity as built, or least squares), stitches (as built, or least squares), then routers
    (uniform, random or ridge), in that order: the closed-form router reads the stream the initialised adapters
    make (a stitch's gate stays at zero, so its fit changes no stream)."""
    report: dict = {}
    adapted = [e for s in model.slots for e in s.experts if e.adapter is not None]
    if config.adapter_init.startswith("lstsq") and adapted:
        from mol.calibration import calibrate

        tok = model.tokenizer
        texts = [tok.decode(t.ids[: config.init_tokens].tolist()) for t in tokens.values()]
        report["adapter_fit"] = calibrate(model, texts, max_tokens=config.init_tokens * len(texts))
    if config.adapter_init == "lstsq-zero-out":
        for e in adapted:
            silence_adapter_output(e.adapter)
    if config.stitch_init != "random" and model.lanes is not None and len(model.stitches):
        report["stitch_fit"] = init_stitches(
            model, config.stitch_init, tokens, sample_tokens=config.init_tokens, seq_len=config.seq_len
        )
    if config.router_init == "ridge" and model.routed_slots and domain_experts is None:
        from mol.evaluation import infer_domain_experts

        domain_experts = infer_domain_experts(model, tokens)
    if domain_experts is not None:
        report["domain_experts"] = dict(domain_experts)
    report["router_fit"] = init_routers(
        model, config.router_init, tokens, domain_experts, seed=config.seed, sample_tokens=config.init_tokens
    )
    return report


@torch.no_grad()
def silence_adapter_output(adapter: torch.nn.Module) -> None:
    """Zero the map out of a foreign block (its update no longer reaches the stream) while the map into it keeps
    its fit, so training starts from the base path and the block's gradient is already meaningful."""
    for name in ("out_of_block", "out_up"):
        layer = getattr(adapter, name, None)
        if layer is not None:
            layer.weight.zero_()
    fixed = getattr(adapter, "out_base", None)
    if fixed is not None:
        fixed.zero_()


class Teachers:
    """The source models alone that serve each domain label; `kl` is the distillation loss against them."""

    def __init__(
        self, model: FusedModel, tokens: dict[str, DomainTokens], domain_experts: dict[str, str] | None
    ):
        from mol.evaluation import infer_domain_experts, source_model

        if not domain_experts:
            domain_experts = infer_domain_experts(model, tokens)
        names = next(iter(tokens.values())).label_names
        self.experts = {n: a for n, a in domain_experts.items() if n in names}
        if not self.experts:
            raise DataError(
                "Distillation needs domain labels that name a source model (e.g. --expert prose=bard)."
            )
        self.label_alias = {names.index(n): a for n, a in self.experts.items()}
        self.models = {a: source_model(model, a).requires_grad_(False) for a in set(self.experts.values())}

    def kl(self, student_logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over labelled tokens of KL(teacher || student), next-token distributions."""
        total, count = self.kl_terms(student_logits, ids, labels)
        return total / count.clamp(min=1)

    def kl_terms(
        self, student_logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over labelled tokens of KL(teacher || student), their number)."""
        labels = labels.to(student_logits.device)
        target = torch.zeros_like(student_logits, dtype=torch.float32)
        have = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        with torch.no_grad():
            for alias, teacher in self.models.items():
                sel = torch.zeros_like(have)
                for label, a in self.label_alias.items():
                    if a == alias:
                        sel |= labels == label
                if sel.any():
                    target[sel] = teacher(ids).logits.float().log_softmax(-1)[sel]
                    have |= sel
        count = have.sum()
        if not have.any():
            return student_logits.new_zeros((), dtype=torch.float32), count
        log_q = student_logits.float().log_softmax(-1)[have]
        log_p = target[have]
        return (log_p.exp() * (log_p - log_q)).sum(), count


def loss_shares(
    out: MoLOutput, kl: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """This process's share of each loss term (lm, kl, aux, z) of the global batch: summed over the processes,
    each is the term one process computes on the whole batch (alone: the term itself), so the summed gradients
    are that process's gradient. Means over tokens divide by global counts. The Switch loss N·Σ f_i·P_i is not a
    mean of per-row terms: its expert counts (f) and token count are all-reduced first, and each process adds its
    part of P. Training rows are packed (no padding), so every row scores seq_len - 1 tokens and routes seq_len."""
    dev = out.logits.device
    rows, length = out.logits.shape[:2]
    routings = [r for _, r in out.routings]
    # expert counts by scatter_add, not bincount: no host synchronisation on a GPU
    counts = [
        torch.zeros(r.probs.shape[-1], device=r.chosen.device)
        .scatter_add_(0, r.chosen.reshape(-1), torch.ones(r.chosen.numel(), device=r.chosen.device))
        .to(dev)
        for r in routings
    ]
    local = torch.cat(
        [
            torch.tensor([float(rows)], device=dev),
            torch.zeros(1, device=dev) if kl is None else kl[1].to(dev, torch.float32).reshape(1),
            *counts,
        ]
    )
    total = distributed.all_reduce_sum(local)
    zero = out.logits.new_zeros((), dtype=torch.float32)
    shares = {"lm": out.loss * (rows / total[0]), "kl": zero if kl is None else kl[0] / total[1].clamp(min=1)}
    tokens = total[0] * length
    aux, z, at = [], [], 2
    for r in routings:
        n, k = r.probs.shape[-1], r.chosen.shape[-1]
        f = total[at : at + n] / (tokens * k)
        at += n
        aux.append(n * (f * (r.probs.float().reshape(-1, n).sum(0).to(dev) / tokens)).sum())
        z.append(torch.logsumexp(r.logits.float(), dim=-1).pow(2).sum().to(dev) / tokens)
    shares["aux"] = torch.stack(aux).mean() if aux else zero
    shares["z"] = torch.stack(z).mean() if z else zero
    return shares


def _save(model: FusedModel, opt: torch.optim.Optimizer, weights: Path, run: dict) -> None:
    from mol.weights import save_trainable

    w, run_json, optim_path = companion_paths(weights)
    save_trainable(model, w, metadata={"step": run["step"], "config": run["config"]})
    state = {}
    for group in opt.param_groups:
        for name, p in zip(group["names"], group["params"], strict=True):
            s = opt.state.get(p)
            if s:
                state[f"exp_avg/{name}"] = s["exp_avg"].detach().cpu().contiguous()
                state[f"exp_avg_sq/{name}"] = s["exp_avg_sq"].detach().cpu().contiguous()
                state[f"step/{name}"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1).cpu()
    tmp = optim_path.with_name(optim_path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(optim_path)
    tmp = run_json.with_name(run_json.name + ".tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_json)


def _restore(model: FusedModel, opt: torch.optim.Optimizer, weights: Path) -> dict:
    from mol.weights import load_trainable

    w, run_json, optim_path = companion_paths(weights)
    if not run_json.is_file() or not optim_path.is_file():
        raise CheckpointError(
            f"Cannot resume: '{run_json.name}' or '{optim_path.name}' is missing beside '{w}'."
        )
    load_trainable(model, w)
    run = json.loads(run_json.read_text(encoding="utf-8"))
    state = load_file(str(optim_path))
    for group in opt.param_groups:
        for name, p in zip(group["names"], group["params"], strict=True):
            if f"exp_avg/{name}" in state:
                opt.state[p] = {
                    "step": state[f"step/{name}"].reshape(()).clone(),
                    "exp_avg": state[f"exp_avg/{name}"].to(p),
                    "exp_avg_sq": state[f"exp_avg_sq/{name}"].to(p),
                }
    return run


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="train"
    )


# ---- the loop --------------------------------------------------------------------------------------------------
def train(
    model_or_recipe,
    datasets,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    domain_experts: dict[str, str] | None = None,
    on_step=None,
    should_stop=None,
) -> TrainResult:
    """Train the adapters and routers of a fused model (or of a Recipe, a Path to a recipe file, or recipe YAML
    text) on named datasets (`--data` strings, a mapping name -> paths, or tokenised streams). With `out`, save
    the run there; with
    `resume`, continue the run saved at `out` up to `config.steps`. `on_step(point)` is called after every
    optimizer step with that step's point of the loss curve (step, loss, aux_loss, z_loss, lr_factor,
    grad_norm, seconds), as it is appended to the run. `should_stop()` is asked after every step: once it says
    True the run ends there and is saved like a finished one (a cooperative stop, e.g. the studio's Stop)."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    model = _model(model_or_recipe, config)
    if out is None and isinstance(model_or_recipe, Path):  # weights next to the recipe file
        out = model_or_recipe.with_suffix(".safetensors")
    tokens, data_description = _tokens(model, datasets, config)
    world = distributed.world_size()
    # The global batch, drawn whole by every process, which keeps its own rows (distributed.rank_rows): the data
    # order is the one of a single process with batch_size x world.
    batches = TrainBatches(
        tokens, config.seq_len, config.batch_size * world, config.seed, config.mixed_share, config.mixed_chunk
    )

    run: dict = {
        "recipe": model.recipe.to_yaml(),
        "config": asdict(config),
        "data": data_description,
        "hardware": hardware(),
        "world_size": world,
        "torch": torch.__version__,
        "step": 0,
        "curve": [],
        "metrics": {},
    }
    resumed = resume and out is not None and companion_paths(out)[1].is_file()
    seen = distributed.count_ranks(resumed)
    if 0 < seen < world:  # all ranks raise together rather than diverge
        raise CheckpointError(
            f"Cannot resume: {seen} of {world} processes see the run saved at '{out}'; put --out "
            "on a filesystem every node shares."
        )
    if not resumed:
        run["init"] = initialise(model, tokens, config, domain_experts)
        domain_experts = run["init"].get("domain_experts", domain_experts)
    groups = _param_groups(model, config)
    if not groups and config.steps > 0:
        raise DataError(
            "Nothing to train: the recipe has no adapters or routers (or both are switched off); "
            "train_head (--train-head) also trains the final norm and head."
        )
    opt = torch.optim.AdamW(groups or [{"params": [], "names": []}], betas=(0.9, 0.95), eps=1e-8)
    if resumed:
        saved = _restore(model, opt, Path(out))
        run.update(
            {k: saved[k] for k in ("step", "curve", "init", "metrics", "distill_teachers") if k in saved}
        )
        run["metrics"].setdefault("train_seconds", 0.0)
        domain_experts = (
            domain_experts or saved.get("distill_teachers") or saved.get("init", {}).get("domain_experts")
        )
        before = saved["config"]["batch_size"] * saved.get("world_size", 1)
        if before != config.batch_size * world:
            log.warning(
                "resuming with a global batch of %d rows, the run had %d: the data order changes",
                config.batch_size * world,
                before,
            )
    # Identical starting weights on every process, whatever each one's closed-form fits computed.
    distributed.broadcast_parameters(list(model.trainable_parameters().values()))
    teachers = None
    if config.distill_weight > 0:
        teachers = Teachers(model, tokens, domain_experts)
        run["distill_teachers"] = teachers.experts
    if config.compile:  # after the closed-form initialisation, whose calibration hooks run eagerly
        from mol.compiling import compile_network

        compile_network(model)
    start = int(run["step"])
    params = [p for g in groups for p in g["params"]]
    device = model.device
    autocast = device.type == "cuda" and config.autocast
    tokens_per_step = config.batch_size * world * config.grad_accum * config.seq_len
    seconds = float(run["metrics"].get("train_seconds", 0.0))
    bar = _progress(config.steps, start, progress and distributed.is_main())
    smooth = None
    step = start
    model.eval()  # no dropout anywhere: frozen source blocks must behave exactly as at inference
    try:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            factor = lr_factor(step, config)
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", 0.0) * factor
            shown = torch.zeros(3, device=device)  # this process's shares of the step's lm, aux and z losses
            for micro in range(config.grad_accum):
                ids, labels = batches.batch(step * config.grad_accum + micro)
                ids, labels = distributed.rank_rows(ids).to(device), distributed.rank_rows(labels)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    out_ = model(ids, labels=ids, trace=False)  # no host copy of the routing at every step
                    kl = teachers.kl_terms(out_.logits, ids, labels) if teachers is not None else None
                terms = loss_shares(out_, kl)
                loss = (
                    terms["lm"]
                    + config.distill_weight * terms["kl"]
                    + config.aux_loss_weight * terms["aux"]
                    + config.z_loss_weight * terms["z"]
                )
                (loss / config.grad_accum).backward()
                shown += (
                    torch.stack([terms[k].detach().float() for k in ("lm", "aux", "z")]) / config.grad_accum
                )
            distributed.sum_gradients(params)  # on every process: the gradient of the global batch's loss
            lm_sum, aux_sum, z_sum = distributed.all_reduce_sum(shown).tolist()
            # clipped by the global norm, the same on every process (the gradients are already summed)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip)) if params else 0.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            seconds += dt
            run["curve"].append(
                {
                    "step": step + 1,
                    "loss": round(lm_sum, 5),
                    "aux_loss": round(aux_sum, 5),
                    "z_loss": round(z_sum, 5),
                    "lr_factor": round(factor, 5),
                    "grad_norm": round(grad_norm, 4),
                    "seconds": round(seconds, 3),
                }
            )
            if on_step is not None:
                on_step(dict(run["curve"][-1]))
            smooth = lm_sum if smooth is None else 0.9 * smooth + 0.1 * lm_sum
            bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{tokens_per_step / max(dt, 1e-9):,.0f}")
            bar.update(1)
            run["step"] = step + 1
            run["metrics"]["train_seconds"] = round(seconds, 3)
            if (
                out is not None
                and config.save_every
                and (step + 1) % config.save_every == 0
                and distributed.is_main()
            ):
                _save(model, opt, Path(out), run)
            if config.max_seconds is not None and distributed.any_rank(seconds >= config.max_seconds):
                log.warning("stopping after %d steps: max_seconds=%s reached", step + 1, config.max_seconds)
                break
            if should_stop is not None and distributed.any_rank(bool(should_stop())):
                log.warning("stopping after %d steps: asked to stop", step + 1)
                break
    finally:
        bar.close()
        if config.compile:  # the compiled step suits training; generation keeps its own paths
            from mol.compiling import uncompile_network

            uncompile_network(model)
    done = int(run["step"])
    trained = done - start
    run["metrics"].update(
        {
            "steps": done,
            "tokens": done * tokens_per_step,
            "tokens_per_second": round(trained * tokens_per_step / max(seconds, 1e-9), 1)
            if trained
            else None,
            "final_loss": run["curve"][-1]["loss"] if run["curve"] else None,
            "trainable_parameters": sum(
                p.numel() for p in model.trainable_parameters().values() if p.requires_grad
            ),
        }
    )
    result = TrainResult(model=model, steps=done, curve=run["curve"], metrics=run["metrics"])
    if out is not None:
        if distributed.is_main():
            _save(model, opt, Path(out), run)
        distributed.barrier()  # every process returns once the run's files are there
        result.weights_path = Path(out)
    return result


__all__ = [
    "ADAPTER_INITS",
    "TrainConfig",
    "TrainResult",
    "companion_paths",
    "initialise",
    "loss_shares",
    "lr_factor",
    "train",
]
