"""Evaluation: per-domain perplexity, router agreement with the domain labels and expert load per routed slot,
always side by side with every source model alone on the same tokens.

    report = evaluate(Path("assets/recipes/fused-token.yaml"), ["prose=test.txt", "code=test.py"], weights="w.safetensors")
    print(report.table())
    report.write("eval.json", "eval.csv")

Perplexity is exp(mean next-token NLL) over consecutive non-overlapping windows of `seq_len` tokens (each
window starts with an empty context; its first token is not scored). Every model reads exactly the same windows.
A domain's matching expert ("prose" -> the model whose blocks serve prose) is the source model with the lowest
loss on that domain, unless given."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mol import distributed
from mol.data import NO_LABEL, DomainTokens, load_domains, tokenize_domains, windows
from mol.fused import FusedModel
from mol.recipe import ExpertRef, Recipe, Slot

DEFAULT_SEQ_LEN = 512


@dataclass
class DomainResult:
    tokens: int
    loss: float
    perplexity: float
    agreement: dict[str, float] = field(default_factory=dict)  # routed slot index -> share of labelled tokens
    load: dict[str, dict[str, float]] = field(default_factory=dict)  # slot index -> expert -> share of tokens


@dataclass
class ModelResult:
    name: str
    kind: str  # "fused" | "oracle" | "source"
    trainable_parameters: int
    domains: dict[str, DomainResult] = field(default_factory=dict)


@dataclass
class EvalReport:
    recipe: str
    weights: str | None
    seq_len: int
    domain_experts: dict[str, str]
    rows: list[ModelResult]

    def row(self, name: str) -> ModelResult:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "weights": self.weights,
            "seq_len": self.seq_len,
            "domain_experts": self.domain_experts,
            "rows": [asdict(r) for r in self.rows],
        }

    def csv_rows(self) -> list[dict]:
        """Long format: one row per (model, domain, metric[, slot, expert])."""
        out = []
        for r in self.rows:
            for dom, res in r.domains.items():
                base = {"model": r.name, "kind": r.kind, "domain": dom}
                out.append(
                    {**base, "metric": "perplexity", "slot": "", "expert": "", "value": res.perplexity}
                )
                out.append({**base, "metric": "loss", "slot": "", "expert": "", "value": res.loss})
                out.append({**base, "metric": "tokens", "slot": "", "expert": "", "value": res.tokens})
                for slot, share in res.agreement.items():
                    out.append({**base, "metric": "agreement", "slot": slot, "expert": "", "value": share})
                for slot, shares in res.load.items():
                    for expert, share in shares.items():
                        out.append({**base, "metric": "load", "slot": slot, "expert": expert, "value": share})
        return out

    def write(self, json_path: str | Path | None = None, csv_path: str | Path | None = None) -> None:
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        if csv_path is not None:
            Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
            with open(csv_path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(
                    fh, fieldnames=["model", "kind", "domain", "metric", "slot", "expert", "value"]
                )
                writer.writeheader()
                writer.writerows(self.csv_rows())

    def table(self) -> str:
        return report_table(self.to_dict())


# ---- scoring ----------------------------------------------------------------------------------------------
@dataclass
class _Tally:
    nll: float = 0.0
    tokens: int = 0
    load: dict[int, torch.Tensor] = field(default_factory=dict)
    hits: dict[int, int] = field(default_factory=dict)
    labelled: dict[int, int] = field(default_factory=dict)


MIXTURE = -1  # the trace's row for a lanes model's output mixture (its experts: the lanes)


def _lane_aliases(model: FusedModel) -> list[str]:
    """Each lane's base model, in lane order: the "experts" of the output mixture."""
    return [model.plan.lanes[name].recipe.base for name in model.lanes]


def _expert_aliases(model: FusedModel, slot_index: int) -> list[str]:
    if slot_index == MIXTURE:
        return _lane_aliases(model)
    return [e.alias for e in _slot(model, slot_index).experts]


def _slot(model: FusedModel, slot_index: int):
    return next(s for s in model.all_slots if s.index == slot_index)


def _slot_key(slot_index: int) -> str:
    return "mixture" if slot_index == MIXTURE else str(slot_index)


