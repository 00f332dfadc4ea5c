"""Text data for training and evaluation: files or folders per named domain, tokenised into one stream per
domain with a domain label on every token, cut into fixed-length sequences.

    domains = load_domains(["prose=corpora/prose/train.txt", "code=src/"])
    tokens = tokenize_domains(model.tokenizer, domains)
    batches = TrainBatches(tokens, seq_len=256, batch_size=8, seed=0)
    ids, labels = batches.batch(step)

A text file may carry per-character labels in a sidecar `<stem>.spans.json` ({"spans": [[start, end, label],
...]}), e.g. an interleaved test set; its tokens are then labelled by span instead of by the domain name.
Labels feed closed-form router initialisation and evaluation, never a trained router's input."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mol.errors import DataError

TEXT_EXTENSIONS = (
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".js",
    ".ts",
    ".c",
    ".h",
    ".cpp",
    ".java",
    ".go",
    ".rs",
    ".json",
    ".yaml",
    ".yml",
    ".toml",
    ".html",
    ".css",
    ".sh",
    ".tex",
)
NO_LABEL = -1


@dataclass
class Document:
    path: Path
    text: str
    spans: list[tuple[int, int, str]] | None = None  # per-character labels from a sidecar file


@dataclass
class Domain:
    """One `--data name=path[,path]` entry, read."""

    name: str
    paths: list[Path]
    documents: list[Document]

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


@dataclass
class DomainTokens:
    """A domain as one token stream: documents joined by the end-of-text token, a label index per token."""

    name: str
    ids: torch.Tensor  # [N] long
    labels: torch.Tensor  # [N] long, index into label_names (NO_LABEL where unknown)
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.numel())


def parse_data_arg(arg: str) -> tuple[str, list[Path]]:
    """'prose=a.txt,b/' -> ('prose', [a.txt, b/]). A bare path is named after its file or folder stem."""
    if "=" in arg:
        name, _, rest = arg.partition("=")
        name = name.strip()
    else:
        rest = arg
        name = Path(arg.split(",")[0]).stem
    paths = [Path(p.strip()) for p in rest.split(",") if p.strip()]
    if not name or not paths:
        raise DataError(f"--data '{arg}': write name=path[,path] (e.g. prose=corpora/prose/train.txt).")
    return name, paths


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS and not p.name.endswith(".spans.json")
        )
        if not found:
            raise DataError(f"Folder '{path}' has no text files ({', '.join(TEXT_EXTENSIONS[:5])}, ...).")
        return found
    raise DataError(f"Data path '{path}' does not exist.")


def _read_spans(path: Path, text_length: int) -> list[tuple[int, int, str]] | None:
    sidecar = path.with_name(path.stem + ".spans.json")
    if not sidecar.is_file():
        return None
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))["spans"]
        spans = [(int(a), int(b), str(label)) for a, b, label in raw]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"'{sidecar}' is not a spans file ({{\"spans\": [[start, end, label], ...]}}): {exc}."
        ) from None
    if any(not 0 <= a <= b <= text_length for a, b, _ in spans):
        raise DataError(f"'{sidecar}' has spans outside its text ({text_length} characters).")
    return spans


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    docs = []
    for root in paths:
        for path in _files_under(Path(root)):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"'{path}' is not UTF-8 text.") from None
            except OSError as exc:
                raise DataError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
            if (
                "\x00" in text
            ):  # valid UTF-8 but binary (an image, a checkpoint): no tokenizer makes sense of it
                raise DataError(f"'{path}' is binary (it holds NUL bytes), not text.")
            if text.strip():
                docs.append(Document(path, text, _read_spans(path, len(text))))
    return docs


def load_domains(spec: Mapping[str, Iterable[str | Path]] | Iterable[str]) -> list[Domain]:
    """Read every domain: a mapping name -> paths, or `--data` strings ('name=path[,path]')."""
    if isinstance(spec, Mapping):
        items = [
            (str(k), [Path(p) for p in ([v] if isinstance(v, str | Path) else v)]) for k, v in spec.items()
        ]
    else:
        items = [parse_data_arg(s) for s in spec]
    if not items:
        raise DataError("No data given; pass at least one --data name=path.")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise DataError(
            f"Domain names must be distinct, got {', '.join(names)}; list several paths as name=a,b."
        )
    domains = []
    for name, paths in items:
        docs = read_documents(paths)
        if not docs:
            raise DataError(f"Domain '{name}' has no text: {', '.join(map(str, paths))} are empty.")
        domains.append(Domain(name, paths, docs))
    return domains


def _encode(tokenizer, text: str, with_offsets: bool):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_offsets, verbose=False)
    return enc["input_ids"], enc.get("offset_mapping")


def tokenize_domains(
    tokenizer, domains: list[Domain], max_tokens: int | None = None
) -> dict[str, DomainTokens]:
    """Each domain as one stream (documents separated by end-of-text), all sharing one label vocabulary:
    domain names, then span labels in order of appearance. `max_tokens` caps each stream."""
    if tokenizer is None:
        raise DataError(
            "The base model has no tokenizer files; training and evaluation need them to read text."
        )
    eos = tokenizer.eos_token_id
    names: list[str] = []
    for d in domains:
        if any(doc.spans is None for doc in d.documents) and d.name not in names:
            names.append(d.name)
    for d in domains:
        for doc in d.documents:
            for _, _, label in doc.spans or []:
                if label not in names:
                    names.append(label)
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for d in domains:
        ids: list[int] = []
        labels: list[int] = []
        for doc in d.documents:
            if ids and eos is not None:
                ids.append(eos)
                labels.append(labels[-1])
            doc_ids, offsets = _encode(tokenizer, doc.text, doc.spans is not None)
            ids.extend(doc_ids)
            if doc.spans is None:
                labels.extend([index[d.name]] * len(doc_ids))
            else:
                labels.extend(_span_labels(offsets, doc.spans, index))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        if len(ids) < 2:
            raise DataError(f"Domain '{d.name}' gives {len(ids)} tokens; give at least a few hundred.")
        out[d.name] = DomainTokens(
            d.name, torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), names
        )
    return out


def _span_labels(offsets, spans: list[tuple[int, int, str]], index: dict[str, int]) -> list[int]:
    """The label of the span holding each token's first character (NO_LABEL outside every span)."""
    ordered = sorted(spans)
    labels, j = [], 0
    for start, _ in offsets:
        while j < len(ordered) and ordered[j][1] <= start:
            j += 1
        inside = j < len(ordered) and ordered[j][0] <= start < ordered[j][1]
        labels.append(index[ordered[j][2]] if inside else NO_LABEL)
    return labels


