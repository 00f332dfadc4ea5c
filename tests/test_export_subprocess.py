"""Exports load where Mango is not installed: a fresh interpreter that refuses to import `mol` loads the
standard export with plain transformers and the MoL export with trust_remote_code, and gets the fused runtime's
logits and generations. Also: `import mol` registration stays lazy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import mol
from mol.export import export

REPO = Path(__file__).resolve().parents[1]

LOADER = r"""
import importlib.abc, json, sys

class NoMol(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mol" or name.startswith("mol."):
            raise ImportError("mol is not installed here")

sys.meta_path.insert(0, NoMol())
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

folder, inputs, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
data = load_file(inputs)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
with torch.no_grad():
    logits = model(data["ids"], attention_mask=data["mask"]).logits
real = data["mask"].bool()
diff = (logits - data["logits"])[real].abs().max().item()
prompt, pmask = data["ids"][:, :7], data["mask"][:, :7]
generated = model.generate(prompt, attention_mask=pmask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
print(json.dumps({"diff": diff, "generated": generated.tolist(), "class": type(model).__module__,
                  "mol_imported": any(k == "mol" or k.startswith("mol.") for k in sys.modules)}))
"""


def run_without_mol(tmp_path, folder, remote, ids, mask, logits):
    inputs = tmp_path / "inputs.safetensors"
    save_file({"ids": ids, "mask": mask, "logits": logits.contiguous()}, str(inputs))
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(inputs), "1" if remote else "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def batch():
    ids = torch.randint(1, 380, (2, 12), generator=torch.Generator().manual_seed(21))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def test_standard_export_loads_without_mol(tiny, tmp_path):
    recipe = mol.Recipe.from_dict(
        {"name": "s", "models": {"m": str(tiny("qwen2"))}, "slots": ["m:0-3", "m:2-3"]}
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    folder = export(recipe, tmp_path / "standard").path
    ids, mask = batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    got = run_without_mol(tmp_path, folder, False, ids, mask, logits)
    assert got["diff"] <= 1e-5
    assert got["class"].startswith("transformers.models.qwen2")
    assert not got["mol_imported"]
    ours = model.generate(ids[:, :7], attention_mask=mask[:, :7], max_new_tokens=6, eos_token_id=[])
    assert got["generated"] == ours.tolist()


def test_mol_export_loads_with_remote_code_without_mol(tiny, tmp_path):
    recipe = mol.Recipe.from_dict(
        {
            "name": "r",
            "base": "l",
            "models": {
                "l": str(tiny("llama")),
                "g": str(tiny("gpt2", width=96)),
                "n": str(tiny("gpt_neox", width=48)),
            },
            "slots": [
                "l:0",
                {"experts": ["l:1", "g:1"]},
                "n:2",
                {"experts": ["l:3", "n:3"], "router": "pooled"},
            ],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for slot in model.routed_slots:
            slot.router.proj.weight.copy_(torch.randn(slot.router.proj.weight.shape, generator=g) * 2)
    folder = export(model, tmp_path / "remote").path
    ids, mask = batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    got = run_without_mol(tmp_path, folder, True, ids, mask, logits)
    assert got["diff"] <= 1e-5
    assert got["class"].startswith("transformers_modules.") and got["class"].endswith("modeling_mol")
    assert not got["mol_imported"]
    ours = model.generate(ids[:, :7], attention_mask=mask[:, :7], max_new_tokens=6, eos_token_id=[])
    assert got["generated"] == ours.tolist()


def test_registered_auto_classes_load_mol_exports_without_remote_code(tiny, tmp_path):
    """`mol.register_auto_classes()` registers MoL the documented way; a MoL folder then loads with the library's
    own network and no trust_remote_code, and nothing of transformers is imported by `import mol` alone."""
    recipe = mol.Recipe.from_dict(
        {
            "name": "r",
            "base": "l",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))},
            "slots": ["l:0", {"experts": ["l:1", "g:1"]}],
        }
    )
    folder = export(recipe, tmp_path / "out").path
    code = f"""
import sys
import mol
print("transformers" in sys.modules)
mol.register_auto_classes()
from transformers import AutoConfig, AutoModelForCausalLM
print(type(AutoConfig.from_pretrained({str(folder)!r})).__module__)
print(type(AutoModelForCausalLM.from_pretrained({str(folder)!r})).__module__)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()[-3:]
    assert lines == ["False", "mol.network.configuration_mol", "mol.network.modeling_mol"]
    assert not (tmp_path / "modules").exists()  # no remote code was copied or run


QUIET_LOADER = r"""
import json, sys

sys.modules["mol"] = None  # Mango is not installed here: `import mol` raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
# the loading lines of the export's own model card, run as they are written there
card = open(folder + "/README.md", encoding="utf-8").read()
snippet = card.split("## Loading", 1)[1].split("```python", 1)[1].split("```", 1)[0]
scope = {}
exec(snippet.replace("<this folder or repo>", folder), scope)
tokenizer, model = scope["tokenizer"], scope["model"].eval()
ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
with open(sys.argv[2], "w") as out:  # not stdout: everything printed there counts as noise
    json.dump({"ids": ids.tolist(), "logits": logits.tolist(), "generated": generated.tolist()}, out)
"""


def test_routed_export_loads_quietly_without_mol(tiny, tmp_path):
    """Loaded as its model card says, with stdin closed and from outside the repository, a routed export asks
    nothing (AutoTokenizer reads config.json first; an untrusted remote-code config asks "Do you wish to run the
    custom code? [y/N]" and then falls back with "You are using a model of type `mol` ...") and warns nothing,
    and computes the runtime's logits and generations."""
    recipe = mol.Recipe.from_dict(
        {
            "name": "q",
            "base": "l",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=96))},
            "slots": ["l:0", {"experts": ["l:1", "g:1"]}, "l:2"],
        }
    )
    model = mol.build(recipe, device="cpu", dtype=torch.float32)
    folder = export(model, tmp_path / "remote").path
    script = tmp_path / "load.py"
    script.write_text(QUIET_LOADER)
    away = tmp_path / "elsewhere"  # a cwd outside the repository: no `mol` package beside it
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "got.json")],
        cwd=away,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("custom code", "[y/N]", "trust_remote_code", "You are using a model of type", "warn"):
        assert noise.lower() not in said.lower(), said[-3000:]
    got = json.loads((tmp_path / "got.json").read_text())
    ids = torch.tensor(got["ids"])
    with torch.no_grad():
        ours = model(ids).logits
    assert (torch.tensor(got["logits"]) - ours).abs().max().item() <= 1e-5
    expected = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert got["generated"] == expected.tolist()


def test_exported_code_files_are_the_library_files(tiny, tmp_path):
    """The remote code beside the weights is the library's own network, copied byte for byte, not generated."""
    from mol.network import NETWORK_FILES

    recipe = mol.Recipe.from_dict(
        {
            "name": "c",
            "base": "l",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))},
            "slots": ["l:0", {"experts": ["l:1", "g:1"]}],
        }
    )
    folder = export(recipe, tmp_path / "out").path
    written = sorted(p.name for p in folder.glob("*.py"))
    assert written == sorted(NETWORK_FILES)
    library = REPO / "mol" / "network"
    for name in NETWORK_FILES:
        assert (folder / name).read_bytes() == (library / name).read_bytes(), name
