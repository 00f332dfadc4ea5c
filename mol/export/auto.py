"""`import mol` makes exported MoL folders load with plain `AutoModelForCausalLM.from_pretrained(folder)` (no
remote code). The config class is registered at once; the model class is registered through a stand-in, so
that importing mol does not import transformers' model base classes (seconds) before a MoL model is loaded."""

from __future__ import annotations


def _model_class():
    from transformers import AutoModelForCausalLM

    from mol.export.configuration_mol import MoLConfig
    from mol.export.modeling_mol import MoLForCausalLM

    AutoModelForCausalLM.register(MoLConfig, MoLForCausalLM, exist_ok=True)
    return MoLForCausalLM


class MoLForCausalLMLoader:
    """Stands in for MoLForCausalLM in the auto mapping until a MoL model is loaded."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _model_class().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return _model_class()._from_config(config, **kwargs)


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mol.export.configuration_mol import MoLConfig

    MoLForCausalLMLoader.config_class = MoLConfig
    AutoConfig.register("mol", MoLConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoLConfig, MoLForCausalLMLoader, exist_ok=True)
