"""Source models: find a model's folder (local or Hub cache), read its config, its safetensors headers
(names, shapes, dtypes, byte ranges — no tensor data) and its tokenizer's identity.

A model folder is data from whoever made it. So each file is checked before it is opened (`checked_file`: a
regular file and, under a restricted `AccessPolicy`, inside its allowed folders), every JSON file must hold what
it claims, and
errors name the problem in one line without echoing bytes of a file that is not what its name says."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mol import dtypes
from mol.access import LOCAL, AccessPolicy
from mol.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from mol.families import Family, family_for

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_MAX_HEADER = 100 * 2**20
_MAX_JSON = 256 * 2**20  # the largest tokenizer.json files are tens of MiB
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # first byte of the tensor's data in `file` (safetensors: counted from the file's start)


def one_line(text: object, limit: int = 120) -> str:
    """Text from a file or a library error, fit for a one-line message: whitespace runs (newlines included)
    become one space, other control characters are escaped, and it is cut short."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(text).split()))
    return s if len(s) <= limit else s[: limit - 3] + "..."


@contextmanager
def naming(alias: str):
    """Errors about a source's files start with its alias, as the recipe names the model."""
    try:
        yield
    except CheckpointError as exc:
        msg = str(exc)
        raise CheckpointError(msg if msg.startswith(f"{alias}: ") else f"{alias}: {msg}") from None


def checked_file(path: Path, folder: Path, policy: AccessPolicy = LOCAL) -> Path | None:
    """`path`, a file of the model folder `folder`, checked before anything opens it: None when there is none;
    refused when it is not a regular file (a folder, or a FIFO whose read would block) or, under a restricted
    `policy`, when its real path is outside the allowed folders."""
    policy.check_file(path, folder)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"'{path}' cannot be read ({one_line(getattr(exc, 'strerror', None) or exc)})."
        ) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"'{path}' is not a regular file; a model folder holds plain files.")
    return path


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object a model file must hold (config, shard index, tokenizer files)."""
    try:
        if path.stat().st_size > _MAX_JSON:
            raise CheckpointError(f"'{path}' is not a valid {what}: over {_MAX_JSON >> 20} MiB.")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(
            f"'{path}' cannot be read ({one_line(exc.strerror or type(exc).__name__)})."
        ) from None
    except json.JSONDecodeError as exc:  # its message says where, never what is there
        raise CheckpointError(
            f"'{path}' is not a valid {what}: not JSON ({exc.msg} at line {exc.lineno})."
        ) from None
    except (ValueError, RecursionError):  # not UTF-8 text, or nested too deep
        raise CheckpointError(f"'{path}' is not a valid {what}: not JSON text.") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"'{path}' is not a valid {what}: it holds {_JSON_KINDS.get(type(data), 'a value')}, "
            "not a JSON object."
        )
    return data


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data. A file that is not safetensors, or whose
    header is inconsistent (shape and byte range disagree, ranges overlap or run past the end), fails here;
    the message never quotes its bytes (the 'header length' of another kind of file is its first 8 bytes)."""
    not_st = f"'{path}' is not a safetensors file"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) != 8:
                raise CheckpointError(
                    f"'{path}' is truncated: no safetensors header. Re-download or re-save it."
                )
            (n,) = struct.unpack("<Q", raw)
            if not 2 <= n <= min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{not_st} (or it is truncated inside its header). Re-download or re-save it."
                )
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(
            f"'{path}' cannot be read ({one_line(exc.strerror or type(exc).__name__)})."
        ) from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{not_st}: its header is not JSON. Re-download or re-save it.") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{not_st}: its header is not a JSON object of tensors.")
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name != "__metadata__":
            out[name] = _tensor_info(path, name, meta, 8 + n, data_len)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CheckpointError(
                f"'{path}': tensors '{one_line(a, 60)}' and '{one_line(b, 60)}' overlap in the file; "
                "its header is corrupt."
            )
    return out


