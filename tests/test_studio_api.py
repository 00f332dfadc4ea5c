"""The studio's actions through `gradio_client`, against a served app with tiny models and a real SQLite file."""

from __future__ import annotations

import pytest
import yaml

from tests.studio_server import local_client, serving_studio

ENDPOINTS = {
    "/list_models",
    "/inspect_model",
    "/validate_recipe",
    "/save_recipe",
    "/list_recipes",
    "/list_versions",
    "/get_version",
    "/duplicate_version",
    "/compare_versions",
    "/delete_recipe",
    "/restore_recipe",
    "/import_recipe",
    "/export_mergekit",
    "/add_slot",
    "/add_expert",
    "/remove_slot",
    "/remove_expert",
    "/move_slot",
    "/set_router",
    "/generate",
    "/generate_source",
    "/list_runs",
    "/get_run",
    "/train",
    "/list_training_runs",
    "/evaluate",
    "/generate_stream",
    "/server_status",
}


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny):
    with serving_studio(tmp_path_factory, tiny, "api") as running:
        yield running


@pytest.fixture(scope="module")
def client(studio):
    return local_client(studio.url)


def recipe_yaml(studio, name="api-recipe", slots=("bard:0",)) -> str:
    models = studio.engine.embedded_models()
    return yaml.safe_dump(
        {
            "name": name,
            "base": "bard",
            "models": {a: models[a] for a in ("bard", "coder")},
            "slots": list(slots),
        }
    )


def test_every_action_is_a_named_endpoint(client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert ENDPOINTS <= named


def test_models(client, studio):
    cards = {c["alias"]: c for c in client.predict(api_name="/list_models")}
    assert set(cards) == {"bard", "coder", "base"}
    assert cards["coder"]["family"] == "gpt_neox" and cards["coder"]["layers"] == 3
    assert cards["bard"]["fusable"].startswith("yes, with ")
    card = client.predict(studio.engine.embedded_models()["base"], "gen", api_name="/inspect_model")
    assert (card["alias"], card["family"], card["layers"]) == ("gen", "gpt2", 2)


def test_inspect_errors_are_messages_not_tracebacks(client, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(str(tmp_path / "nothing"), "", api_name="/inspect_model")
    assert "does not exist" in str(info.value) and "Traceback" not in str(info.value)


def test_edit_validate_save_version_compare_duplicate_delete_restore(client, studio):
    text = recipe_yaml(studio)
    text = client.predict(text, "bard:1", -1, api_name="/add_slot")
    text = client.predict(text, 1, "coder:1", api_name="/add_expert")
    text = client.predict(text, "bard:3", 0, api_name="/add_slot")
    text = client.predict(text, 2, "pooled", 1, api_name="/set_router")
    text = client.predict(text, 0, 2, api_name="/move_slot")
    slots = yaml.safe_load(text)["slots"]
    assert [s["experts"] for s in slots] == [["bard:0"], ["bard:1", "coder:1"], ["bard:3"]]
    assert slots[1]["router"] == {"type": "pooled"}

    report = client.predict(text, api_name="/validate_recipe")
    assert report["ok"] and report["summary"]["routed_slots"] == 1
    bad = client.predict(text.replace("bard:3", "bard:7"), api_name="/validate_recipe")
    assert not bad["ok"] and "out of range" in bad["error"]

    v1 = client.predict(text, "three slots", api_name="/save_recipe")
    assert v1["number"] == 1 and v1["warning"] is None
    text2 = client.predict(
        client.predict(text, 1, "coder:1", api_name="/remove_expert"), 2, api_name="/remove_slot"
    )
    v2 = client.predict(text2, "plain", api_name="/save_recipe")
    assert (v2["recipe_id"], v2["number"]) == (v1["recipe_id"], 2)
    versions = client.predict(v1["recipe_id"], api_name="/list_versions")
    assert [v["note"] for v in versions] == ["three slots", "plain"]

    diff = client.predict(v1["id"], v2["id"], api_name="/compare_versions")
    assert not diff["identical"] and "slots" in diff["changed_keys"]
    assert {s["kind"] for s in diff["slots"]} >= {"removed"}

    copy = client.predict(v2["id"], "", api_name="/duplicate_version")
    assert copy["recipe_name"] == "api-recipe (copy)" and copy["yaml_text"] == v2["yaml_text"]

    client.predict(v1["recipe_id"], api_name="/delete_recipe")
    live = {r["name"] for r in client.predict(False, api_name="/list_recipes")}
    assert "api-recipe" not in live and "api-recipe (copy)" in live
    client.predict(v1["recipe_id"], "", api_name="/restore_recipe")
    assert "api-recipe" in {r["name"] for r in client.predict(False, api_name="/list_recipes")}
    assert client.predict(v2["id"], api_name="/get_version")["yaml_text"] == v2["yaml_text"]


def test_import_mergekit(client):
    text = (
        "slices:\n  - sources: [{model: assets/models/mango-bard, layer_range: [0, 2]}]\n"
        "  - sources: [{model: assets/models/mango-coder, layer_range: [1, 2]}]\nmerge_method: passthrough\n"
    )
    recipe = yaml.safe_load(client.predict(text, api_name="/import_recipe"))
    assert recipe["models"] == {
        "mango-bard": "assets/models/mango-bard",
        "mango-coder": "assets/models/mango-coder",
    }
    assert [s["experts"] for s in recipe["slots"]] == [["mango-bard:0"], ["mango-bard:1"], ["mango-coder:1"]]


def test_export_mergekit(client, studio):
    from gradio_client.exceptions import AppError

    text = client.predict(
        recipe_yaml(studio, "stack", ["bard:0", "bard:1", "bard:1", "bard:3"]), api_name="/export_mergekit"
    )
    data = yaml.safe_load(text)
    assert data["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 2], [1, 2], [3, 4]]
    with pytest.raises(AppError, match="no mergekit passthrough equivalent"):
        client.predict(
            recipe_yaml(studio, "routed", ["bard:0", ["bard:1", "coder:1"]]), api_name="/export_mergekit"
        )


def test_generate_stores_the_run(client, studio):
    v = client.predict(
        recipe_yaml(studio, "api-run", ["bard:0", ["bard:1", "coder:1"], "bard:2"]),
        "",
        api_name="/save_recipe",
    )
    out = client.predict(v["id"], "To be", 5, False, 1.0, 0, 1.0, 0, api_name="/generate")
    run = client.predict(out["run_id"], api_name="/get_run")
    assert run["output"] == out["text"] and run["version_id"] == v["id"]
    assert run["trace"] == out["trace"]
    assert [s["experts"] for s in run["trace"]["slots"]] == [["bard:1", "coder:1"]]
    assert out["run_id"] in [r["id"] for r in client.predict(10, api_name="/list_runs")]
    alone = client.predict(v["id"], "coder", "To be", 3, api_name="/generate_source")
    assert isinstance(alone, str)