@torch.no_grad()
def score(
    model: FusedModel,
    tokens: DomainTokens,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    label_experts: Mapping[str, str] | None = None,
    on_batch=None,
) -> DomainResult:
    """Perplexity of `model` on one token stream; agreement of each routed slot's first choice with the model
    named for each token's label in `label_experts`, and each slot's expert load. Launched on several processes
    (mol.distributed), each scores its share of the batches of windows and every one returns the whole result,
    that of one process: the same batches, their losses added in the same order, counts exact."""
    w = windows(tokens, seq_len)
    label_alias = {i: (label_experts or {}).get(n) for i, n in enumerate(tokens.label_names)}
    tally = _Tally()
    starts = range(0, w.input_ids.shape[0], batch_size)
    batch_nll = torch.zeros(
        len(starts), dtype=torch.float64
    )  # per batch, scored by one process (0 elsewhere)
    was_training = model.training
    model.eval()
    try:
        for b in distributed.rank_items(len(starts)):
            start = starts[b]
            ids = w.input_ids[start : start + batch_size]
            mask = w.attention_mask[start : start + batch_size]
            labels = w.labels[start : start + batch_size]
            if on_batch is not None:
                on_batch(labels)
            out = model(ids, attention_mask=mask)
            logits = out.logits[:, :-1].float()
            target = ids[:, 1:].to(logits.device)
            keep = (mask[:, 1:] * mask[:, :-1]).bool().to(logits.device)
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            batch_nll[b] = float(nll[keep].sum())
            tally.tokens += int(keep.sum())
            _tally_routing(model, out.trace, mask.bool(), labels, label_alias, tally)
    finally:
        model.train(was_training)
    if distributed.active():
        _gather(model, tally, batch_nll)
    for value in batch_nll.tolist():  # in batch order, as one process adds them
        tally.nll += value
    loss = tally.nll / max(tally.tokens, 1)
    result = DomainResult(tokens=tally.tokens, loss=loss, perplexity=math.exp(min(loss, 50.0)))
    for slot, counts in tally.load.items():
        names = list(model.lanes) if slot == MIXTURE else _slot(model, slot).expert_names
        total = float(counts.sum()) or 1.0
        key = _slot_key(slot)
        result.load[key] = {n: float(c) / total for n, c in zip(names, counts.tolist(), strict=True)}
        if tally.labelled.get(slot):
            result.agreement[key] = tally.hits[slot] / tally.labelled[slot]
    return result


def _gather(model: FusedModel, tally: _Tally, batch_nll: torch.Tensor) -> None:
    """Sum every process's tally into each one (in place): one all-reduce for the per-batch losses (each batch has
    one nonzero entry, so the sum is exact), one for the counts, laid out by routed slot (a process that scored
    no batch has seen no slot)."""
    batch_nll.copy_(distributed.all_reduce_sum(batch_nll))
    slots = [(s.index, len(s.experts)) for s in model.routed_slots]
    if model.lanes is not None:
        slots.append((MIXTURE, len(model.lanes)))
    counts = torch.cat(
        [torch.tensor([tally.tokens])]
        + [
            torch.cat(
                [
                    tally.load.get(i, torch.zeros(n, dtype=torch.long)),
                    torch.tensor([tally.hits.get(i, 0), tally.labelled.get(i, 0), int(i in tally.load)]),
                ]
            )
            for i, n in slots
        ]
    )
    counts = distributed.all_reduce_sum(counts).tolist()
    tally.tokens, at = counts[0], 1
    for i, n in slots:
        load, (hits, labelled, seen) = counts[at : at + n], counts[at + n : at + n + 3]
        at += n + 3
        if seen:
            tally.load[i] = torch.tensor(load, dtype=torch.long)
        if labelled:
            tally.hits[i], tally.labelled[i] = hits, labelled


def _tally_routing(model, trace, mask, labels, label_alias, tally: _Tally) -> None:
    for st in trace.slots:
        first = st.chosen[..., 0]
        n = len(st.experts)
        counts = torch.bincount(st.chosen[mask].reshape(-1).long(), minlength=n)
        tally.load[st.slot] = tally.load.get(st.slot, torch.zeros(n, dtype=torch.long)) + counts
        aliases = _expert_aliases(model, st.slot)
        hits = labelled = 0
        for label, alias in label_alias.items():
            if alias is None or alias not in aliases:
                continue
            sel = mask & (labels == label)
            if not sel.any():
                continue
            chosen_alias_ok = torch.tensor([a == alias for a in aliases])[first[sel].long()]
            hits += int(chosen_alias_ok.sum())
            labelled += int(sel.sum())
        if labelled:
            tally.hits[st.slot] = tally.hits.get(st.slot, 0) + hits
            tally.labelled[st.slot] = tally.labelled.get(st.slot, 0) + labelled


