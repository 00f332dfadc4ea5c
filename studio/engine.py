"""The studio's engine: everything the UI does that is not UI. It calls `mol` (cards, plans, builds,
generation) and the repository (`studio.db`), and keeps built models in a small process-wide LRU cache keyed
by recipe version (versions are append-only, so a version id names one model for ever). Models never live in
`gr.State`: that would copy them per session."""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mol
from mol.access import LOCAL, AccessPolicy
from mol.errors import DataError, MolError, ResourceError
from mol.planning import Plan
from mol.recipe import MixtureSpec, Recipe
from mol.sources import load_source
from mol.trace import SlotTrace, Trace
from studio.errors import (
    InputError,
    ReportedError,
    flag,
    public_text,
    real,
    record_id,
    report_internal,
    whole,
)
from studio.jobs import Job, JobBoard, JobStopped
from studio.limits import Limits, hosted, hosted_policy, hub_allowed_from_env, model_dirs_from_env

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

try:  # Hugging Face ZeroGPU: the decorator borrows a GPU for the call; elsewhere it is a no-op
    import spaces

    gpu_task: Callable = spaces.GPU
except ImportError:  # not on a Space: run on whatever device is there (CPU here)

    def gpu_task(fn: Callable) -> Callable:
        return fn


@dataclass
class StudioConfig:
    """Where things are and how much a request may ask for. Hosted mode (a Space, or MANGO_HOSTED=1; see
    studio.limits): models only from the embedded folder and `model_dirs` (the Hub with `allow_hub`), no
    pickles, no remote code, and `limits` on every request. `access_policy()` is what the engine passes to
    every plan, build and model card; the library reads none of these settings itself."""

    models_dir: Path = REPO_ROOT / "assets" / "models"
    recipes_dir: Path = REPO_ROOT / "assets" / "recipes"
    corpora_dir: Path = REPO_ROOT / "assets" / "corpora"
    data_dir: Path | None = None  # trained weights go under it; None: the database's data folder
    db_url: str | None = None
    hosted: bool = False
    model_dirs: list[Path] = field(default_factory=list)  # hosted: allowed besides assets/models
    allow_hub: bool = False  # hosted: whether Hub ids resolve (local use always may)
    limits: Limits = field(default_factory=Limits)  # enforced in hosted mode (recipe text size: always)
    cached_models: int = 3
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    generation_concurrency: int = 1  # generations running at once
    generation_queue: int | None = (
        32  # generations waiting for a turn (None: any number); more are told "busy"
    )
    generation_wait_s: float = 300.0  # the longest a waiting generation waits before being told so
    job_concurrency: int = 2  # trainings and evaluations running at once (Train beside Evaluate); more wait
    upload_bytes: int | None = None  # the largest uploaded text file; None: no limit (local use)

    @classmethod
    def from_env(cls) -> StudioConfig:
        cfg = cls()
        if os.environ.get("MANGO_MODELS_DIR"):
            cfg.models_dir = Path(os.environ["MANGO_MODELS_DIR"]).expanduser()
        cfg.db_url = os.environ.get("MANGO_DB_URL") or None
        if os.environ.get("MANGO_DATA_DIR"):
            cfg.data_dir = Path(os.environ["MANGO_DATA_DIR"]).expanduser()
        cfg.hosted = hosted()
        if cfg.hosted:
            cfg.model_dirs = model_dirs_from_env()
            cfg.allow_hub = hub_allowed_from_env()
            cfg.limits = Limits.from_env()
        cfg.cached_models = int(os.environ.get("MANGO_CACHED_MODELS", cfg.cached_models))
        cfg.generation_concurrency = int(
            os.environ.get("MANGO_GENERATION_CONCURRENCY", cfg.generation_concurrency)
        )
        if cfg.hosted:  # many visitors: as many may wait as run, the rest are told to come back
            limits = cfg.limits
            cfg.max_new_tokens = min(cfg.max_new_tokens, limits.new_tokens)
            cfg.generation_concurrency = min(cfg.generation_concurrency, limits.concurrent_generations)
            cfg.generation_queue = cfg.generation_concurrency
            cfg.upload_bytes = limits.upload_bytes
            cfg.job_concurrency = 1
        if os.environ.get("MANGO_JOB_CONCURRENCY", "").isdigit():
            cfg.job_concurrency = max(1, int(os.environ["MANGO_JOB_CONCURRENCY"]))
        if os.environ.get("MANGO_GENERATION_QUEUE", "").isdigit():
            cfg.generation_queue = int(os.environ["MANGO_GENERATION_QUEUE"])
        return cfg

    def access_policy(self) -> AccessPolicy:
        """Where models may come from: hosted, the allowed folders only (see studio.limits); else anywhere."""
        if not self.hosted:
            return LOCAL
        return hosted_policy(self.model_dirs, self.allow_hub)


