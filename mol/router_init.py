"""Router initialisation before (or instead of) training: uniform, random, or closed form from labelled text.

Closed form ("ridge"): run labelled text through the fused model; at each routed slot, regress a one-hot target
(the expert of each token's domain model) on exactly the features the router reads (the RMS-normalised slot
input; for a pooled router its causal running mean) by ridge regression, then pick the one temperature that
maximises the labels' likelihood. Slots are fitted in order within one forward pass, so each slot's features
come from the stream its already-initialised predecessors produce."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mol.data import NO_LABEL, DomainTokens
from mol.errors import DataError
from mol.fused import FusedModel
from mol.network.adapters import least_squares

ROUTER_INITS = ("uniform", "random", "ridge", "keep")  # keep: leave the routers as they are


@torch.no_grad()
def uniform_routers(model: FusedModel) -> None:
    """Zero projections: every expert (and every lane of an output mixture) equally likely (ties go to the
    first expert under top-k)."""
    for router in [s.router for s in model.routed_slots] + ([model.gate] if model.lanes is not None else []):
        if hasattr(router, "uniform_"):  # a kind with parameters of its own says what uniform is for it
            router.uniform_()
        elif hasattr(router, "proj"):
            router.proj.weight.zero_()
            router.proj.bias.zero_()
        else:
            raise TypeError(
                f"router kind {router.kind!r} has no `proj` and no `uniform_()` method; give it one (see "
                "mol.network.routers) to start it uniform."
            )


@torch.no_grad()
def random_routers(model: FusedModel, seed: int = 0) -> None:
    """Gaussian projections whose logits have unit standard deviation on unit-RMS inputs: arbitrary but
    decisive routing, the baseline a trained router must beat."""
    gen = torch.Generator().manual_seed(seed)
    for slot in model.routed_slots:
        w = slot.router.proj.weight
        w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1]))
        slot.router.proj.bias.zero_()


def _sample(
    tokens: Mapping[str, DomainTokens], sample_tokens: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `sample_tokens` tokens of every stream, as rows of `seq_len` (full rows only)."""
    seq_len = min([seq_len, sample_tokens] + [len(t) for t in tokens.values()])
    ids, labels = [], []
    for t in tokens.values():
        n = min(len(t), sample_tokens) // seq_len * seq_len
        ids.append(t.ids[:n].view(-1, seq_len))
        labels.append(t.labels[:n].view(-1, seq_len))
    return torch.cat(ids), torch.cat(labels)


def _targets(
    labels: torch.Tensor, label_names: list[str], aliases: list[str], domain_experts: Mapping[str, str]
) -> torch.Tensor:
    """[N, n_experts] one-hot (split evenly over several experts of one model); all zeros where unlabelled."""
    y = torch.zeros(labels.numel(), len(aliases))
    flat = labels.reshape(-1)
    for i, name in enumerate(label_names):
        alias = domain_experts.get(name)
        cols = [j for j, a in enumerate(aliases) if a == alias]
        if cols:
            y[(flat == i).nonzero(as_tuple=True)[0].unsqueeze(1), torch.tensor(cols)] = 1.0 / len(cols)
    return y


def _best_temperature(scores: torch.Tensor, target: torch.Tensor) -> float:
    """The scale s maximising mean log softmax(s * scores)[target] (a one-dimensional search)."""
    best, best_ll = 1.0, -math.inf
    for s in torch.logspace(-1, 2.5, 36).tolist():
        ll = float((torch.log_softmax(scores * s, -1) * target).sum(-1).mean())
        if ll > best_ll:
            best, best_ll = s, ll
    return best


