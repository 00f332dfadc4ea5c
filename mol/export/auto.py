"""Registering MoL with transformers' auto classes, the documented way (`AutoConfig.register`,
`AutoModelForCausalLM.register`), so that `AutoModelForCausalLM.from_pretrained(folder)` loads an exported MoL
folder with the library's own network and no remote code. `mol.build` and `mol.export` register when imported;
anyone else calls `mol.register_auto_classes()`."""

from __future__ import annotations


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mol.network.configuration_mol import MoLConfig
    from mol.network.modeling_mol import MoLForCausalLM

    AutoConfig.register("mol", MoLConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoLConfig, MoLForCausalLM, exist_ok=True)