def _tensor_info(path: Path, name: str, meta, data_start: int, data_len: int) -> TensorInfo:
    where = f"'{path}': tensor '{one_line(name, 60)}'"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} has a malformed header entry (not a JSON object).")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes.SAFETENSORS:
        raise CheckpointError(
            f"{where} has dtype {one_line(repr(dtype), 40)}, which is not supported "
            f"({', '.join(dtypes.SAFETENSORS)})."
        )
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise CheckpointError(
            f"{where} has shape {one_line(repr(shape), 40)}; a shape is a list of integers >= 0."
        )
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets))
        or offsets[1] < offsets[0]
    ):
        raise CheckpointError(
            f"{where} has data_offsets {one_line(repr(offsets), 40)}; they must be [start, end] "
            "with 0 <= start <= end."
        )
    start, end = offsets
    if end > data_len:
        raise CheckpointError(
            f"'{path}' is truncated: tensor '{one_line(name, 60)}' ends at byte {end} of {data_len}. "
            "Re-download the file."
        )
    need = math.prod(shape) * dtypes.SAFETENSORS[dtype][0]
    if end - start != need:
        raise CheckpointError(
            f"{where} has {end - start} bytes, but shape {one_line(shape, 40)} of {dtype} takes "
            f"{need}; its header is corrupt."
        )
    return TensorInfo(name, path, dtype, tuple(shape), need, data_start + start)


def read_range(fd: int, offset: int, view: memoryview, what: str) -> None:
    """Fill `view` with the bytes of file `fd` from `offset` on (positioned reads: no shared file position, no
    memory map); a file that ends first fails with a CheckpointError naming `what`."""
    got = 0
    try:
        while got < len(view):
            k = os.preadv(fd, [view[got:]], offset + got)
            if not k:
                raise OSError(f"end of file after {got} of {len(view)} bytes")
            got += k
    except OSError as exc:
        raise CheckpointError(
            f"{what} cannot be read ({one_line(exc)}); the file may be truncated."
        ) from None


def read_tensor(fd: int, info: TensorInfo):
    """The tensor `info` (a header entry `read_safetensors_header` checked) of the open file `fd`: one read of
    exactly its byte range into a fresh buffer."""
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)  # uninitialised: every byte is read into it
    read_range(fd, info.offset, memoryview(buf.numpy()), f"'{info.file}': tensor '{one_line(info.name, 60)}'")
    return buf.view(dtypes.to_torch(info.dtype)).reshape(info.shape)


