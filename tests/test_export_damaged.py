"""`mol export` reports success only for a folder that loads: damaged sources (configs that lie, tensors of the
wrong shape, missing tensors, layer counts that disagree with the file) are refused with exit 2 and one line, and
leave nothing behind; whatever is exported loads with plain `from_pretrained` and runs. Also: the size limit."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mol.cli import main
from mol.errors import CheckpointError
from mol.export import export
from mol.export.verify import check_loadable

IDS = torch.randint(1, 380, (2, 9), generator=torch.Generator().manual_seed(3))


def damaged(tiny, tmp_path, family, config=None, tensors=None, name="src"):
    """A copy of a tiny checkpoint with its config.json updated by `config` and its tensors edited by `tensors`."""
    folder = tmp_path / name
    shutil.copytree(tiny(family), folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        sd = load_file(folder / "model.safetensors")
        tensors(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def edit(name, fn):
    def apply(sd):
        sd[name] = fn(sd[name])

    return apply


def drop(name):
    return lambda sd: sd.pop(name)


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4096])


LLAMA_UP = "model.layers.1.mlp.up_proj.weight"
GPT2_FC = "transformer.h.1.mlp.c_fc.weight"
# (id, family, config changes, tensor edit, slots); slots of one model: a standard export; "routed": a
# MoLForCausalLM export with the damaged model as the second expert of a routed slot.
CASES = [
    ("width-lie", "llama", {"hidden_size": 96}, None, "m:0-2, m:1-3"),
    ("ffn-lie", "llama", {"intermediate_size": 256}, None, "m:0-2, m:1-3"),
    ("heads-lie", "llama", {"num_attention_heads": 8}, None, "m:0-2, m:1-3"),
    ("vocab-lie", "llama", {"vocab_size": 500}, None, "m:0-2, m:1-3"),
    ("wrong-shape", "llama", None, edit(LLAMA_UP, lambda t: t[:100]), "m:0-2, m:1-3"),
    ("transposed", "llama", None, edit(LLAMA_UP, lambda t: t.T.contiguous()), "m:0-2, m:1-3"),
    ("missing-tensor", "llama", None, drop("model.layers.1.post_attention_layernorm.weight"), "m:0-2, m:1-3"),
    ("missing-head", "llama", None, drop("lm_head.weight"), "m:0-3"),
    ("more-layers-in-config", "llama", {"num_hidden_layers": 6}, None, "m:0-3, m:5"),
    ("fewer-layers-in-config", "llama", {"num_hidden_layers": 2}, None, "m:0-3"),
    ("positions-lie", "gpt2", {"n_positions": 512}, None, "m:0-2, m:1-3"),
    ("routed-width-lie", "gpt2", {"n_embd": 128}, None, "routed"),
    ("routed-wrong-shape", "gpt2", None, edit(GPT2_FC, lambda t: t[:, :100].contiguous()), "routed"),
    ("truncated-file", "llama", None, "truncate", "m:0-2, m:1-3"),
    ("bias-lie", "llama", {"attention_bias": True}, None, "m:0-2, m:1-3"),
    ("layer-types-lie", "llama", {"layer_types": ["full_attention"] * 2}, None, "m:0-2"),
    ("routed-missing-tensor", "gpt2", None, drop("transformer.h.1.ln_2.bias"), "routed"),
    # Damage that from_pretrained itself tolerates: the export must then load as the source does.
    ("tie-lie", "llama", {"tie_word_embeddings": True}, None, "m:0-2"),
    (
        "extra-tensor",
        "llama",
        None,
        lambda sd: sd.__setitem__("model.layers.1.extra.weight", sd[LLAMA_UP].clone()),
        "m:0-2",
    ),
    ("dtype-lie", "llama", {"torch_dtype": "float16", "dtype": "float16"}, None, "m:0-2"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_source_is_refused_or_exports_a_folder_that_loads(tiny, tmp_path, capsys, case):
    _, family, config, tensors, slots = case
    src = damaged(tiny, tmp_path, family, config, None if tensors == "truncate" else tensors)
    if tensors == "truncate":
        truncate(src)
    if slots == "routed":
        body = f"models: {{a: {tiny('llama')}, m: {src}}}\nslots: [a:0, {{experts: [a:1, m:1]}}, a:2]\n"
    else:
        body = f"models: {{m: {src}}}\nslots: [{slots}]\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: damaged\n" + body)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["export", str(recipe), str(out)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not leftovers
    if code == 2:
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
        assert not out.exists()
        return
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model.eval()(IDS).logits
    assert logits.shape[:2] == IDS.shape and torch.isfinite(logits).all()


def test_the_load_check_names_the_wrong_tensor(tiny, tmp_path):
    """The check itself, on an export whose config is then made to lie (whatever the plan catches upstream)."""
    recipe = f"name: s\nmodels: {{m: {tiny('llama')}}}\nslots: [m:0-2]\n"
    folder = export(recipe, tmp_path / "out").path
    check_loadable(folder)  # a good folder passes
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.0\.mlp\.\w+\.weight' is \[\d+, \d+\] in the "
        r"shards, but its config makes it .*\(and 8 more\)",
    ):
        check_loadable(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match=r"model.layers.3.* is missing"):
        check_loadable(folder)


def test_the_load_check_of_a_routed_export_uses_its_own_modelling_code(tiny, tmp_path):
    recipe = (
        f"name: r\nmodels: {{a: {tiny('llama')}, b: {tiny('gpt2', width=96)}}}\n"
        "slots: [a:0, {experts: [a:1, b:1]}, a:2]\n"
    )
    folder = export(recipe, tmp_path / "out").path
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["MoLForCausalLM"]
    check_loadable(folder)
    cfg["sources"]["b"]["config"]["n_inner"] = 200  # the expert block's MLP, as MoLForCausalLM builds it
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.slots\.1\.experts\.1\.layer\.mlp\.c_fc\.bias' is \[384\] "
        r"in the shards, but its config makes it \[200\] \(and 2 more\)",
    ):
        check_loadable(folder)


def test_a_folder_that_fails_the_check_never_reaches_out(tiny, tmp_path, monkeypatch):
    """A config the shards do not match (here: the written config made to lie) leaves nothing at `out`."""
    from mol.export import standard

    real = standard.standard_config

    def lying(the_plan, dtype, *args, **kwargs):
        cfg = real(the_plan, dtype, *args, **kwargs)
        cfg.intermediate_size = 96
        return cfg

    monkeypatch.setattr(standard, "standard_config", lying)
    recipe = f"name: s\nmodels: {{m: {tiny('llama')}}}\nslots: [m:0-2]\n"
    with pytest.raises(CheckpointError, match="would not load"):
        export(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_over_the_size_limit_is_refused_with_its_size(tiny, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: s\nmodels: {{m: {tiny('llama')}}}\nslots: [m:0-3]\n")
    assert main(["export", str(recipe), str(tmp_path / "out"), "--max-size", "100KiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the limit of 100.0 KiB" in err, err
    estimate = float(re.search(r"would write ([\d.]+) KiB", err).group(1)) * 1024
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]
    for lift in (["--allow-large", "--max-size", "100KiB"], ["--max-size", "0"], ["--max-size", "10GB"]):
        out = tmp_path / f"out{len(lift)}{lift[-1]}"
        assert main(["export", str(recipe), str(out), *lift]) == 0, capsys.readouterr().err
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert abs(written - estimate) < 0.01 * written  # the estimate is the weights' size, headers aside


@pytest.mark.parametrize("value", ["nan", "inf", "-1GB", "ten", "1e400"])
def test_bad_sizes_are_usage_errors(tiny, tmp_path, capsys, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: s\nmodels: {{m: {tiny('llama')}}}\nslots: [m:0]\n")
    for option in ("--max-size", "--shard-size"):
        assert main(["export", str(recipe), str(tmp_path / "out"), option, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option in err and "Traceback" not in err, err
