"""`mol eval` on a lanes recipe: the output mixture is reported like a routed slot (agreement with the labels, load
over the lanes), and the oracle sends each token to its label's lane, which is exactly that source alone."""

import math

import pytest
import torch

import mol
from mol.data import DomainTokens
from mol.evaluation import evaluate


@pytest.fixture(scope="module")
def lanes_model(tiny):
    recipe = mol.Recipe.from_dict(
        {
            "name": "pair",
            "models": {"l": str(tiny("llama")), "g": str(tiny("gpt2", width=48))},
            "lanes": {"a": {"base": "l"}, "b": {"base": "g"}},
            "mixture": "token",
        }
    )
    return mol.build(recipe, device="cpu", dtype=torch.float32)


def _domains() -> dict[str, DomainTokens]:
    g = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(1, 380, (96,), generator=g) for n in ("first", "second")}
    mixed = torch.cat([ids["first"][:48], ids["second"][:48]])
    labels = torch.cat([torch.zeros(48, dtype=torch.long), torch.ones(48, dtype=torch.long)])
    return {
        "first": DomainTokens("first", ids["first"], torch.zeros(96, dtype=torch.long), ["first"]),
        "second": DomainTokens("second", ids["second"], torch.zeros(96, dtype=torch.long), ["second"]),
        "mixed": DomainTokens("mixed", mixed, labels, ["first", "second"]),
    }


def test_the_oracle_of_a_lanes_recipe_is_each_labels_source_alone(lanes_model):
    report = evaluate(
        lanes_model,
        _domains(),
        oracle=True,
        seq_len=32,
        domain_experts={"first": "l", "second": "g"},
    )
    oracle, fused = report.row("pair oracle"), report.row("pair")
    for domain, alias in (("first", "l"), ("second", "g")):
        alone = report.row(f"{alias} alone").domains[domain]
        assert math.isclose(oracle.domains[domain].loss, alone.loss, rel_tol=1e-5)
        assert oracle.domains[domain].agreement == {"mixture": 1.0}
        assert oracle.domains[domain].load["mixture"][("a", "b")[alias == "g"]] == 1.0
    # An untrained gate is uniform: the mixture of two distributions is no worse than the worse one's by log 2.
    for domain in ("first", "second"):
        worst = max(report.row(f"{a} alone").domains[domain].loss for a in ("l", "g"))
        assert fused.domains[domain].loss <= worst + math.log(2) + 1e-6
    assert set(fused.domains["mixed"].load) == {"mixture"}
    assert 0.0 <= fused.domains["mixed"].agreement["mixture"] <= 1.0