@torch.no_grad()
def ridge_routers(
    model: FusedModel,
    tokens: Mapping[str, DomainTokens],
    domain_experts: Mapping[str, str],
    sample_tokens: int = 2048,
    seq_len: int = 256,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Closed-form router initialisation from labelled streams; returns each slot's accuracy on the sample
    (share of labelled tokens whose fitted first choice is an expert of their domain's model)."""
    if not model.routed_slots:
        return {}
    input_ids, labels = _sample(tokens, sample_tokens, seq_len)
    label_names = next(iter(tokens.values())).label_names
    report: dict[str, float] = {}

    def fit(slot, args):
        h, ctx = args[0], args[1]
        router = slot.router
        if router is None:
            return
        feats = router.features(h, ctx.mask2d)  # what the router reads (its kind says)
        x = feats.reshape(-1, feats.shape[-1]).float().cpu()
        aliases = [e.alias for e in slot.experts]
        y = _targets(labels, label_names, aliases, domain_experts)
        keep = y.sum(-1) > 0
        if int(keep.sum()) == 0 or len({tuple(r) for r in y[keep].tolist()}) < 2:
            report[f"slot {slot.index}"] = float("nan")  # the labels name fewer than two of its experts
            return
        w, b = least_squares(x[keep], y[keep], ridge=ridge)
        scores = x[keep] @ w.T + b
        s = _best_temperature(scores, y[keep])
        router.proj.weight.copy_((w * s).to(router.proj.weight))
        router.proj.bias.copy_((b * s).to(router.proj.bias))
        chosen = scores.argmax(-1)
        report[f"slot {slot.index}"] = float((y[keep].gather(1, chosen.unsqueeze(1)) > 0).float().mean())

    if not bool((labels != NO_LABEL).any()):
        raise DataError(
            "Closed-form router initialisation needs labelled text (one --data name=path per domain)."
        )
    hooks = [slot.register_forward_pre_hook(fit) for slot in model.routed_slots]
    was_training = model.training
    model.eval()
    try:
        model(
            input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids).to(model.device),
            trace=False,
        )
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return report


@torch.no_grad()
def ridge_gate(
    model: FusedModel,
    tokens: Mapping[str, DomainTokens],
    sample_tokens: int = 2048,
    seq_len: int = 256,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Closed-form initialisation of the lanes' output gate. No labels are needed: on sample text, each token's
    target is the lanes' posterior given the true next token under a uniform gate (p_l(x) / sum_k p_k(x)); the
    gate's projection is fitted to it by ridge regression on the features the gate reads, then one temperature is
    chosen to maximise the mixture's likelihood of the sample. Returns the sample's mixture NLL next to each lane's
    own and the uniform mixture's."""
    if model.lanes is None:
        return {}
    input_ids, _ = _sample(tokens, sample_tokens, seq_len)
    input_ids = input_ids.to(model.device)
    mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        ctx = model.context(mask, input_ids.shape[1], mask, None)
        finals, logp = model.run_lanes(input_ids, ctx)
    finally:
        model.train(was_training)
    names = list(model.lanes)
    ll = model.lane_token_logp(input_ids, logp)  # [B, T-1, lanes]
    if getattr(model.gate, "reads", "states") == "evidence":
        return _fit_evidence_gate(model.gate, ll.float().cpu(), names)
    ll = ll.reshape(-1, len(names)).cpu()
    posterior = ll.softmax(-1)
    feats = model.gate.features(model.gate_input(finals), mask)[:, :-1]
    x = feats.reshape(-1, feats.shape[-1]).float().cpu()
    w, b = least_squares(x, posterior, ridge=ridge)
    scores = x @ w.T + b

    def nll(s: float) -> float:
        return float(-torch.logsumexp(ll + torch.log_softmax(scores * s, -1), -1).mean())

    s = min(torch.logspace(-1, 2.5, 36).tolist(), key=nll)
    gate = model.gate.proj
    gate.weight.copy_((w * s).to(gate.weight))
    gate.bias.copy_((b * s).to(gate.bias))
    return _sample_losses(ll, names, nll(s))


def _sample_losses(ll: torch.Tensor, names: list[str], fitted: float) -> dict[str, float]:
    """The sample's mean NLL under each lane alone, the uniform mixture and the fitted gate (`ll`: [..., lanes])."""
    report = {f"{n} alone": float(-ll[..., i].mean()) for i, n in enumerate(names)}
    report["uniform mixture"] = float(-(torch.logsumexp(ll, -1) - math.log(len(names))).mean())
    report["fitted gate"] = fitted
    return report


@torch.no_grad()
def _fit_evidence_gate(gate, ll: torch.Tensor, names: list[str]) -> dict[str, float]:
    """An evidence gate's closed form is Bayes' rule itself (prior uniform, scale 1); what is fitted is how fast it
    forgets: the decay and scale with the highest mixture likelihood of the sample, by grid search. `ll` [B, T-1,
    lanes] holds each lane's log-probability of each next token."""
    device = next(gate.parameters()).device
    gate.cpu()
    e = torch.cat(
        [torch.zeros_like(ll[:, :1]), ll[:, :-1]], 1
    )  # the evidence read at t: token t's probability

    def nll() -> float:
        return float(-torch.logsumexp(ll + gate(e).log_softmax(-1), -1).mean())

    best = (math.inf, None, None)
    gate.prior.zero_()
    for decay in (0.3, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98):
        for scale in (0.5, 0.75, 1.0, 1.25):
            gate.decay_logit.fill_(math.log(decay / (1 - decay)))
            gate.scale.fill_(scale)
            value = nll()
            if value < best[0]:
                best = (value, decay, scale)
    _, decay, scale = best
    gate.decay_logit.fill_(math.log(decay / (1 - decay)))
    gate.scale.fill_(scale)
    gate.to(device)
    return {**_sample_losses(ll, names, best[0]), "decay": decay, "scale": scale}


def init_routers(
    model: FusedModel,
    method: str = "uniform",
    tokens: Mapping[str, DomainTokens] | None = None,
    domain_experts: Mapping[str, str] | None = None,
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """Initialise every router of `model` by `method` (uniform | random | ridge | keep)."""
    if method == "keep":
        return {}
    if method == "uniform":
        uniform_routers(model)
        return {}
    if method == "random":
        random_routers(model, seed)
        return {}
    if method == "ridge":
        if not tokens:
            raise DataError("Closed-form (ridge) router initialisation needs labelled text.")
        report = {}
        if model.routed_slots:
            if domain_experts is None:
                from mol.evaluation import infer_domain_experts

                domain_experts = infer_domain_experts(model, tokens)
            report = ridge_routers(model, tokens, domain_experts, **kwargs)
        if model.lanes is not None:
            report |= {f"gate: {k}": v for k, v in ridge_gate(model, tokens, **kwargs).items()}
        return report
    raise DataError(f"Unknown router initialisation '{method}'; use one of: {', '.join(ROUTER_INITS)}.")
