"""The studio's engine: everything the UI does that is not UI. It calls `mol` (cards, plans, builds,
generation) and the repository (`studio.db`), and keeps built models in a small process-wide LRU cache keyed
by recipe version (versions are append-only, so a version id names one model for ever). Models never live in
`gr.State`: that would copy them per session."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mol
from mol.errors import DataError, MolError, ResourceError
from mol.hosted import current_policy, hosted
from mol.recipe import Recipe
from mol.sources import load_source

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
    """Where things are and how much a request may ask for. Hosted mode (a Space, or MANGO_HOSTED=1) is
    `mol.hosted`'s: models only from allowed folders, request limits; the studio takes its limits from there."""

    models_dir: Path = REPO_ROOT / "assets" / "models"
    recipes_dir: Path = REPO_ROOT / "assets" / "recipes"
    corpora_dir: Path = REPO_ROOT / "assets" / "corpora"
    data_dir: Path | None = None  # trained weights go under it; None: the database's data folder
    db_url: str | None = None
    hosted: bool = False
    cached_models: int = 3
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    generation_concurrency: int = 1

    @classmethod
    def from_env(cls) -> StudioConfig:
        cfg = cls()
        if os.environ.get("MANGO_MODELS_DIR"):
            cfg.models_dir = Path(os.environ["MANGO_MODELS_DIR"]).expanduser()
        cfg.db_url = os.environ.get("MANGO_DB_URL") or None
        if os.environ.get("MANGO_DATA_DIR"):
            cfg.data_dir = Path(os.environ["MANGO_DATA_DIR"]).expanduser()
        cfg.hosted = hosted()
        cfg.cached_models = int(os.environ.get("MANGO_CACHED_MODELS", cfg.cached_models))
        cfg.generation_concurrency = int(os.environ.get("MANGO_GENERATION_CONCURRENCY", cfg.generation_concurrency))
        if cfg.hosted:
            limits = current_policy().limits
            cfg.max_new_tokens = min(cfg.max_new_tokens, limits.new_tokens)
            cfg.generation_concurrency = min(cfg.generation_concurrency, limits.concurrent_generations)
        return cfg


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
            model = build()
            with self._lock:
                self._models[key] = model
                self._building.pop(key, None)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return model

    def keys(self) -> list[Any]:
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


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
    trace: dict | None = None
    run_id: int | None = None


@dataclass
class TrainingProgress:
    training_run_id: int
    step: int
    steps: int
    curve: list[dict]
    status: str = "running"  # then "completed"
    metrics: dict = field(default_factory=dict)


BUILTIN_CORPORA = ("prose", "code")
TRAIN_SETTINGS = ("steps", "batch_size", "seq_len", "lr", "router_lr", "aux_loss_weight", "seed", "adapter_init",
                  "router_init", "max_seconds", "max_tokens")


