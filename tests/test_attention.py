"""mol's SDPA (mol.network.attention): a one-token grouped-query step reads the cache as it is, and gives what
transformers' own SDPA function gives (which copies every key-value head per query head); anything else is
transformers' function itself."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import mol  # noqa: F401  (registers the attention function)
from mol.network.attention import mol_sdpa


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def _inputs(b, heads, kv, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(b, n, t, 16, generator=g) for n, t in ((heads, q), (kv, k), (kv, k)))
    mask = torch.zeros(b, 1, q, k)
    mask[-1, :, :, :3] = torch.finfo(torch.float32).min  # left padding in the last sequence
    mask[0, :, :, -2:] = torch.finfo(torch.float32).min  # keys not written yet (a static cache's tail)
    return query, key, value, mask


@pytest.mark.parametrize("heads,kv", [(8, 2), (6, 3), (4, 1)])
def test_a_grouped_one_token_step_equals_transformers_sdpa(heads, kv):
    query, key, value, mask = _inputs(3, heads, kv, 1, 11, seed=heads)
    module = _Attn(heads // kv)
    got, _ = mol_sdpa(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, heads, 16)
    assert (got - want).abs().max() <= 1e-6
    by_hand = torch.softmax(query @ key.repeat_interleave(heads // kv, 1).transpose(-1, -2) * 0.25 + mask, -1)
    ref = (by_hand @ value.repeat_interleave(heads // kv, 1)).transpose(1, 2)
    assert (got - ref).abs().max() <= 1e-5


def test_other_steps_are_transformers_own():
    module = _Attn(4)
    for q, use_mask in ((5, True), (1, False)):
        query, key, value, mask = _inputs(2, 8, 2, q, 9 if use_mask else 1, seed=q)
        mask = mask[..., : key.shape[2]] if use_mask else None
        got, _ = mol_sdpa(module, query, key, value, mask)
        want, _ = sdpa_attention_forward(module, query, key, value, mask)
        assert torch.equal(got, want)
