"""The performance suite's CPU smoke run: every section runs at tiny sizes and the JSON has its keys (no timing
assertions: absolute times mean something only on the GPU the real suite runs on)."""

import json

from bench.perf.__main__ import run
from bench.perf.table import markdown


def test_smoke_suite_writes_every_section(tmp_path):
    out = run(smoke=True, out_dir=tmp_path, budget=600)
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    for key in (
        "env",
        "sizes",
        "ceilings",
        "prefill",
        "decode",
        "routed_slot",
        "training",
        "build",
        "placement",
    ):
        assert key in r, key
    for key in ("card", "torch", "transformers", "date"):
        assert key in r["env"]
    for name in ("identity", "two_source"):
        for bsz in ("1", "2"):
            row = r["decode"]["recipes"][name]["batches"][bsz]
            assert {"plain", "fast_graph", "floor_tokens_per_s"} <= set(row)
            assert row["fast_graph"]["tokens_vs_plain"][
                "equal"
            ]  # the fast path's greedy tokens are the plain's
    assert "transformers" in r["decode"]["recipes"]["identity"]["batches"]["1"]
    assert all(v["graph_replayed"]["equal"] for v in r["decode"]["correctness_fp32"].values())
    assert r["prefill"]["identity"]["logits_max_abs_diff_vs_transformers"] <= 1e-4
    assert {"routed_over_one_block", "dense_over_one_block", "tokens_to_expert_1"} <= set(r["routed_slot"])
    assert r["routed_slot"]["subset_vs_dense_max_abs_diff"] <= 1e-5
    assert {"tokens_per_s", "flops_per_step", "achieved_flops"} <= set(r["training"])
    assert {"selected_bytes", "logical_read_bytes", "peak_rss_bytes", "seconds"} <= set(r["build"]["mol"])
    assert r["build"]["mol"]["logical_read_bytes"] == r["build"]["mol"]["selected_bytes"]
    assert r["placement"]["cpu_map"]["logits_max_abs_diff"] == 0.0
    assert "Decode, greedy" in markdown(r)