# ---- the oracle: route by the true label -----------------------------------------------------------------
class LabelRouter(nn.Module):
    """Stands in for a slot's router: each token goes to the expert of its label's model; tokens whose label
    names no expert of this slot keep the original router's choice."""

    kind = "token"  # decides per token, never from a cached per-sequence state (as the trace shows it)
    per_sequence = False
    takes_top_k = True
    top_k = 1

    def __init__(self, original: nn.Module, expert_for_label: dict[int, int]):
        super().__init__()
        self.original = original
        # fed what the gate it stands in for reads
        self.reads = getattr(original, "reads", "states")
        self.expert_for_label = expert_for_label
        self.labels: torch.Tensor | None = None

    def forward(
        self, h: torch.Tensor, attention_mask: torch.Tensor | None = None, state: dict | None = None
    ) -> torch.Tensor:
        """Scores that put all the probability on the chosen expert (its routing weight is then exactly 1)."""
        scores = self.original(h, attention_mask)
        chosen = scores.argmax(-1)
        if self.labels is not None:
            labels = self.labels.to(h.device)
            for label, expert in self.expert_for_label.items():
                chosen[labels == label] = expert
        probs = nn.functional.one_hot(chosen, scores.shape[-1]).float()
        return torch.log(probs.clamp(min=1e-9))


@contextlib.contextmanager
def route_by_label(model: FusedModel, label_names: list[str], label_experts: Mapping[str, str]) -> Iterator:
    """Within the block every routed slot (and a lanes model's output mixture) follows the labels; yields
    `set_labels(labels [B, T])`."""
    # every routed slot's router, and a lanes model's output gate (its experts: the lanes' models)
    routers = [(slot, "router", slot.index) for slot in model.routed_slots]
    if model.lanes is not None:
        routers.append((model, "gate", MIXTURE))
    swapped = []
    for owner, attr, index in routers:
        aliases = _expert_aliases(model, index)
        mapping = {
            i: aliases.index(label_experts[n])
            for i, n in enumerate(label_names)
            if label_experts.get(n) in aliases
        }
        original = getattr(owner, attr)
        swapped.append((owner, attr, original))
        setattr(owner, attr, LabelRouter(original, mapping))

    def set_labels(labels: torch.Tensor) -> None:
        for owner, attr, _ in swapped:
            getattr(owner, attr).labels = labels

    try:
        yield set_labels
    finally:
        for owner, attr, original in swapped:
            setattr(owner, attr, original)


# ---- source models alone ---------------------------------------------------------------------------------
def source_recipe(model: FusedModel, alias: str) -> Recipe:
    """The identity recipe of one source: all its layers in order, itself the base."""
    src = model.plan.sources[alias]
    return Recipe(
        name=alias,
        base=alias,
        models={alias: str(src.folder)},
        slots=[Slot((ExpertRef(alias, i),)) for i in range(src.num_layers)],
    )


def source_model(model: FusedModel, alias: str) -> FusedModel:
    from mol.loading import build
    from mol.planning import plan

    the_plan = plan(source_recipe(model, alias), sources={alias: model.plan.sources[alias]})
    return build(the_plan, device=model.device, dtype=torch.float32, load_tokenizer=False)


def routed_aliases(model: FusedModel) -> list[str]:
    """The models a router or the output mixture chooses between."""
    seen: list[str] = _lane_aliases(model) if model.lanes is not None else []
    for slot in model.routed_slots:
        for e in slot.experts:
            if e.alias not in seen:
                seen.append(e.alias)
    return seen


def match_domains(losses: Mapping[str, Mapping[str, float]], candidates: list[str]) -> dict[str, str]:
    """domain -> the candidate model with the lowest loss on it. `losses` is alias -> domain -> loss."""
    domains = {d for per in losses.values() for d in per}
    out = {}
    for d in sorted(domains):
        scored = [(losses[a][d], a) for a in candidates if a in losses and d in losses[a]]
        if scored:
            out[d] = min(scored)[1]
    return out


def infer_domain_experts(
    model: FusedModel, tokens: Mapping[str, DomainTokens], sample_tokens: int = 4096, seq_len: int = 256
) -> dict[str, str]:
    """Which routed model serves each (single-label) domain: the one whose source model alone has the lowest loss
    on the first `sample_tokens` tokens of it."""
    pure = {n: t for n, t in tokens.items() if n in t.label_names}
    losses: dict[str, dict[str, float]] = {}
    for alias in routed_aliases(model):
        src = source_model(model, alias)
        losses[alias] = {n: score(src, _head(t, sample_tokens), seq_len).loss for n, t in pure.items()}
        del src
    return match_domains(losses, routed_aliases(model))


def _head(t: DomainTokens, n: int) -> DomainTokens:
    return DomainTokens(t.name, t.ids[:n], t.labels[:n], t.label_names)


# ---- the whole comparison --------------------------------------------------------------------------------
def _as_model(model_or_recipe, weights, device) -> FusedModel:
    if isinstance(model_or_recipe, FusedModel):
        if weights is not None:
            from mol.weights import load_trainable

            load_trainable(model_or_recipe, weights)
        return model_or_recipe
    from mol.loading import build

    return build(
        model_or_recipe, device=distributed.rank_device(device), dtype=torch.float32, weights=weights
    )


def count_trainable(model: FusedModel) -> int:
    return sum(p.numel() for p in model.trainable_parameters().values() if p.requires_grad)


