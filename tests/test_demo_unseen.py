"""The unseen-text corpora (assets/corpora/unseen): the prose is prose (code blocks, directives and markup gone), and
the shipped files are the ones their manifest describes."""

import json
from pathlib import Path

from mol.demo import EOS
from mol.demo.unseen import OUT, SDISTS, markdown_prose


def test_markdown_prose_keeps_the_paragraphs_only():
    page = (
        "# Options\n\nUse {func}`click.option` to add an [option](options.md).\n\n"
        "```python\n@click.command()\ndef cli(): pass\n```\n\n"
        "```{admonition} Note\nA directive.\n```\n\n| a | b |\n|---|---|\n\n    indented code\n\nThe end.\n"
    )
    assert markdown_prose(page) == "Options\n\nUse `click.option` to add an option.\n\nThe end.\n"


def test_the_shipped_unseen_corpora_match_their_manifest():
    manifest = json.loads((OUT / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["sdists"]) == set(SDISTS)
    for name, entry in manifest["files"].items():
        path = Path(OUT / name)
        assert path.stat().st_size == entry["bytes"], name
    prose = (OUT / "prose.txt").read_text(encoding="utf-8")
    assert prose.count(EOS) == len(manifest["files"]["prose.txt"]["documents"]) - 1
    assert "```" not in prose and "def " not in prose.split(EOS)[0][:2000]
    spans = json.loads((OUT / "mixed.spans.json").read_text(encoding="utf-8"))["spans"]
    mixed = (OUT / "mixed.txt").read_text(encoding="utf-8")
    assert spans[-1][1] == len(mixed) and {d for _, _, d in spans} == {"prose", "code"}
    for sd in SDISTS.values():
        assert (OUT / "licences" / f"{sd.name}-{sd.spdx}.txt").is_file()