class ModelCache:
    """A small LRU of built models. Building happens outside the cache lock (it takes seconds) but under a
    per-key lock, so two requests for one version build it once."""

    def __init__(self, capacity: int = 3):
        self.capacity = max(1, capacity)
        self._models: OrderedDict[Any, mol.FusedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Any, threading.Lock] = {}

    def get(self, key: Any, build: Callable[[], mol.FusedModel]) -> mol.FusedModel:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                model = build()  # a failed build stores nothing: the next request tries again from scratch
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return model

    def building(self) -> list[Any]:
        """Keys being built now (or whose build lock was left behind: a bug)."""
        with self._lock:
            return list(self._building)

    def keys(self) -> list[Any]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


class GenerationSlot:
    """One admitted generation; `release` is idempotent (the worker thread releases it when it ends, the request
    releases it when it fails before the worker starts)."""

    def __init__(self, gate: GenerationGate):
        self._gate = gate
        self._released = False
        self._start = time.monotonic()

    def release(self) -> None:
        with self._gate._cond:
            if self._released:
                return
            self._released = True
            self._gate.running -= 1
            self._gate._finished(time.monotonic() - self._start)
            self._gate._cond.notify_all()


def load_text(running: int, waiting: int = 0) -> str:
    """'1 generation running', '2 generations running and 1 waiting': counts that read right."""
    text = f"{running} generation{'' if running == 1 else 's'} running"
    return text + (f" and {waiting} waiting" if waiting else "")


class GenerationGate:
    """Admission for generations: at most `capacity` run at once (building the model included) and at most
    `max_waiting` wait for a turn, first come first served (None: no bound); one more is refused at once with a
    "busy" message, and so is a waiter still waiting after `wait_s`. Requests wait here rather than in Gradio's
    queue so that the bound is ours to set. Counts what happened, for the load benchmark."""

    def __init__(self, capacity: int, max_waiting: int | None, wait_s: float = 300.0):
        self.capacity = max(1, int(capacity))
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.running = 0
        self.typical_s: float | None = (
            None  # a generation's usual length (moving average), for "try again in"
        )
        self.stats = {"admitted": 0, "queued": 0, "refused": 0, "peak_waiting": 0, "peak_running": 0}
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def acquire(self) -> GenerationSlot:
        with self._cond:
            if self.running >= self.capacity or self._queue:
                if self.max_waiting is not None and len(self._queue) >= self.max_waiting:
                    self.stats["refused"] += 1
                    raise ResourceError(self._busy())
                ticket = object()
                self._queue.append(ticket)
                self.stats["queued"] += 1
                self.stats["peak_waiting"] = max(self.stats["peak_waiting"], len(self._queue))
                deadline = time.monotonic() + self.wait_s
                try:
                    while self._queue[0] is not ticket or self.running >= self.capacity:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self.stats["refused"] += 1
                            raise ResourceError(self._busy())
                        self._cond.wait(left)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may be admitted too (capacity > 1), or moves up
            self.running += 1
            self.stats["admitted"] += 1
            self.stats["peak_running"] = max(self.stats["peak_running"], self.running)
            return GenerationSlot(self)

    def _busy(self) -> str:
        return (
            f"The server is busy: {load_text(self.running, len(self._queue))}, as many as it can take. "
            f"Try again in about {self.retry_after_s()} seconds."
        )

    def retry_after_s(self) -> int:
        """When a refused request is likely to find a turn: a usual generation's length for each round of the
        queue ahead of it (30 s a round until one has finished), rounded up to 5 s."""
        rounds = len(self._queue) // self.capacity + 1
        seconds = rounds * (self.typical_s if self.typical_s is not None else 30.0)
        return max(5, 5 * math.ceil(seconds / 5))

    def _finished(self, seconds: float) -> None:
        self.typical_s = seconds if self.typical_s is None else 0.7 * self.typical_s + 0.3 * seconds

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return {
                "capacity": self.capacity,
                "max_waiting": self.max_waiting,
                "running": self.running,
                "waiting": len(self._queue),
                **self.stats,
            }


@dataclass
class PlanReport:
    """What the recipe board shows under the recipe: valid or not, and why."""

    ok: bool
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class GenerationUpdate:
    text: str
    done: bool = False
    trace: dict | None = None  # the final trace; on a streamed update (live_trace_every), the trace so far
    run_id: int | None = None
    prompt_tokens: int | None = None  # how many of the trace's tokens are the prompt's
    expected_tokens: int | None = None  # the trace's length if the generation runs to its end
    tail: str = ""  # the last generated token's text: the model never reads it back (not in the trace)


@dataclass
class TrainingProgress:
    training_run_id: int
    step: int
    steps: int
    curve: list[dict]
    status: str = "running"  # then "completed", or "stopped" (a partial run, kept: its weights are saved)
    metrics: dict = field(default_factory=dict)