@dataclass
class ModelSource:
    """One source model: where it lives and what it is, known before any weight is read."""

    alias: str
    ref: str
    folder: Path
    config: object  # transformers PretrainedConfig
    family: Family
    hub_id: str | None = None
    policy: AccessPolicy = LOCAL  # what it was resolved under; every file of it is checked against it
    _tensors: dict[str, TensorInfo] | None = field(default=None, repr=False)

    @property
    def allow_bin(self) -> bool:
        return self.policy.allow_bin

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
            with naming(self.alias):
                self._tensors = self._index_tensors()
        return self._tensors

    def file(self, name: str) -> Path | None:
        """The folder's file `name`, checked before anything opens it (`checked_file`); None when absent."""
        return checked_file(self.folder / name, self.folder, self.policy)

    def _index_tensors(self) -> dict[str, TensorInfo]:
        index = self.file("model.safetensors.index.json")
        files: list[Path]
        if index is not None:
            files = self._shards(index)
            if self.hub_id:
                _fetch_from_hub(
                    self.hub_id, [f.relative_to(self.folder).as_posix() for f in files], self.folder
                )
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            if bins and self.allow_bin:
                return _index_pickles([f for f in bins if checked_file(f, self.folder, self.policy)])
            if bins or list(self.folder.glob("*.pt")):
                raise CheckpointError(
                    f"{self.alias}: '{self.folder}' has only PyTorch pickle weights (.bin). Pickles can run code "
                    "when loaded, so they are refused; convert the model to safetensors "
                    "(model.save_pretrained(..., safe_serialization=True)), or opt in with "
                    "AccessPolicy(allow_bin=True) (`--allow-bin`) if you trust the file."
                )
            raise CheckpointError(f"{self.alias}: no safetensors weights in '{self.folder}'.")
        out: dict[str, TensorInfo] = {}
        for f in files:
            if checked_file(f, self.folder, self.policy) is None:
                named = " (named by the shard index)" if index is not None else ""
                raise CheckpointError(
                    f"{self.alias}: weights file '{f.name}'{named} is missing from '{self.folder}'."
                )
            for name, info in read_safetensors_header(f).items():
                if name in out:
                    raise CheckpointError(
                        f"{self.alias}: tensor '{one_line(name, 60)}' is in both '{out[name].file.name}' "
                        f"and '{f.name}'; the weights files disagree."
                    )
                out[name] = info
        return out

    def _shards(self, index: Path) -> list[Path]:
        """The files the shard index names. The index is data from the model's author, so a name that is not a
        .safetensors file inside the model folder (absolute, '..') is refused, hosted or not; under a restricted
        policy a shard that links out of the folder is refused too (locally the user's own links, e.g. into an
        annex or blob store, are theirs to make)."""
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"'{index}' is not a valid shard index: 'weight_map' must be an object of tensor "
                "name -> file name."
            )
        root = Path(os.path.realpath(_model_root(self.folder)))
        files = set()
        for name in set(weight_map.values()):
            rel = Path(name)
            if (
                not name.endswith(".safetensors")
                or not name.isprintable()
                or "\\" in name
                or rel.is_absolute()
                or ".." in rel.parts
                or (self.policy.restricted and root not in Path(os.path.realpath(self.folder / rel)).parents)
            ):
                raise CheckpointError(
                    f"'{index}' names '{one_line(name, 80)}' as a shard; a shard must be a "
                    ".safetensors file inside the model folder, so it is refused."
                )
            files.add(self.folder / rel)
        return sorted(files)

    def check_files(self) -> None:
        """Fail now, with a typed error, on a tokenizer or generation file that building or exporting would
        trip over later (the build loads the tokenizer; export copies these files)."""
        with naming(self.alias):
            for name in (*TOKENIZER_FILES, "generation_config.json"):
                path = self.file(name)
                if (
                    path is not None
                    and name.endswith(".json")
                    and name not in ("tokenizer.json", "vocab.json")
                ):
                    read_json_object(path, name)
        _ = self.tokenizer_fingerprint  # reads and checks tokenizer.json / vocab.json

    def load_tokenizer(self):
        """The tokenizer transformers builds from this folder; None when it has no tokenizer files. Files that
        are there but do not load are a CheckpointError: 'no tokenizer' would send the user looking for files
        they have."""
        if all(self.file(name) is None for name in TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(
                str(self.folder), trust_remote_code=self.policy.allow_remote_code
            )
        except Exception as exc:
            raise CheckpointError(
                f"{self.alias}: the tokenizer files in '{self.folder}' do not load "
                f"({type(exc).__name__}: {one_line(exc, 150)}); re-save the tokenizer."
            ) from None

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
        with naming(self.alias):
            vocab = tokenizer_vocab(self)
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
            dtype = dtypes.safetensors_name(t.dtype)
            if dtype is None:
                raise CheckpointError(
                    f"'{f}': tensor '{one_line(name, 60)}' has unsupported dtype {t.dtype}."
                )
            out[name] = TensorInfo(name, f, dtype, tuple(t.shape), t.numel() * t.element_size())
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


def tokenizer_vocab(src: ModelSource) -> dict[str, int] | None:
    """A source's vocabulary (token -> id, added tokens included); None when it has no tokenizer files. A
    tokenizer.json must load in the tokenizers library, as transformers will load it when building."""
    tj = src.file("tokenizer.json")
    if tj is not None:
        data = read_json_object(tj, "tokenizer file")
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tj))
            vocab = data["model"].get("vocab")
            if isinstance(vocab, list):  # unigram: [[piece, score], ...]
                vocab = {p[0]: i for i, p in enumerate(vocab)}
            vocab = dict(vocab or {})
            for tok in data.get("added_tokens") or []:
                vocab[tok["content"]] = tok["id"]
            return vocab
        except Exception:  # the parser's messages quote the file: say only what is wrong
            raise CheckpointError(
                f"'{tj}' is not a valid tokenizer file: the tokenizers library cannot load it. "
                "Re-save the tokenizer."
            ) from None
    vj = src.file("vocab.json")
    if vj is not None:
        vocab = read_json_object(vj, "vocabulary file")
        if not all(_count(i) for i in vocab.values()):
            raise CheckpointError(f"'{vj}' is not a valid vocabulary file: ids must be integers >= 0.")
        return vocab
    sp = src.file("tokenizer.model")
    if sp is not None:
        return {"sentencepiece:" + hashlib.sha256(sp.read_bytes()).hexdigest(): 0}
    return None


