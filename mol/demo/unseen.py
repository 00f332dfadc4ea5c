"""Text none of the demo models was trained on: other authors' prose and other projects' code, for checking that a
fusion is robust rather than tuned to the demo corpora' test split.

    python -m mol.demo.unseen            # rebuild assets/corpora/unseen/ (pip downloads the pinned sdists)

- prose: the user guides of click and attrs (their `docs/*.md` files, English technical prose by other authors
  than the Shakespeare the prose models read), with code blocks, directives and markup tables left out;
- code: the `.py` sources of requests and click (other projects than the CPython standard library the code models
  read), whole files.

The sdists are pinned by version and SHA-256; each project's licence travels with the text taken from it. The
mixed set interleaves the two like `assets/corpora/mixed_test.txt` (same chunking, `mol.demo.corpora.build_mixed`).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mol.demo import EOS
from mol.demo.corpora import build_mixed, fetch_sdist


@dataclass(frozen=True)
class Sdist:
    name: str
    version: str
    sha256: str
    licence: str  # the licence file inside the sdist
    spdx: str

    @property
    def file(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


SDISTS = {
    "click": Sdist(
        "click",
        "8.5.1",
        "9bbfada76703fd1d784b83eea012e3e8c6a001a876543ef104fa56aaaeb072b4",
        "LICENSE.txt",
        "BSD-3-Clause",
    ),
    "attrs": Sdist(
        "attrs",
        "26.1.0",
        "d03ceb89cb322a8fd706d4fb91940737b6642aa36998fe130a9bc96c985eff32",
        "LICENSE",
        "MIT",
    ),
    "requests": Sdist(
        "requests",
        "2.34.2",
        "f288924cae4e29463698d6d60bc6a4da69c89185ad1e0bcc4104f584e960b9ed",
        "LICENSE",
        "Apache-2.0",
    ),
}
# (sdist, folder inside it, suffix); files taken whole, in name order, until the size target.
PROSE_FROM = [("click", "docs/", ".md"), ("attrs", "docs/", ".md")]
CODE_FROM = [("requests", "src/requests/", ".py"), ("click", "src/click/", ".py")]
# Reference pages, changelogs and licence pages are lists of names, not prose.
PROSE_SKIPPED = {
    "api.md",
    "changes.md",
    "changelog.md",
    "license.md",
    "index.md",
    "api-attr.md",
    "glossary.md",
}
TARGET_BYTES = 200_000
OUT = Path(__file__).resolve().parents[2] / "assets" / "corpora" / "unseen"


def fetch(sdist: Sdist, into: Path) -> Path:
    return fetch_sdist(sdist.name, sdist.version, sdist.sha256, into)


def markdown_prose(text: str) -> str:
    """The paragraphs of a MyST/Markdown page: fenced blocks (code, directives), HTML, tables, link targets and
    headings' markers removed; blank-line separated."""
    # fenced code and directives, at any indent (inside list items too)
    text = re.sub(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1\s*$", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    kept = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|", "<", "(", "[", ":", "{", ">>>", "$ ")) or s.startswith("    "):
            continue
        if line.startswith("    "):  # indented code
            continue
        kept.append(re.sub(r"^#+\s*", "", line).rstrip())
    text = "\n".join(kept)
    text = re.sub(
        r"\{[a-z:]+\}`~?([^`<]*?)\s*(<[^`]*>)?`", r"`\1`", text
    )  # MyST roles: {func}`name` -> `name`
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _members(tar: tarfile.TarFile, root: str, folder: str, suffix: str) -> list[tarfile.TarInfo]:
    prefix = f"{root}/{folder}"
    return sorted(
        (m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix) and m.name.endswith(suffix)),
        key=lambda m: m.name,
    )


def collect(
    sources: list[tuple[str, str, str]], sdists: dict[str, Path], prose: bool
) -> tuple[list[str], list]:
    """Whole documents from `sources` in order until TARGET_BYTES; returns their texts and their provenance."""
    docs, names, total = [], [], 0
    for key, folder, suffix in sources:
        sd = SDISTS[key]
        root = f"{sd.name}-{sd.version}"
        with tarfile.open(sdists[key]) as tar:
            for m in _members(tar, root, folder, suffix):
                if prose and Path(m.name).name in PROSE_SKIPPED:
                    continue
                raw = tar.extractfile(m).read().decode("utf-8")
                text = markdown_prose(raw) if prose else raw
                if len(text.strip()) < 200 or total >= TARGET_BYTES:
                    continue
                docs.append(text)
                names.append(m.name.removeprefix(root + "/") + f" ({sd.name} {sd.version})")
                total += len(text.encode("utf-8"))
    return docs, names


def build(out: Path, cache: Path) -> dict:
    sdists = {k: fetch(sd, cache) for k, sd in SDISTS.items()}
    out.mkdir(parents=True, exist_ok=True)
    prose, prose_files = collect(PROSE_FROM, sdists, prose=True)
    code, code_files = collect(CODE_FROM, sdists, prose=False)
    (out / "prose.txt").write_text(EOS.join(prose), encoding="utf-8")
    (out / "code.txt").write_text(EOS.join(code), encoding="utf-8")
    text, spans = build_mixed(prose, code)
    (out / "mixed.txt").write_text(text, encoding="utf-8")
    (out / "mixed.spans.json").write_text(json.dumps({"spans": spans}) + "\n", encoding="utf-8")
    licences = out / "licences"
    licences.mkdir(exist_ok=True)
    for key, sd in SDISTS.items():
        with tarfile.open(sdists[key]) as tar:
            text_of = tar.extractfile(f"{sd.name}-{sd.version}/{sd.licence}").read().decode("utf-8")
            (licences / f"{sd.name}-{sd.spdx}.txt").write_text(text_of, encoding="utf-8")
            notice = f"{sd.name}-{sd.version}/NOTICE"  # Apache-2.0 asks that the NOTICE travel too
            if notice in tar.getnames():
                (licences / f"{sd.name}-NOTICE.txt").write_bytes(tar.extractfile(notice).read())
    manifest = {
        "format": 1,
        "document_separator": EOS,
        "sdists": {k: {"file": sd.file, "sha256": sd.sha256, "licence": sd.spdx} for k, sd in SDISTS.items()},
        "files": {
            "prose.txt": {"documents": prose_files, "bytes": (out / "prose.txt").stat().st_size},
            "code.txt": {"documents": code_files, "bytes": (out / "code.txt").stat().st_size},
            "mixed.txt": {
                "built_from": ["prose.txt", "code.txt"],
                "chunks": len(spans),
                "bytes": (out / "mixed.txt").stat().st_size,
            },
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mol.demo.unseen", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="where to write (default: assets/corpora/unseen)")
    p.add_argument("--cache", type=Path, help="folder for the downloaded sdists (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build(args.out, args.cache or Path(tmp))
    for name, f in manifest["files"].items():
        print(f"{name}: {f['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
