"""A router kind is one file: registered in the test itself, a toy kind is named by a recipe, built, trained a step,
exported (its file travels beside the network's) and loaded back with trust_remote_code where Mango is absent."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mol
from mol.errors import RecipeError
from mol.export import export
from mol.network.routers import ROUTERS, register_router

TOY = '''
"""A toy router kind: scores the experts from the slot input's sign pattern (needs torch only)."""
import torch
from torch import nn


class SignRouter(nn.Module):
    kind = "sign"
    per_sequence = False
    takes_top_k = True

    def __init__(self, width, n_experts, top_k=1):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.proj = nn.Linear(width, n_experts, bias=False)
        nn.init.zeros_(self.proj.weight)

    def features(self, h, attention_mask=None):
        return torch.tanh(h.float())

    def forward(self, h, attention_mask=None, state=None):
        return self.proj(self.features(h, attention_mask))
'''

LOADER = r"""
import json, sys
sys.modules["mol"] = None  # Mango is not installed here
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"router": type(model.model.slots[1].router).__name__, "logits": logits.tolist()}))
"""


@pytest.fixture
def sign_router(tmp_path):
    path = tmp_path / "sign_router.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("sign_router", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sign_router"] = module  # imported as a user's own module would be
    spec.loader.exec_module(module)
    register_router(module.SignRouter)
    yield module.SignRouter
    ROUTERS.pop("sign", None)
    sys.modules.pop("sign_router", None)


def recipe(tiny, router):
    return mol.Recipe.from_dict(
        {
            "name": "toy-router",
            "base": "l",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))},
            "slots": ["l:0", {"experts": ["l:1", "g:1"], "router": router}, "l:2", "l:3"],
        }
    )


def test_unregistered_kind_is_a_recipe_error(tiny):
    with pytest.raises(RecipeError, match="'sign' is not one of: pooled, token"):
        recipe(tiny, {"type": "sign"})


def test_a_router_kind_registered_here_builds_trains_exports_and_loads_without_mango(
    tiny, tmp_path, sign_router
):
    r = recipe(tiny, {"type": "sign", "top_k": 1})
    assert r.slots[1].router.to_dict() == {"type": "sign", "top_k": 1}
    model = mol.build(r, device="cpu", dtype=torch.float32)
    assert type(model.slots[1].router) is sign_router

    ids = torch.randint(1, 380, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model.slots[1].router.proj.weight.detach().clone()
    params = list(model.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    out = model(ids, labels=ids, trace=False)
    (out.loss + 0.01 * out.aux_loss).backward()
    opt.step()
    model.eval()
    assert not torch.equal(model.slots[1].router.proj.weight, before)  # the loss reached the toy router

    with torch.no_grad():
        ours = model(ids[:1]).logits
    trace = model(ids[:1]).trace
    assert trace.slots[0].router == "sign" and trace.slots[0].probs.shape == (1, 16, 2)

    folder = export(model, tmp_path / "out").path
    assert (folder / "sign_router.py").read_text() == textwrap.dedent(TOY)
    assert json.loads((folder / "config.json").read_text())["router_code"] == {
        "sign": "sign_router.SignRouter"
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), json.dumps(ids[:1].tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["router"] == "SignRouter"
    assert (torch.tensor(got["logits"]) - ours).abs().max().item() <= 1e-5


def test_uniform_start_for_every_kind_and_a_clear_refusal_otherwise(tiny, tmp_path):
    """`--router-init uniform`: every expert of every slot, and every lane of the output mixture, equally likely;
    a registered kind with neither `proj` nor `uniform_()` is refused with what to add."""
    from mol.router_init import init_routers

    llama, gpt2 = str(tiny("llama")), str(tiny("gpt2", width=48))
    ids = torch.randint(1, 380, (2, 9), generator=torch.Generator().manual_seed(1))
    for mixture in ("evidence", "token"):
        lanes = mol.build(
            mol.Recipe.from_dict(
                {
                    "name": "uniform-lanes",
                    "models": {"l": llama, "g": gpt2},
                    "lanes": {
                        "a": {"base": "l", "slots": ["l:0", {"experts": ["l:1", "g:1"]}, "l:2"]},
                        "b": {"base": "g", "slots": ["g:0", {"experts": ["g:1", "l:1"], "router": "pooled"}]},
                    },
                    "mixture": mixture,
                }
            ),
            device="cpu",
            dtype=torch.float32,
        )
        with torch.no_grad():
            for p in lanes.trainable_parameters().values():
                p.normal_()
            init_routers(lanes, "uniform")
            trace = lanes(ids).trace
        assert [s.slot for s in trace.slots][-1] == -1 and len(trace.slots) == 3
        for s in trace.slots:
            assert torch.allclose(s.probs, torch.full_like(s.probs, 1 / s.probs.shape[-1]))

    class Opaque(torch.nn.Module):
        kind, per_sequence, takes_top_k = "opaque", False, False

        def __init__(self, width, n_experts, top_k=1):
            super().__init__()
            self.top_k, self.w = 1, torch.nn.Parameter(torch.zeros(width, n_experts))

        def features(self, h, attention_mask=None):
            return h

        def forward(self, h, attention_mask=None, state=None):
            return h.float() @ self.w

    register_router(Opaque)
    try:
        model = mol.build(recipe(tiny, {"type": "opaque"}), device="cpu", dtype=torch.float32)
        with pytest.raises(TypeError, match="no `proj` and no `uniform_"):
            init_routers(model, "uniform")
    finally:
        ROUTERS.pop("opaque", None)