def _model_root(folder: Path) -> Path:
    """Where a model's files may lead: its folder, or for a Hub cache snapshot (models--org--name/snapshots/<rev>,
    whose files link to ../../blobs) the repository's cache folder."""
    repo = folder.parent.parent
    return repo if folder.parent.name == "snapshots" and (repo / "blobs").is_dir() else folder


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a folder this can use
        return False


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~")) and "\\" not in ref


def _offline() -> bool:
    """huggingface_hub's own reading of HF_HUB_OFFLINE (set at its import), looked up at call time so that
    switching the constant switches this too."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _fetch_from_hub(repo_id: str, filenames: list[str], folder: Path | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=filenames, local_files_only=_offline())
    except Exception:  # the hub client raises many kinds; all mean "not available here"
        hint = (
            "You are offline (HF_HUB_OFFLINE=1) and this model is not in the Hub cache"
            if _offline()
            else "It could not be downloaded"
        )
        raise ModelNotFoundError(
            f"Model '{repo_id}' is not available: {hint}. Download it once with "
            f"`huggingface-cli download {repo_id}` while online, or point the recipe at a local folder "
            "(models: {alias: path/to/model-folder})."
        ) from None
    return Path(path)


def resolve_folder(
    ref: str, search_dirs: list[Path] | None = None, policy: AccessPolicy = LOCAL
) -> tuple[Path, str | None]:
    """Local folder for a model reference (path or Hub id) that `policy` allows; returns (folder, hub_id or
    None)."""
    ref = ref.strip()
    candidates = []
    try:
        p = Path(ref).expanduser()
    except RuntimeError:  # '~someone' with no such user
        p = Path(ref)
    if p.is_absolute():
        candidates.append(p)
    else:
        candidates.extend(d / p for d in (search_dirs or []))
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if _is_dir(c):
            policy.check_local(ref, c)
            return Path(os.path.realpath(c)), None
    if policy.restricted and not _looks_like_hub_id(ref):
        policy.check_local(ref, candidates[-1])
    if _looks_like_hub_id(ref):
        policy.check_hub(ref)
        wanted = ["config.json", "generation_config.json", "*.safetensors.index.json", *TOKENIZER_FILES]
        folder = _fetch_from_hub(ref, wanted)
        if not any(folder.glob("*.safetensors.index.json")):
            folder = _fetch_from_hub(ref, [*wanted, "*.safetensors"])
        return folder, ref
    tried = one_line(", ".join(str(c) for c in candidates), 300)
    raise ModelNotFoundError(
        f"Model folder '{one_line(ref, 200)}' does not exist (looked in: {tried}). Give an "
        "existing local folder with config.json and safetensors weights, or a Hub id like "
        "'org/name'."
    )


def load_source(
    alias: str, ref: str, search_dirs: list[Path] | None = None, policy: AccessPolicy = LOCAL
) -> ModelSource:
    """The source model `ref` (a local folder or Hub id) as `policy` allows it: its folder, config and family;
    the source keeps `policy`, so every file read from it later is checked against it too."""
    folder, hub_id = resolve_folder(ref, search_dirs, policy)
    if policy.restricted:  # transformers opens files of its own choosing in the folder: check them all first
        for where, dirs, files in os.walk(folder):
            for name in dirs + files:
                policy.check_file(Path(where) / name, folder)
    with naming(alias):
        cfg_path = checked_file(folder / "config.json", folder, policy)
        if cfg_path is None:
            raise ModelNotFoundError(
                f"{alias}: '{folder}' has no config.json; it is not a Hugging Face model folder."
            )
        raw = read_json_object(cfg_path, "config.json")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedArchitectureError(
            f"{alias}: '{cfg_path}' has no model_type (a string); cannot tell its architecture."
        )
    family = family_for(one_line(model_type, 60), where=alias)  # one_line: the name is echoed if unknown
    _check_sizes(alias, raw, model_type)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=policy.allow_remote_code)
    except Exception as exc:  # transformers' validation errors span lines
        raise CheckpointError(
            f"{alias}: transformers cannot read '{cfg_path}': {one_line(exc, 300)}".rstrip(".") + "."
        ) from None
    check_config(alias, config, raw, family)
    return ModelSource(
        alias=alias, ref=ref, folder=folder, config=config, family=family, hub_id=hub_id, policy=policy
    )


_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "head_dim",
    "max_position_embeddings",
)
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _size_error(alias: str, name: str, value) -> CheckpointError:
    return CheckpointError(
        f"{alias}: config.json field '{name}' must be a positive integer, not {one_line(repr(value), 40)}."
    )


def _check_sizes(alias: str, raw: dict, model_type: str) -> None:
    """The sizes config.json gives, before transformers divides by them (a zero there is a ZeroDivisionError)."""
    from transformers import CONFIG_MAPPING

    names = CONFIG_MAPPING[model_type].attribute_map if model_type in CONFIG_MAPPING else {}
    for attr in _SIZES:
        key = names.get(attr, attr)
        if raw.get(key) is not None and not (_count(raw[key]) and raw[key] > 0):
            raise _size_error(alias, key, raw[key])


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0  # NaN is not > 0


def check_config(alias: str, config, raw: dict, family: Family) -> None:
    """What transformers' config classes accept but the model cannot run with: sizes that are not positive
    integers, heads that do not split the width, an unknown activation or RoPE type, a RoPE base or scale that
    is not a positive number. Each refusal names the field as config.json spells it."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def refuse(attr: str, why: str):
        raise CheckpointError(f"{alias}: config.json field '{config.attribute_map.get(attr, attr)}' {why}.")

    for attr in _SIZES:  # again after transformers: its defaults, and what older releases accept unchecked
        value = getattr(config, attr, None)
        if (value is not None or attr in _REQUIRED_SIZES) and not (_count(value) and value > 0):
            raise _size_error(alias, config.attribute_map.get(attr, attr), value)
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    if heads % kv:
        refuse("num_key_value_heads", f"({kv}) must divide num_attention_heads ({heads})")
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        refuse("num_attention_heads", f"({heads}) must divide hidden_size ({config.hidden_size})")
    for attr in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(config, attr, None)
        if value is not None and not (isinstance(value, str) and value in ACT2FN):
            refuse(
                attr,
                f"is {one_line(repr(value), 40)}, not an activation transformers knows (such as gelu, "
                "gelu_new, relu, silu)",
            )
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):  # one dict, or one per layer type (with the defaults merged in at the top)
        field = "rope_scaling" if "rope_scaling" in raw else "rope_parameters"
        # a top-level rope_theta that transformers drops in favour of rope_parameters is still a broken file
        for params in [raw, rope, *(v for v in rope.values() if isinstance(v, dict))]:
            kind = params.get("rope_type", "default")
            if kind != "default" and not (isinstance(kind, str) and kind in ROPE_INIT_FUNCTIONS):
                refuse(
                    f"{field}.rope_type",
                    f"is {one_line(repr(kind), 40)}, not one of default, {', '.join(ROPE_INIT_FUNCTIONS)}",
                )
            if "rope_theta" in params and not _positive(params["rope_theta"]):
                refuse(
                    "rope_theta", f"must be a positive number, not {one_line(repr(params['rope_theta']), 40)}"
                )
    window = getattr(config, "sliding_window", None)
    if window not in (None, False) and not _count(window):
        refuse("sliding_window", f"must be an integer >= 0 or null, not {one_line(repr(window), 40)}")
    for attr in (family.embedding_multiplier, family.logits_divisor):
        if attr and getattr(config, attr, None) is not None and not _positive(getattr(config, attr)):
            refuse(attr, f"must be a positive number, not {one_line(repr(getattr(config, attr)), 40)}")