def clamp_settings(settings: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Sampling settings with defaults filled in and each value kept in its sensible range."""
    s = {k: v for k, v in (settings or {}).items() if v is not None}
    return {
        "max_new_tokens": max(1, min(int(s.get("max_new_tokens", 32)), max_new_tokens)),
        "do_sample": bool(s.get("do_sample", False)),
        "temperature": max(0.05, min(float(s.get("temperature", 1.0)), 5.0)),
        "top_k": max(0, int(s.get("top_k", 0))),
        "top_p": max(0.01, min(float(s.get("top_p", 1.0)), 1.0)),
        "seed": int(s.get("seed", 0)),
    }


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


class StudioEngine:
    def __init__(self, config: StudioConfig | None = None):
        self.config = config or StudioConfig.from_env()
        self.cache = ModelCache(self.config.cached_models)
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

    # ---- models -------------------------------------------------------------------------------------
    def embedded_models(self) -> dict[str, str]:
        """alias -> reference of every model folder under `models_dir` ("mango-bard" is "bard")."""
        folder = self.config.models_dir
        if not folder.is_dir():
            return {}
        out = {}
        for sub in sorted(folder.iterdir()):
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
        `mol.hosted`'s policy refuses folders outside the allowed ones (and the Hub unless allowed)."""
        src = load_source(alias, ref, [REPO_ROOT])
        card = src.card()
        card["ref"] = ref
        card["fingerprint"] = src.tokenizer_fingerprint
        card.pop("folder", None)  # a server path means nothing to the person in the browser
        return card

    # ---- recipes ------------------------------------------------------------------------------------
    def recipe_from_dict(self, data: dict) -> Recipe:
        return Recipe.from_dict(data, source_dir=REPO_ROOT)

    def recipe_from_yaml(self, text: str) -> Recipe:
        recipe = Recipe.from_yaml(text)
        recipe.source_dir = REPO_ROOT
        return recipe

    def recipe_from_file(self, path: Path) -> Recipe:
        """A recipe file whose model paths are relative to the file (as the shipped examples are), with those
        paths rewritten relative to the repository, as every recipe the studio stores has them."""
        recipe = Recipe.from_yaml(Path(path))
        models = {}
        for alias, ref in recipe.models.items():
            local = (Path(path).resolve().parent / ref)
            models[alias] = self.portable_ref(local) if local.is_dir() else ref
        return Recipe.from_dict({**recipe.to_dict(), "models": models}, source_dir=REPO_ROOT)

    def check(self, draft: dict) -> PlanReport:
        """Validate a draft recipe and plan it (configs and weight headers only, no weights)."""
        try:
            plan = mol.plan(self.recipe_from_dict(draft))
        except MolError as exc:
            return PlanReport(False, str(exc))
        except Exception as exc:  # a bug, not the user's fault: say so in one line, log the details
            log.exception("planning failed")
            return PlanReport(False, f"Internal error while planning ({_one_line(exc)}).")
        d = plan.to_dict()
        mem = d["memory_estimate"]
        summary = {"slots": d["slots"], "routed_slots": d["routed_slots"], "base": plan.recipe.base,
                   "width": plan.width, "tensors_to_read": d["tensors_to_read"],
                   "bytes_to_read": d["bytes_to_read"], "memory": mem,
                   "trainable_parameters": d["adapter_parameters"] + d["router_parameters"]}
        return PlanReport(True, None, summary, list(plan.warnings))

    # ---- building -----------------------------------------------------------------------------------
    def fused_for_version(self, version_id: int, training_run_id: int | None = None) -> tuple[mol.FusedModel, Any]:
        """The built model of a saved version, with the adapters and routers one of its training runs learned
        (None: as built, identity adapters and untrained routers)."""
        version = self.repo.get_version_by_id(int(version_id))
        recipe = self.recipe_from_yaml(version.yaml_text)
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        key = ("version", version.id, int(training_run_id) if training_run_id else None)
        return self.cache.get(key, lambda: mol.build(recipe, weights=weights)), version

    def trained_weights(self, version_id: int, training_run_id: int) -> Path:
        run = self.repo.get_training_run(int(training_run_id))
        if run.version_id != int(version_id):
            raise MolError(f"Training run {training_run_id} belongs to another recipe version.")
        if run.status != "completed" or not run.weights_path or not Path(run.weights_path).is_file():
            raise MolError(f"Training run {training_run_id} has no finished weights (status: {run.status}).")
        return Path(run.weights_path)

    def fused_for_source(self, alias: str, ref: str) -> mol.FusedModel:
        """One source model alone, run through the same runtime (every layer, in order)."""

        def build() -> mol.FusedModel:
            n = load_source(alias, ref, [REPO_ROOT]).num_layers
            recipe = Recipe.from_dict({"name": f"{alias} alone", "base": alias, "models": {alias: ref},
                                       "slots": [f"{alias}:0-{n - 1}"]}, source_dir=REPO_ROOT)
            return mol.build(recipe)

        return self.cache.get(("source", alias, ref), build)

    # ---- generation ---------------------------------------------------------------------------------
    def stream(self, model: mol.FusedModel, prompt: str, settings: dict[str, Any],
               stop: threading.Event | None = None) -> Iterator[GenerationUpdate]:
        """Generate from `prompt`, yielding the text so far after each token; the last update carries the
        routing trace. Closing the iterator stops generation."""
        s = clamp_settings(settings, self.config.max_new_tokens)
        current_policy().check_generation(prompt or "", s["max_new_tokens"])
        tok = model.tokenizer
        if tok is None:
            raise MolError("The base model has no tokenizer files; the studio needs one to read prompts.")
        ids = tok(prompt or "", return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:  # an empty prompt starts from the begin-of-text token
            start = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
            ids = torch.tensor([[start]])
        if ids.shape[1] > self.config.max_prompt_tokens:
            raise ResourceError(f"The prompt has {ids.shape[1]} tokens; the studio accepts at most "
                                f"{self.config.max_prompt_tokens}. Shorten it.")
        stop = stop or threading.Event()
        events: queue.Queue = queue.Queue()
        lock = self._run_locks.setdefault(id(model), threading.Lock())

        def work() -> None:
            try:
                gen = None
                if s["do_sample"]:
                    gen = torch.Generator(device=model.device).manual_seed(s["seed"])
                with lock, torch.inference_mode():  # last_trace belongs to one generation at a time
                    model.generate(ids, max_new_tokens=s["max_new_tokens"], do_sample=s["do_sample"],
                                   temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                   generator=gen, streamer=lambda t: events.put(("token", int(t[0]))),
                                   stop=stop.is_set)
                    events.put(("done", self._trace_dict(model)))
            except BaseException as exc:  # handed to the consumer, which raises it in the request thread
                events.put(("error", exc))

        threading.Thread(target=work, name="mango-generate", daemon=True).start()
        new_ids: list[int] = []
        eos = tok.eos_token_id
        try:
            while True:
                kind, payload = events.get()
                if kind == "token":
                    if payload != eos:
                        new_ids.append(payload)
                    yield GenerationUpdate(tok.decode(new_ids, skip_special_tokens=True))
                elif kind == "error":
                    raise payload
                else:
                    yield GenerationUpdate(tok.decode(new_ids, skip_special_tokens=True), True, payload)
                    return
        finally:
            stop.set()

    @staticmethod
    def _trace_dict(model: mol.FusedModel) -> dict:
        trace = model.last_trace
        ids = trace.token_ids[0]
        if trace.attention_mask is not None:
            ids = ids[trace.attention_mask[0].bool()]
        tokens = [model.tokenizer.decode([i]) for i in ids.tolist()]
        return trace.to_dict(0, tokens)

    def run_prompt(self, version_id: int, prompt: str, settings: dict[str, Any],
                   stop: threading.Event | None = None, training_run_id: int | None = None
                   ) -> Iterator[GenerationUpdate]:
        """Generate with a saved recipe version and store the run (prompt, settings, output, trace)."""
        model, version = self.fused_for_version(version_id, training_run_id)
        s = clamp_settings(settings, self.config.max_new_tokens)
        if training_run_id:
            s["training_run_id"] = int(training_run_id)
        last = GenerationUpdate("")
        for last in self.stream(model, prompt, s, stop):
            if not last.done:
                yield last
        run = self.repo.add_run(version.id, prompt, last.text, settings=s, trace=last.trace)
        yield GenerationUpdate(last.text, True, last.trace, run.id)

    def run_source(self, alias: str, ref: str, prompt: str, settings: dict[str, Any]) -> str:
        """The same prompt through one source model alone; the full output text."""
        text = ""
        for update in self.stream(self.fused_for_source(alias, ref), prompt, settings):
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
                raise DataError(f"There is no built-in corpus '{name}'; choose from {', '.join(BUILTIN_CORPORA)}.")
        for path in uploads or []:
            p = Path(path)
            name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p.stem) or "uploaded"
            while name in out:
                name += "_"
            out[name] = [p]
        if not out:
            raise DataError("Choose at least one built-in corpus or upload a text file.")
        return out

    def train_version(self, version_id: int, datasets: dict[str, list[Path]], settings: dict[str, Any],
                      poll_seconds: float = 0.5) -> Iterator[TrainingProgress]:
        """Train a version's adapters and routers with `mol.train` in a worker thread; yields progress with
        the loss curve so far (read from the run file it checkpoints) and stores the run and its weights."""
        from mol.train import TrainConfig, companion_paths, train

        version = self.repo.get_version_by_id(int(version_id))
        recipe = self.recipe_from_yaml(version.yaml_text)
        chosen = {k: v for k, v in settings.items() if k in TRAIN_SETTINGS and v is not None}
        steps = int(chosen.get("steps", 200))
        config = TrainConfig.from_dict({**chosen, "save_every": max(1, steps // 40)})
        record = self.repo.create_training_run(version.id, {
            "train": {k: getattr(config, k) for k in TRAIN_SETTINGS},
            "data": {name: [self.portable_ref(p) for p in paths] for name, paths in datasets.items()}},
            status="running")
        weights = self.data_dir / "weights" / f"training-run-{record.id}.safetensors"
        run_json = companion_paths(weights)[1]
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = train(recipe, datasets, config, out=weights, progress=False)
            except BaseException as exc:  # raised again in the request thread
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="mango-train", daemon=True)
        worker.start()
        stored = 0
        curve: list[dict] = []
        while worker.is_alive():
            worker.join(poll_seconds)
            curve = _read_curve(run_json) or curve
            if len(curve) > stored:
                self.repo.update_training_run(record.id, append_loss=curve[stored:])
                stored = len(curve)
            yield TrainingProgress(record.id, len(curve), steps, curve)
        if "error" in outcome:
            exc = outcome["error"]
            message = str(exc) if isinstance(exc, MolError) else _one_line(exc)
            self.repo.update_training_run(record.id, status="failed", error=message)
            raise exc
        result = outcome["result"]
        self.repo.update_training_run(record.id, status="completed", loss_curve=list(result.curve),
                                      metrics=dict(result.metrics), weights_path=str(weights))
        yield TrainingProgress(record.id, result.steps, steps, list(result.curve), "completed", dict(result.metrics))

    def evaluate_version(self, version_id: int, datasets: dict[str, list[Path]], training_run_id: int | None = None,
                         sources: bool = True, seq_len: int = 256, max_tokens: int | None = 20_000):
        """Perplexity per domain, router agreement and load, with every source model alone on the same tokens
        (`mol.evaluate`); the report is stored with the version (and the training run whose weights it used)."""
        from mol.evaluate import evaluate

        version = self.repo.get_version_by_id(int(version_id))
        recipe = self.recipe_from_yaml(version.yaml_text)
        weights = self.trained_weights(version.id, training_run_id) if training_run_id else None
        report = evaluate(recipe, datasets, weights=weights, sources=sources, seq_len=int(seq_len),
                          max_tokens=max_tokens)
        name = f"{version.recipe_name} v{version.number}" + (f" + training run {training_run_id}" if weights else "")
        results = {**report.to_dict(), "data": {n: [self.portable_ref(p) for p in ps] for n, ps in datasets.items()}}
        return self.repo.add_evaluation(version.id, results, training_run_id=training_run_id or None, name=name)


def _read_curve(run_json: Path) -> list[dict]:
    """The loss curve in a training run's JSON file (written atomically by mol.train); [] when not there yet."""
    try:
        return list(json.loads(run_json.read_text(encoding="utf-8")).get("curve") or [])
    except (OSError, ValueError):
        return []

