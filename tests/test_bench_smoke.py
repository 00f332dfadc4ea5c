"""The performance suite's CPU smoke run: every section runs at tiny sizes and the JSON has its keys (no timing
assertions: absolute times mean something only on the GPU the real suite runs on)."""

import json

from bench.perf.__main__ import run
from bench.perf.table import markdown
from bench.perf.targets import KEYS


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
        "reference",
        "lanes",
        "cpu",
        "first_call",
        "export",
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
    # the peer baseline decodes the plain path's tokens (float32 on the CPU)
    assert all(v["tokens_vs_plain"]["equal"] for v in r["reference"]["batches"].values())
    assert r["lanes"]["decode"]["1"]["lanes_over_sum"] > 0 and r["lanes"]["prefill"]["lanes_over_sum"] > 0
    assert r["lanes"]["mixture"] == {"skipped": "needs CUDA and Triton"}  # (the kernel's timing: CUDA only)
    assert {"vs_transformers", "tokens_vs_transformers"} <= set(r["cpu"]["decode"])
    assert r["first_call"]["in_process"]["first_call_s"] > 0


def test_smoke_suite_writes_the_targets_table(tmp_path):
    out = run(
        smoke=True, out_dir=tmp_path, budget=600, sections=["ceilings", "prefill", "routed_slot", "cpu"]
    )
    r = json.loads(out.read_text())
    t = r["targets"]
    assert tuple(t) == KEYS and len(KEYS) >= 17
    for key, e in t.items():
        assert {"what", "unit", "op", "target", "value", "met"} <= set(e), key
        assert isinstance(e["met"], bool) and isinstance(e["target"], float), key
        if e["value"] is None:  # not measured here: says why, never passes
            assert e["reason"] and not e["met"], key
        else:
            assert e["met"] == (e["value"] >= e["target"] if e["op"] == ">=" else e["value"] <= e["target"])
    assert t["decode_default_floor_b1"]["value"] is None  # no CUDA in the smoke run
    assert t["routed_slot_eager"]["value"] == r["routed_slot"]["routed_over_one_block"]
    assert t["min_vs_transformers"]["value"] == min(t["min_vs_transformers"]["by_shape"].values())
    assert "decode b1 plain (cpu, 2 threads)" in t["min_vs_transformers"]["by_shape"]
    assert "section lanes not run" in t["lanes_decode_vs_sum"]["reason"]
    assert "| `training_mfu`" in markdown(r)
    # --add: a later run of other sections keeps these and recomputes the targets over both
    out = run(smoke=True, out_dir=tmp_path, budget=600, sections=["lanes"], add=True)
    r = json.loads(out.read_text())
    assert {"routed_slot", "cpu", "lanes"} <= set(r) and len(r["runs"]) == 2
    assert r["targets"]["lanes_decode_vs_sum"]["value"] is not None
    assert r["targets"]["routed_slot_eager"]["value"] is not None