@dataclass
class Windows:
    """Consecutive non-overlapping windows of one stream, the last one padded (mask 0)."""

    input_ids: torch.Tensor  # [M, L]
    labels: torch.Tensor  # [M, L]
    attention_mask: torch.Tensor  # [M, L]


def windows(tokens: DomainTokens, seq_len: int) -> Windows:
    n = len(tokens)
    rows = max(1, -(-n // seq_len))
    ids = torch.zeros(rows * seq_len, dtype=torch.long)
    labels = torch.full((rows * seq_len,), NO_LABEL, dtype=torch.long)
    mask = torch.zeros(rows * seq_len, dtype=torch.long)
    ids[:n], labels[:n], mask[:n] = tokens.ids, tokens.labels, 1
    shape = (rows, seq_len)
    return Windows(ids.view(shape), labels.view(shape), mask.view(shape))


class TrainBatches:
    """Packed training sequences drawn evenly from every domain. Batch `step` depends only on (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would.

    With `mixed_share` > 0, that share of rows interleaves chunks of about `chunk` tokens from alternating
    domains (as in a mixed test set), so a token router also learns to switch inside a sequence."""

    def __init__(
        self,
        tokens: Mapping[str, DomainTokens],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        mixed_share: float = 0.0,
        chunk: int = 256,
    ):
        self.domains = list(tokens.values())
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.mixed_share, self.chunk = mixed_share, max(1, chunk)
        if not self.domains:
            raise DataError("No training data.")
        for d in self.domains:
            if len(d) < seq_len + 1:
                raise DataError(
                    f"Domain '{d.name}' has {len(d)} tokens, fewer than one sequence of {seq_len}; "
                    "give more text or a shorter --seq-len."
                )

    def _piece(self, d: DomainTokens, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(torch.randint(0, len(d) - length + 1, (1,), generator=gen))
        return d.ids[start : start + length], d.labels[start : start + length]

    def _mixed_row(self, first: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels, filled, k = [], [], 0, first
        while filled < self.seq_len:
            length = int(torch.randint(self.chunk // 2, self.chunk * 3 // 2 + 1, (1,), generator=gen))
            length = max(1, min(length, self.seq_len - filled))
            piece_ids, piece_labels = self._piece(self.domains[k % len(self.domains)], length, gen)
            ids.append(piece_ids)
            labels.append(piece_labels)
            filled += length
            k += 1
        return torch.cat(ids), torch.cat(labels)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, seq_len] token ids, [batch, seq_len] labels); row r comes from domain (step*batch + r) mod n."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows_ids, rows_labels = [], []
        for r in range(self.batch_size):
            first = step * self.batch_size + r
            mixed = (
                self.mixed_share > 0
                and len(self.domains) > 1
                and float(torch.rand(1, generator=gen)) < self.mixed_share
            )
            if mixed:
                ids, labels = self._mixed_row(first, gen)
            else:
                ids, labels = self._piece(self.domains[first % len(self.domains)], self.seq_len, gen)
            rows_ids.append(ids)
            rows_labels.append(labels)
        return torch.stack(rows_ids), torch.stack(rows_labels)
