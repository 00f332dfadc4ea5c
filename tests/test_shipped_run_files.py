"""The shipped run files (assets/weights/*.train.json) travel to other machines: no absolute path of the machine
that trained them, and the lanes fusions record the bench's evaluation that the studio opens on."""

import json
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "weights"


def test_shipped_run_files_name_their_data_relative_to_the_repository():
    runs = sorted(WEIGHTS.glob("*.train.json"))
    assert runs
    for run in runs:
        data = json.loads(run.read_text(encoding="utf-8"))["data"]
        for entry in data.values():
            for path in entry["paths"]:
                assert not Path(path).is_absolute() and (WEIGHTS.parent.parent / path).is_file(), (
                    run.name,
                    path,
                )


def test_the_shipped_lanes_fusions_record_their_evaluation():
    for name in ("lanes-trio", "lanes-branches"):
        ev = json.loads((WEIGHTS / f"{name}.train.json").read_text(encoding="utf-8"))["eval"]
        assert set(ev["perplexity"]) >= {
            "prose",
            "code",
            "mixed",
            "unseen prose",
            "unseen code",
            "unseen mixed",
        }