class LiveTrace:
    """The routing trace of a generation while it runs, for a live router heatmap. Inside `with`, forward hooks copy
    each step's routings (on the last routed slot, which sees every routing of the step; on a lanes model on every
    routed slot, since a lane may not run, and on the output mixture's gate); `end_step()` closes a step (the
    generation's streamer calls it after each token); `trace(fed)` joins them into what `Trace.to_dict` gives at
    the end, for the steps whose token has been streamed. The fast decoder (a one-stream model on one CUDA device)
    replays captured graphs, which run no hooks (`FusedModel.decodes_fast`): there the trace comes only at the end,
    and this does nothing. No hook is left behind on exit."""

    def __init__(self, model: mol.FusedModel, prompt_ids: torch.Tensor):
        self.model = model
        self.prompt = [int(i) for i in prompt_ids[0].tolist()]
        # per step: {slot index: (probs, chosen)} and the mixture's probabilities (appended by the worker thread)
        self.steps: list[tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]] = []
        self._texts: list[str] = []  # decoded tokens, by position (each decoded once)
        self._handles: list = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mixture: torch.Tensor | None = None
        self._lanes = getattr(model, "lanes", None) is not None and getattr(model, "gate", None) is not None

    def __enter__(self) -> LiveTrace:
        m = self.model
        slots = list(getattr(m, "routed_slots", []))
        replays = m.decodes_fast() if hasattr(m, "decodes_fast") else False
        if replays or getattr(m, "compiled_step_logits", None) is not None:
            return self
        for slot in slots if self._lanes else slots[-1:]:
            self._handles.append(slot.register_forward_hook(self._record))
        if self._lanes:
            self._handles.append(m.gate.register_forward_hook(self._record_mixture))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module, args, output) -> None:
        routings = args[1].routings
        if self._lanes:  # this slot's own routing: the one it has just appended
            routings = (
                [next((ir for ir in reversed(routings) if ir[0] == module.index), None)] if routings else []
            )
        for item in routings:
            if item is not None:
                i, r = item
                self._pending[i] = (r.probs[0].detach().float().cpu(), r.chosen[0].detach().cpu())

    def _record_mixture(self, module, args, output) -> None:
        self._mixture = output[0].detach().float().softmax(-1).cpu()  # [tokens, lanes]

    def end_step(self) -> None:
        """One step done (its token streamed): what the hooks saw in it becomes a step of the trace. A per-sequence
        mixture decided from the prompt runs no gate afterwards: its decision carries on."""
        if not self._handles:
            return
        mixture = self._mixture
        if mixture is None and self.steps and self.steps[-1][1] is not None:
            mixture = self.steps[-1][1][-1:]
        self.steps.append((self._pending, mixture))
        self._pending, self._mixture = {}, None

    def trace(self, fed: list[int]) -> dict | None:
        """The trace of the prompt and of `fed` but its last token (as `Trace.to_dict`, with token texts), as
        far as steps have been recorded; None before the first."""
        n = min(len(self.steps), len(fed))
        if n == 0:
            return None
        steps = list(self.steps[:n])
        ids = self.prompt + [int(i) for i in fed[: n - 1]]
        tok = self.model.tokenizer
        while len(self._texts) < len(ids):
            self._texts.append(tok.decode([ids[len(self._texts)]]))
        by_index = {s.index: s for s in self.model.all_slots}
        slots = []
        for index in sorted(steps[0][0]):
            probs, chosen = [], []
            for routed, _ in steps:  # a lane that did not run in a step keeps its last decision
                p, c = routed.get(index, (probs[-1][-1:], chosen[-1][-1:]) if probs else (None, None))
                if p is not None:
                    probs.append(p)
                    chosen.append(c)
            slot = by_index[index]
            slots.append(
                SlotTrace(
                    index,
                    slot.expert_names,
                    slot.router.kind,
                    torch.cat(probs).unsqueeze(0),
                    torch.cat(chosen).unsqueeze(0),
                )
            )
        if self._lanes and steps[0][1] is not None:
            probs = torch.cat([m for _, m in steps if m is not None]).unsqueeze(0)
            kind = "sequence" if self.model.gate.per_sequence else "mixture"
            slots.append(SlotTrace(-1, list(self.model.lanes), kind, probs, probs.argmax(-1, keepdim=True)))
        trace = Trace(token_ids=torch.tensor([ids]), slots=slots)
        return _with_lanes(self.model, trace.to_dict(0, self._texts[: len(ids)]))


def _with_lanes(model: mol.FusedModel, trace: dict) -> dict:
    """A lanes model's trace says which model each lane runs on (its mixture row names lanes, not models), so
    the figures colour a lane as its base model."""
    lanes = getattr(getattr(model, "recipe", None), "lanes", None)
    if lanes:
        trace["lanes"] = {name: lane.base for name, lane in lanes.items()}
    return trace


BUILTIN_CORPORA = ("prose", "code")
LOSS_SMOOTHING = 0.9  # EMA weight of the Train tab's smoothed loss curve and of the "final loss" it reports


def smoothed_final_loss(curve: list[dict], weight: float = LOSS_SMOOTHING) -> float | None:
    """The last value of the smoothed loss curve (the one the Train tab draws): one step's loss is noisy."""
    from studio.figures import smooth_ema

    values = [s for s in smooth_ema([p.get("loss") for p in curve], weight) if s is not None]
    return round(values[-1], 5) if values else None


TRAIN_SETTINGS = (
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "router_lr",
    "aux_loss_weight",
    "seed",
    "adapter_init",
    "router_init",
    "max_seconds",
    "max_tokens",
)


