"""The load benchmark's smoke run: two simulated users for two seconds against a served studio with tiny
models; every request completes, the figures add up, and the server's gate saw the same requests (no timing
assertions: latencies depend on the machine)."""

import yaml

from bench.load.run import markdown, prompt_lengths, run_load, server_status
from tests.studio_server import make_models_dir, start_studio


def test_two_users_for_two_seconds(tmp_path, tiny):
    models_dir = make_models_dir(tmp_path / "models", tiny)
    studio = start_studio(models_dir, tmp_path / "studio.db", generation_concurrency=1)
    try:
        from gradio_client import Client

        models = studio.engine.embedded_models()
        text = yaml.safe_dump(
            {
                "name": "load",
                "base": "bard",
                "models": {a: models[a] for a in ("bard", "coder")},
                "slots": ["bard:0", ["bard:1", "coder:1"], "bard:2"],
            }
        )
        version = Client(studio.url, verbose=False).predict(text, "", api_name="/save_recipe")
        result = run_load(
            studio.url,
            version["id"],
            users=2,
            seconds=2,
            new_tokens=4,
            prompt_tokens=prompt_lengths(models_dir / "mango-bard"),
        )
        status = server_status(studio.url)
    finally:
        studio.close()
    assert result["errors"] == 0 and result["error_messages"] == []
    assert result["completed"] == result["requests"] == sum(result["requests_per_user"])
    assert all(n >= 1 for n in result["requests_per_user"])
    assert 0 < result["throughput"]["new_tokens_total"] <= 4 * result["completed"]
    assert result["latency_s"]["p50"] <= result["latency_s"]["p95"] <= result["latency_s"]["max"]
    gate = status["generation"]
    assert gate["admitted"] == result["completed"] and gate["refused"] == 0
    assert (gate["capacity"], gate["peak_running"], gate["running"]) == (1, 1, 0)
    assert status["cached_models"] == 1
    row = markdown({"runs": [{**result, "server": {"generation_gate": gate, "cpu_cores_busy": 0.5}}]})
    assert f"| 2 | 1 | {result['completed']} | 0 |" in row