def evaluate(
    model_or_recipe,
    datasets,
    *,
    weights: str | Path | None = None,
    sources: bool = True,
    oracle: bool = False,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    max_tokens: int | None = None,
    domain_experts: Mapping[str, str] | None = None,
    device: str | None = None,
    name: str | None = None,
    on_progress=None,
) -> EvalReport:
    """Evaluate a fused model (or a Recipe, a Path to a recipe file, or recipe YAML text) on named datasets
    (`--data` strings, a mapping name -> paths, or tokenised streams); with `sources`, every routed source model
    alone on the same tokens; with `oracle`,
    the same recipe routed by the true labels (every routed slot, and a lanes recipe's output mixture, sends each
    token to its label's model). `on_progress(done, total, what)` is called after each model has
    scored each dataset."""
    model = _as_model(model_or_recipe, weights, device)
    tokens = _as_tokens(model, datasets, max_tokens)
    alone = []  # source models scored alone: shown with `sources`, needed to pick the oracle's domain experts
    if sources or oracle or domain_experts is None:
        alone = model.recipe.used_aliases if sources else routed_aliases(model)
    routes = bool(model.routed_slots) or model.lanes is not None
    total = len(tokens) * (len(alone) + 1 + int(oracle and routes))
    done = 0

    def scored(what: str, dom: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, f"{what} on {dom}")

    source_rows = []
    for alias in alone:
        src = source_model(model, alias)
        row = ModelResult(f"{alias} alone", "source", 0)
        for dom, t in tokens.items():
            row.domains[dom] = score(src, t, seq_len, batch_size)
            scored(row.name, dom)
        source_rows.append((alias, row))
        del src
    if domain_experts is None:
        losses = {
            a: {d: r.domains[d].loss for d in tokens if d in tokens[d].label_names} for a, r in source_rows
        }
        domain_experts = match_domains(losses, routed_aliases(model))
    domain_experts = dict(domain_experts)

    rows = [ModelResult(name or model.recipe.name, "fused", count_trainable(model))]
    for dom, t in tokens.items():
        rows[0].domains[dom] = score(model, t, seq_len, batch_size, domain_experts)
        scored(rows[0].name, dom)
    if oracle and routes:
        row = ModelResult(f"{name or model.recipe.name} oracle", "oracle", count_trainable(model))
        for dom, t in tokens.items():
            with route_by_label(model, t.label_names, domain_experts) as set_labels:
                row.domains[dom] = score(model, t, seq_len, batch_size, domain_experts, on_batch=set_labels)
            scored(row.name, dom)
        rows.append(row)
    if sources:
        rows.extend(r for _, r in source_rows)
    return EvalReport(
        recipe=model.recipe.name,
        weights=None if weights is None else str(weights),
        seq_len=seq_len,
        domain_experts=domain_experts,
        rows=rows,
    )


def _as_tokens(model: FusedModel, datasets, max_tokens: int | None) -> dict[str, DomainTokens]:
    if (
        isinstance(datasets, Mapping)
        and datasets
        and all(isinstance(v, DomainTokens) for v in datasets.values())
    ):
        return dict(datasets)
    return tokenize_domains(model.tokenizer, load_domains(datasets), max_tokens=max_tokens)


__all__ = [
    "DomainResult",
    "EvalReport",
    "LabelRouter",
    "ModelResult",
    "NO_LABEL",
    "evaluate",
    "infer_domain_experts",
    "match_domains",
    "route_by_label",
    "score",
    "source_model",
    "source_recipe",
]


def report_table(results: dict) -> str:
    """An evaluation (EvalReport.to_dict(), as stored) as Markdown: perplexity per domain (rows: models), then each
    routed slot's agreement with the labels and its load. The CLI prints it; the studio shows it."""
    rows = results.get("rows") or []
    if not rows:
        return ""
    domains = list(rows[0]["domains"])
    lines = [
        "| model | " + " | ".join(f"{d} perplexity" for d in domains) + " | trainable parameters |",
        "|---|" + "---:|" * len(domains) + "---:|",
    ]
    for r in rows:
        cells = [f"{r['domains'][d]['perplexity']:.2f}" for d in domains]
        lines.append(
            f"| {r['name']} ({r['kind']}) | " + " | ".join(cells) + f" | {r['trainable_parameters']:,} |"
        )
    notes = []
    for r in rows:
        for d in domains:
            res = r["domains"][d]
            for slot, shares in (res.get("load") or {}).items():
                agree = (res.get("agreement") or {}).get(slot)
                load = ", ".join(f"{e} {s:.0%}" for e, s in shares.items())
                notes.append(
                    f"- {r['name']} on {d}, slot {slot}: "
                    + (f"agreement with labels {agree:.0%}; " if agree is not None else "")
                    + f"load {load}"
                )
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")