def clamp_settings(settings: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Sampling settings with defaults filled in and each value kept in its sensible range (a value of the
    wrong kind, text where a number belongs, is an `InputError`)."""
    s = {k: v for k, v in (settings or {}).items() if v is not None} if isinstance(settings, dict) else {}
    return {
        "max_new_tokens": max(1, min(whole(s.get("max_new_tokens", 32), "New tokens"), max_new_tokens)),
        "do_sample": flag(s.get("do_sample", False), "Sample"),
        "temperature": max(0.05, min(real(s.get("temperature", 1.0), "Temperature"), 5.0)),
        "top_k": max(0, min(whole(s.get("top_k", 0), "Top-k"), 1_000_000)),
        "top_p": max(0.01, min(real(s.get("top_p", 1.0), "Top-p"), 1.0)),
        "seed": whole(s.get("seed", 0), "Seed") % 2**63,  # what torch takes; the usual seeds are unchanged
    }


class StudioEngine:
    def __init__(self, config: StudioConfig | None = None):
        self.config = config or StudioConfig.from_env()
        self.cache = ModelCache(self.config.cached_models)
        self.gate = GenerationGate(
            self.config.generation_concurrency, self.config.generation_queue, self.config.generation_wait_s
        )
        self._repo = None
        self._repo_lock = threading.Lock()
        self._run_locks: dict[int, threading.Lock] = {}

    # ---- persistence --------------------------------------------------------------------------------
    @property
    def repo(self):
        """The repository, opened (and migrated) on first use."""
        with self._repo_lock:
            if self._repo is None:
                from studio.db import get_repository

                self._repo = get_repository(self.config.db_url)
            return self._repo

    # ---- access -------------------------------------------------------------------------------------
    @property
    def policy(self) -> AccessPolicy:
        """The access policy of this server's configuration, passed on every call that resolves a model."""
        return self.config.access_policy()

    def plan(self, recipe: Recipe) -> Plan:
        """`recipe` planned as this server allows it: in hosted mode within the request limits, and its models
        resolved under the policy. Every build, export, training and evaluation starts from such a plan."""
        if self.config.hosted:
            self.config.limits.check_recipe(recipe)
        return mol.plan(recipe, policy=self.policy)

    # ---- models -------------------------------------------------------------------------------------
    def embedded_models(self) -> dict[str, str]:
        """alias -> reference of every model folder under `models_dir` ("mango-bard" is "bard")."""
        folder = self.config.models_dir
        if not folder.is_dir():
            return {}
        out, policy = {}, self.policy
        for sub in sorted(folder.iterdir()):
            try:  # hosted: a folder or config that links out of the allowed folders is not offered
                policy.check_local(sub.name, sub)
                policy.check_file(sub / "config.json", sub)
            except MolError:
                continue
            if (sub / "config.json").is_file():
                out[sub.name.removeprefix("mango-")] = self.portable_ref(sub)
        return out

    def portable_ref(self, path: Path) -> str:
        """A folder under the repository as a relative path, so saved recipes work on every checkout."""
        path = path.resolve()
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(path)

    def model_card(self, alias: str, ref: str) -> dict:
        """The architecture card of one source model (reads config and weight headers only). In hosted mode
        the policy refuses folders outside the allowed ones (and the Hub unless allowed)."""
        src = load_source(alias, ref, [REPO_ROOT], self.policy)
        card = src.card()
        card["ref"] = ref
        card["fingerprint"] = src.tokenizer_fingerprint
        card.pop("folder", None)  # a server path means nothing to the person in the browser
        return card

    # ---- recipes ------------------------------------------------------------------------------------
    def recipe_from_dict(self, data: dict) -> Recipe:
        return Recipe.from_dict(data, source_dir=REPO_ROOT)

    def recipe_from_yaml(self, text: str) -> Recipe:
        """A recipe from YAML text (a client's, or a stored version's): parsed, never taken for a file path."""
        return Recipe.from_yaml(text, source_dir=REPO_ROOT)

    def recipe_from_file(self, path: Path) -> Recipe:
        """A recipe file whose model paths are relative to the file (as the shipped examples are), with those
        paths rewritten relative to the repository, as every recipe the studio stores has them."""
        recipe = Recipe.from_file(
            path
        )  # server-side files only (the shipped examples), never a client's string
        models = {}
        for alias, ref in recipe.models.items():
            local = Path(path).resolve().parent / ref
            models[alias] = self.portable_ref(local) if local.is_dir() else ref
        return Recipe.from_dict({**recipe.to_dict(), "models": models}, source_dir=REPO_ROOT)

    def check(self, draft: dict) -> PlanReport:
        """Validate a draft recipe and plan it (configs and weight headers only, no weights)."""
        return self.check_with_plan(draft)[0]

    def check_with_plan(self, draft: dict) -> tuple[PlanReport, Plan | None]:
        """`check`, with the plan itself when there is one (the recipe board draws the fused model from it)."""
        try:
            plan = self.plan(self.recipe_from_dict(draft))
        except MolError as exc:
            return PlanReport(False, public_text(str(exc))), None
        except Exception as exc:  # a bug, not the user's fault: a generic line, the details in the log
            return PlanReport(False, report_internal(exc, "planning a recipe")), None
        d = plan.to_dict()
        mem = d["memory_estimate"]
        summary = {
            "slots": d["slots"],
            "routed_slots": d["routed_slots"],
            "base": plan.recipe.base,
            "width": plan.width,
            "tensors_to_read": d["tensors_to_read"],
            "bytes_to_read": d["bytes_to_read"],
            "memory": mem,
            "trainable_parameters": d["adapter_parameters"] + d["router_parameters"],
        }
        if plan.lanes:  # several streams side by side: each lane's base and depth, the stitches, the mixture
            summary["lanes"] = [
                {
                    "name": n,
                    "base": p.recipe.base,
                    "width": p.width,
                    "slots": len(p.slots),
                    "routed_slots": sum(s.routed for s in p.recipe.slots),
                }
                for n, p in plan.lanes.items()
            ]
            summary["stitches"] = len(plan.recipe.stitches)
            summary["mixture"] = (plan.recipe.mixture or MixtureSpec()).type
            summary["trainable_parameters"] += plan.stitch_parameters()
        return PlanReport(True, None, summary, list(plan.warnings)), plan

    # ---- building -----------------------------------------------------------------------------------
    def fused_for_version(
        self, version_id: int, training_run_id: int | None = None
    ) -> tuple[mol.FusedModel, Any]:
        """The built model of a saved version, with the adapters and routers one of its training runs learned
        (None: as built, identity adapters and untrained routers)."""
        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        training_run_id = record_id(training_run_id, "training run") if training_run_id else None
        recipe = self.recipe_from_yaml(version.yaml_text)
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        key = ("version", version.id, training_run_id)
        return self.cache.get(key, lambda: mol.build(self.plan(recipe), weights=weights)), version

    def trained_weights(self, version_id: int, training_run_id: int) -> Path:
        run = self.repo.get_training_run(record_id(training_run_id, "training run"))
        if run.version_id != version_id:
            raise MolError(f"Training run {training_run_id} belongs to another recipe version.")
        if run.status != "completed" or not run.weights_path or not Path(run.weights_path).is_file():
            raise MolError(f"Training run {training_run_id} has no finished weights (status: {run.status}).")
        return Path(run.weights_path)

    # ---- export -------------------------------------------------------------------------------------
    def export_version(self, version_id: int, fmt: str = "auto", training_run_id: int | None = None) -> Path:
        """A saved version as a Hugging Face model folder, zipped for download (mol.export does the work)."""
        from mol.export import FORMATS, export

        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        if fmt not in FORMATS:
            raise MolError(
                f"Unknown export format '{fmt}'; choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}."
            )
        training_run_id = record_id(training_run_id, "training run") if training_run_id else None
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        recipe = self.recipe_from_yaml(version.yaml_text)
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in recipe.name) or "model"
        work = Path(tempfile.mkdtemp(prefix="mango-model-"))
        folder = export(self.plan(recipe), work / f"{stem}-v{version.number}", weights, format=fmt).path
        return Path(shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name))

    def push_version(
        self, version_id: int, repo_id: str, token: str | None = None, training_run_id: int | None = None
    ) -> str:
        """Export a saved version and upload it to the Hub. In hosted mode only the visitor's own token is used."""
        from mol.export.push import push

        if self.config.hosted and not (token or "").strip():
            raise MolError("Give your own Hugging Face token (write access) to push from this server.")
        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        training_run_id = record_id(training_run_id, "training run") if training_run_id else None
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        return push(
            self.plan(self.recipe_from_yaml(version.yaml_text)),
            repo_id,
            weights,
            token=(token or "").strip() or None,
        )

    def fused_for_source(self, alias: str, ref: str) -> mol.FusedModel:
        """One source model alone, run through the same runtime (every layer, in order)."""

        def build() -> mol.FusedModel:
            n = load_source(alias, ref, [REPO_ROOT], self.policy).num_layers
            recipe = Recipe.from_dict(
                {
                    "name": f"{alias} alone",
                    "base": alias,
                    "models": {alias: ref},
                    "slots": [f"{alias}:0-{n - 1}"],
                },
                source_dir=REPO_ROOT,
            )
            return mol.build(self.plan(recipe))

        return self.cache.get(("source", alias, ref), build)

    # ---- generation ---------------------------------------------------------------------------------
    def check_prompt(self, prompt: Any, max_new_tokens: int) -> str:
        """The prompt as text within the limits, checked before the request waits for a turn or reads a token:
        hosted mode's limits, and else a bound on characters far above any prompt the token limit admits."""
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise InputError("The prompt must be text.")
        if self.config.hosted:
            self.config.limits.check_generation(prompt, max_new_tokens)
        chars = 64 * self.config.max_prompt_tokens
        if len(prompt) > chars:
            raise ResourceError(
                f"The prompt has {len(prompt):,} characters; the studio accepts at most {chars:,}. "
                "Shorten it."
            )
        return prompt

    def stream(
        self,
        model: mol.FusedModel,
        prompt: str,
        settings: dict[str, Any],
        stop: threading.Event | None = None,
        slot: GenerationSlot | None = None,
        live_trace_every: int = 0,
    ) -> Iterator[GenerationUpdate]:
        """Generate from `prompt`, yielding the text so far after each token; the last update carries the
        routing trace. With `live_trace_every` = n > 0, every n-th token's update (and the first's) also carries
        the trace so far (see `LiveTrace`). Closing the iterator stops generation. It runs in one of the gate's
        slots (`slot`, taken by the caller, or one taken here), which the worker thread gives back when it ends."""
        s = clamp_settings(settings, self.config.max_new_tokens)
        prompt = self.check_prompt(prompt, s["max_new_tokens"])
        slot = slot or self.gate.acquire()
        started = False
        try:
            tok = model.tokenizer
            if tok is None:
                raise MolError("The base model has no tokenizer files; the studio needs one to read prompts.")
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:  # an empty prompt starts from the begin-of-text token
                start = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
                ids = torch.tensor([[start]])
            if ids.shape[1] > self.config.max_prompt_tokens:
                raise ResourceError(
                    f"The prompt has {ids.shape[1]} tokens; the studio accepts at most "
                    f"{self.config.max_prompt_tokens}. Shorten it."
                )
            stop = stop or threading.Event()
            events: queue.Queue = queue.Queue()
            lock = self._run_locks.setdefault(id(model), threading.Lock())
            live = LiveTrace(model, ids) if live_trace_every > 0 else None

            def work() -> None:
                try:
                    gen = None
                    if s["do_sample"]:
                        gen = torch.Generator(device=model.device).manual_seed(s["seed"])
                    # one generation at a time per model: its fast decoders' static buffers are shared (and the
                    # live trace's hook sees this generation's steps only)
                    with lock, torch.inference_mode(), live or contextlib.nullcontext():
                        out = model.generate(
                            ids,
                            max_new_tokens=s["max_new_tokens"],
                            do_sample=s["do_sample"],
                            temperature=s["temperature"],
                            top_k=s["top_k"],
                            top_p=s["top_p"],
                            generator=gen,
                            streamer=lambda t: (live and live.end_step(), events.put(("token", int(t[0])))),
                            stop=stop.is_set,
                            return_trace=True,
                        )
                        events.put(("done", self._trace_dict(model, out.trace)))
                except BaseException as exc:  # handed to the consumer, which raises it in the request thread
                    events.put(("error", exc))
                finally:
                    slot.release()  # here, not in the consumer: a stopped request's worker may run one more step

            threading.Thread(target=work, name="mango-generate", daemon=True).start()
            started = True
        finally:
            if not started:
                slot.release()
        new_ids: list[int] = []
        fed: list[int] = []  # every generated id, end of text included (what the model reads back)
        eos = tok.eos_token_id
        q = int(ids.shape[1])
        expected = q + s["max_new_tokens"] - 1  # the last new token is never read back
        try:
            while True:
                kind, payload = events.get()
                if kind == "token":
                    fed.append(payload)
                    if payload != eos:
                        new_ids.append(payload)
                    text = tok.decode(new_ids, skip_special_tokens=True)
                    partial = None
                    if live is not None and (len(fed) == 1 or len(fed) % live_trace_every == 0):
                        partial = live.trace(fed)
                    yield GenerationUpdate(text, False, partial, None, q, expected)
                elif kind == "error":
                    raise payload
                else:
                    tail = (
                        tok.decode(new_ids[-1:], skip_special_tokens=True) if fed and fed[-1] != eos else ""
                    )
                    text = tok.decode(new_ids, skip_special_tokens=True)
                    yield GenerationUpdate(text, True, payload, None, q, expected, tail)
                    return
        finally:
            stop.set()

    @staticmethod
    def _trace_dict(model: mol.FusedModel, trace: mol.Trace) -> dict:
        ids = trace.token_ids[0]
        if trace.attention_mask is not None:
            ids = ids[trace.attention_mask[0].bool()]
        tokens = [model.tokenizer.decode([i]) for i in ids.tolist()]
        return _with_lanes(model, trace.to_dict(0, tokens))

    def run_prompt(
        self,
        version_id: int,
        prompt: str,
        settings: dict[str, Any],
        stop: threading.Event | None = None,
        training_run_id: int | None = None,
        live_trace_every: int = 0,
    ) -> Iterator[GenerationUpdate]:
        """Generate with a saved recipe version and store the run (prompt, settings, output, trace). The request
        waits for a generation slot (or is told the server is busy) before the model is built: building counts.
        `live_trace_every`: as in `stream` (streamed updates carry the trace so far)."""
        version_id = record_id(version_id, "recipe version")
        s = clamp_settings(settings, self.config.max_new_tokens)
        prompt = self.check_prompt(prompt, s["max_new_tokens"])
        if training_run_id:
            s["training_run_id"] = training_run_id = record_id(training_run_id, "training run")
        slot = self.gate.acquire()
        try:
            if stop is not None and stop.is_set():  # stopped while it waited for its turn
                slot.release()
                return
            model, version = self.fused_for_version(version_id, training_run_id)
        except BaseException:
            slot.release()
            raise
        last, stopped = GenerationUpdate(""), False
        for last in self.stream(model, prompt, s, stop, slot, live_trace_every):
            if not last.done:
                yield last
            else:  # read now: once the stream has ended, its own clean-up sets the flag
                stopped = stop is not None and stop.is_set()
        if stopped:  # a stopped generation is shown, not stored
            yield dataclasses.replace(last, run_id=None)
            return
        run = self.repo.add_run(version.id, prompt, last.text, settings=s, trace=last.trace)
        yield dataclasses.replace(last, run_id=run.id)

    def run_source(self, alias: str, ref: str, prompt: str, settings: dict[str, Any]) -> str:
        """The same prompt through one source model alone; the full output text."""
        s = clamp_settings(settings, self.config.max_new_tokens)
        prompt = self.check_prompt(prompt, s["max_new_tokens"])
        slot = self.gate.acquire()
        try:
            model = self.fused_for_source(alias, ref)
        except BaseException:
            slot.release()
            raise
        text = ""
        for update in self.stream(model, prompt, s, None, slot):
            text = update.text
        return text

    # ---- training and evaluation ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        if self.config.data_dir is not None:
            return self.config.data_dir
        from studio.db import default_data_dir

        return default_data_dir()

    def datasets(self, builtin: list[str], uploads: list[str], split: str) -> dict[str, list[Path]]:
        """Domain name -> text files: the built-in corpora's `split` (train, valid, test; test adds the mixed
        set, whose spans label each document) and uploaded files, each a domain named after its file."""
        out: dict[str, list[Path]] = {}
        for name in builtin or []:
            if name == "mixed" and split == "test":
                out["mixed"] = [self.config.corpora_dir / "mixed_test.txt"]
            elif name in BUILTIN_CORPORA:
                out[name] = [self.config.corpora_dir / name / f"{split}.txt"]
            else:
                raise DataError(
                    f"There is no built-in corpus '{name}'; choose from {', '.join(BUILTIN_CORPORA)}."
                )
        for path in uploads or []:
            p = self.check_upload(path)
            name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p.stem) or "uploaded"
            while name in out:
                name += "_"
            out[name] = [p]
        if not out:
            raise DataError("Choose at least one built-in corpus or upload a text file.")
        return out

    def check_upload(self, path: str | Path, max_bytes: int | None = None) -> Path:
        """An uploaded file, checked: within the upload size limit (hosted mode's, or `max_bytes`) and text (UTF-8
        without NUL bytes); anything else is refused with a message before any code tries to read it."""
        p = Path(path)
        name = p.name
        limit = min(x for x in (max_bytes, self.config.upload_bytes, 2**62) if x is not None)
        try:
            size = p.stat().st_size
            if size > limit:
                raise DataError(f"'{name}' is {size:,} bytes; uploads are at most {limit:,} bytes.")
            decoder = codecs.getincrementaldecoder("utf-8")()
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    if b"\x00" in chunk:
                        raise DataError(f"'{name}' is not a text file (it has NUL bytes); upload UTF-8 text.")
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"'{name}' is not UTF-8 text; upload a text file.") from None
        except OSError:
            raise DataError(f"The uploaded file '{name}' cannot be read.") from None
        return p

    def read_upload(self, path: str | Path, max_bytes: int | None = None) -> str:
        return self.check_upload(path, max_bytes).read_text(encoding="utf-8")

    def train_version(
        self,
        version_id: int,
        datasets: dict[str, list[Path]],
        settings: dict[str, Any],
        poll_seconds: float = 0.5,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[TrainingProgress]:
        """Train a version's adapters and routers with `mol.train` in a worker thread; yields progress with
        the loss curve so far (each step's point as `mol.train` reports it) and stores the run and its weights.
        `stop()` is asked after every step: once it says True the run ends after that step and is kept as a
        trained result of the steps done (status "stopped", metrics `stopped_at` and `planned_steps`)."""
        from mol.training import TrainConfig, train

        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        recipe = self.recipe_from_yaml(version.yaml_text)
        chosen = {k: v for k, v in settings.items() if k in TRAIN_SETTINGS and v is not None}
        config = TrainConfig.from_dict(chosen)
        steps = config.steps
        record = self.repo.create_training_run(
            version.id,
            {
                "train": {k: getattr(config, k) for k in TRAIN_SETTINGS},
                "data": {name: [self.portable_ref(p) for p in paths] for name, paths in datasets.items()},
            },
            status="running",
        )
        weights = self.data_dir / "weights" / f"training-run-{record.id}.safetensors"
        outcome: dict[str, Any] = {}
        points: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                outcome["result"] = train(
                    self.plan(recipe),
                    datasets,
                    config,
                    out=weights,
                    progress=False,
                    on_step=points.put,
                    should_stop=stop,
                )
            except BaseException as exc:  # raised again in the request thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="mango-train", daemon=True)
        worker.start()
        curve: list[dict] = []
        while worker.is_alive():
            worker.join(poll_seconds)
            new = []
            while not points.empty():
                new.append(points.get_nowait())
            if new:  # stored as they come, so a crash keeps the curve so far
                self.repo.update_training_run(record.id, append_loss=new)
                curve += new
            yield TrainingProgress(record.id, len(curve), steps, list(curve))
        if "error" in outcome:
            exc = outcome["error"]
            if isinstance(exc, MolError):
                self.repo.update_training_run(record.id, status="failed", error=public_text(str(exc)))
                raise exc
            message = report_internal(exc, "training")
            self.repo.update_training_run(record.id, status="failed", error=message)
            raise ReportedError(message) from exc
        result = outcome["result"]
        metrics = {**result.metrics, "final_loss_smoothed": smoothed_final_loss(result.curve)}
        stopped = stop is not None and stop() and result.steps < steps
        if stopped:  # kept as a trained result (completed: its weights are usable), labelled as stopped
            metrics.update(stopped_at=result.steps, planned_steps=steps)
        self.repo.update_training_run(
            record.id,
            status="completed",
            loss_curve=list(result.curve),
            metrics=metrics,
            weights_path=str(weights),
        )
        yield TrainingProgress(
            record.id, result.steps, steps, list(result.curve), "stopped" if stopped else "completed", metrics
        )

    def evaluate_version(
        self,
        version_id: int,
        datasets: dict[str, list[Path]],
        training_run_id: int | None = None,
        sources: bool = True,
        seq_len: int = 256,
        max_tokens: int | None = 20_000,
        on_progress=None,
    ):
        """Perplexity per domain, router agreement and load, with every source model alone on the same tokens
        (`mol.evaluate`); the report is stored with the version (and the training run whose weights it used)."""
        from mol.evaluation import evaluate

        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        recipe = self.recipe_from_yaml(version.yaml_text)
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        report = evaluate(
            self.plan(recipe),
            datasets,
            weights=weights,
            sources=sources,
            seq_len=int(seq_len),
            max_tokens=max_tokens,
            on_progress=on_progress,
        )
        name = f"{version.recipe_name} v{version.number}" + (
            f" + training run {training_run_id}" if weights else ""
        )
        results = {
            **report.to_dict(),
            "data": {n: [self.portable_ref(p) for p in ps] for n, ps in datasets.items()},
        }
        return self.repo.add_evaluation(
            version.id, results, training_run_id=training_run_id or None, name=name
        )

    # ---- long jobs: training and evaluation in the background (studio.jobs) ---------------------------
    _jobs_lock = threading.Lock()

    @property
    def jobs(self) -> JobBoard:
        """The server's jobs: `config.job_concurrency` run at once (a training beside an evaluation), more wait."""
        with self._jobs_lock:
            if getattr(self, "_jobs", None) is None:
                self._jobs = JobBoard(self.config.job_concurrency)
            return self._jobs

    def start_training(
        self, version_id: int, datasets: dict[str, list[Path]], settings: dict[str, Any]
    ) -> Job:
        """Queue `train_version` as a job (checked now: the version exists, the settings are valid); Stop keeps
        the steps done as a trained result. The job's `result` is the last `TrainingProgress`."""
        from mol.training import TrainConfig

        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        chosen = {k: v for k, v in settings.items() if k in TRAIN_SETTINGS and v is not None}
        steps = TrainConfig.from_dict(chosen).steps

        def work(job: Job, update: Callable[..., None]) -> TrainingProgress | None:
            update(steps=steps, detail="building the model and reading the data")
            last = None
            for last in self.train_version(
                version.id, datasets, settings, poll_seconds=0.25, stop=job.stop_requested
            ):
                update(
                    step=last.step,
                    steps=last.steps,
                    curve=last.curve,
                    training_run_id=last.training_run_id,
                    detail="training",
                )
            return last

        return self.jobs.submit("train", f"{version.recipe_name} v{version.number}", work)

    def start_evaluation(
        self,
        version_id: int,
        datasets: dict[str, list[Path]],
        training_run_id: int | None = None,
        sources: bool = True,
        seq_len: int = 256,
        max_tokens: int | None = 20_000,
    ) -> Job:
        """Queue `evaluate_version` as a job. Stop ends it after the model scoring now; a stopped evaluation
        stores nothing (a report is stored whole). The job's `result` is the stored `EvaluationInfo`."""
        version = self.repo.get_version_by_id(record_id(version_id, "recipe version"))
        if training_run_id:
            self.trained_weights(version.id, training_run_id)  # no weights: said now, not after the wait

        def work(job: Job, update: Callable[..., None]):
            update(detail="building the model and reading the data")

            def on_progress(done: int, total: int, what: str) -> None:
                update(step=done, steps=total, detail=what)
                if job.stop_requested():
                    raise JobStopped(f"stopped after {done} of {total} scores")

            return self.evaluate_version(
                version.id, datasets, training_run_id, sources, seq_len, max_tokens, on_progress=on_progress
            )

        return self.jobs.submit("evaluate", f"{version.recipe_name} v{version.number}", work)
