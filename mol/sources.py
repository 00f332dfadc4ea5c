"""Source models: find a model's folder (local or Hub cache), read its config, its safetensors headers
(names, shapes, dtypes, byte ranges — no tensor data) and its tokenizer's identity."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mol.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from mol.families import Family, family_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data; a corrupt or truncated file fails here."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"'{path}' is truncated: no safetensors header. Re-download or re-save it.")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"'{path}' is not a valid safetensors file (header length {n}).")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{path}' cannot be read as safetensors: {exc}. Re-download or re-save it.") from None
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            info = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), end - start)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"'{path}': malformed header entry for tensor '{name}'.") from None
        if end > data_len:
            raise CheckpointError(
                f"'{path}' is truncated: tensor '{name}' ends at byte {end} of {data_len}. Re-download the file."
            )
        out[name] = info
    return out


@dataclass
class ModelSource:
    """One source model: where it lives and what it is, known before any weight is read."""

    alias: str
    ref: str
    folder: Path
    config: object  # transformers PretrainedConfig
    family: Family
    hub_id: str | None = None
    allow_bin: bool = False
    _tensors: dict[str, TensorInfo] | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.heads)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            self._tensors = self._index_tensors()
        return self._tensors

    def _index_tensors(self) -> dict[str, TensorInfo]:
        index = self.folder / "model.safetensors.index.json"
        files: list[Path]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"'{index}' is not a valid shard index: {exc}.") from None
            files = sorted({self.folder / f for f in weight_map.values()})
            if self.hub_id:
                _fetch_from_hub(self.hub_id, [f.name for f in files], self.folder)
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            if bins and self.allow_bin:
                return _index_pickles(bins)
            if bins or list(self.folder.glob("*.pt")):
                raise CheckpointError(
                    f"{self.alias}: '{self.folder}' has only PyTorch pickle weights (.bin). Pickles can run code "
                    "when loaded, so they are refused; convert the model to safetensors "
                    "(model.save_pretrained(..., safe_serialization=True)), or opt in with allow_bin=True "
                    "(`--allow-bin`) if you trust the file."
                )
            raise CheckpointError(f"{self.alias}: no safetensors weights in '{self.folder}'.")
        out: dict[str, TensorInfo] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{self.alias}: shard '{f.name}' listed in the index is missing from '{self.folder}'.")
            out.update(read_safetensors_header(f))
        return out

    @cached_property
    def parameter_count(self) -> int:
        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @cached_property
    def tokenizer_fingerprint(self) -> str | None:
        """A hash of the vocabulary (token -> id, added tokens included); None when no tokenizer files."""
        vocab = tokenizer_vocab(self.folder)
        if vocab is None:
            return None
        blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def tokenizer_id(self) -> str:
        fp = self.tokenizer_fingerprint
        return f"{fp} ({self.vocab_size} ids)" if fp else f"none ({self.vocab_size} ids)"

    def card(self) -> dict:
        return {
            "alias": self.alias,
            "source": self.ref,
            "folder": str(self.folder),
            "family": self.family.name,
            "model_type": self.model_type,
            "layers": self.num_layers,
            "width": self.width,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "parameters": self.parameter_count,
            "tokenizer": self.tokenizer_id,
        }


def _index_pickles(files: list[Path]) -> dict[str, TensorInfo]:
    """Opt-in only: tensors of PyTorch pickles, loaded with weights_only (no arbitrary objects)."""
    out = {}
    for f in files:
        for name, t in load_pickle(f).items():
            out[name] = TensorInfo(name, f, str(t.dtype), tuple(t.shape), t.numel() * t.element_size())
    return out


_PICKLES: dict[Path, dict] = {}


def load_pickle(path: Path) -> dict:
    import torch

    if path not in _PICKLES:
        try:
            _PICKLES[path] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"'{path}' cannot be read as a PyTorch weights file: {exc}.") from None
    return _PICKLES[path]


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
            model = data.get("model", {})
            vocab = model.get("vocab")
            if isinstance(vocab, list):  # unigram: [[piece, score], ...]
                vocab = {p[0]: i for i, p in enumerate(vocab)}
            vocab = dict(vocab or {})
            for tok in data.get("added_tokens", []):
                vocab[tok["content"]] = tok["id"]
            return vocab
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"'{tj}' is not a valid tokenizer file: {exc}.") from None
    vj = folder / "vocab.json"
    if vj.is_file():
        try:
            return dict(json.loads(vj.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"'{vj}' is not a valid vocabulary file: {exc}.") from None
    if (folder / "tokenizer.model").is_file():
        return {"sentencepiece:" + hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest(): 0}
    return None


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~")) and "\\" not in ref


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _fetch_from_hub(repo_id: str, filenames: list[str], folder: Path | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=filenames, local_files_only=_offline())
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        hint = (
            "You are offline (HF_HUB_OFFLINE=1) and this model is not in the Hub cache"
            if _offline()
            else "It could not be downloaded"
        )
        raise ModelNotFoundError(
            f"Model '{repo_id}' is not available: {hint} ({type(exc).__name__}). Download it once with "
            f"`huggingface-cli download {repo_id}` while online, or point the recipe at a local folder "
            "(models: {alias: path/to/model-folder})."
        ) from None
    return Path(path)


def resolve_folder(ref: str, search_dirs: list[Path] | None = None) -> tuple[Path, str | None]:
    """Local folder for a model reference (path or Hub id); returns (folder, hub_id or None)."""
    from mol.hosted import current_policy

    policy = current_policy()
    ref = ref.strip()
    candidates = []
    p = Path(ref).expanduser()
    if p.is_absolute():
        candidates.append(p)
    else:
        candidates.extend(d / p for d in (search_dirs or []))
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.is_dir():
            policy.check_local(ref, c)
            return c.resolve(), None
    if policy.restricted and not _looks_like_hub_id(ref):
        policy.check_local(ref, candidates[-1])
    if _looks_like_hub_id(ref):
        policy.check_hub(ref)
        wanted = ["config.json", "generation_config.json", "*.safetensors.index.json", *TOKENIZER_FILES]
        folder = _fetch_from_hub(ref, wanted)
        if not any(folder.glob("*.safetensors.index.json")):
            folder = _fetch_from_hub(ref, [*wanted, "*.safetensors"])
        return folder, ref
    tried = ", ".join(str(c) for c in candidates)
    raise ModelNotFoundError(f"Model folder '{ref}' does not exist (looked in: {tried}). Give an existing local "
                             "folder with config.json and safetensors weights, or a Hub id like 'org/name'.")


def load_source(alias: str, ref: str, search_dirs: list[Path] | None = None, allow_bin: bool = False) -> ModelSource:
    folder, hub_id = resolve_folder(ref, search_dirs)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{alias}: '{folder}' has no config.json; it is not a Hugging Face model folder.")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{alias}: '{cfg_path}' is not valid JSON: {exc}.") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise UnsupportedArchitectureError(f"{alias}: '{cfg_path}' has no model_type; cannot tell its architecture.")
    family = family_for(model_type, where=alias)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"{alias}: transformers cannot read '{cfg_path}': {exc}".rstrip(".") + ".") from None
    return ModelSource(alias=alias, ref=ref, folder=folder, config=config, family=family, hub_id=hub_id,
                       allow_bin=allow_bin)
