"""`import mol` makes exported MoL folders load with plain `AutoModelForCausalLM.from_pretrained(folder)` (no
remote code). transformers' auto-class modules take a quarter of a second to import and the modelling code
several seconds, so neither is imported for this: the config class is registered when transformers' own
`configuration_auto` is first imported (by whoever imports it), the model class through a stand-in when
`modeling_auto` is, and the real model class is imported only when a MoL model is loaded."""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"


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


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from mol.export.configuration_mol import MoLConfig

    MoLForCausalLMLoader.config_class = MoLConfig
    AutoConfig.register("mol", MoLConfig, exist_ok=True)


def _register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from mol.export.configuration_mol import MoLConfig

    _register_config()
    if MoLConfig not in AutoModelForCausalLM._model_mapping:  # never replace the real class once registered
        AutoModelForCausalLM.register(MoLConfig, MoLForCausalLMLoader, exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module's first import, by wrapping the loader the other finders return."""

    def __init__(self, hooks: dict[str, Callable[[], None]]):
        self.hooks = hooks

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        callback = self.hooks.pop(name)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                callback()
            except Exception as exc:  # a failed registration must not break importing transformers
                logging.getLogger(__name__).warning("MoL auto classes not registered: %s", exc)

        spec.loader.exec_module = exec_module  # this loader instance serves this one module only
        return spec


def register_auto_classes(lazy: bool = False) -> None:
    """Register MoLConfig and MoLForCausalLM with transformers' auto classes; with `lazy`, do it when
    transformers' auto modules are first imported rather than importing them now."""
    hooks = {_CONFIG_AUTO: _register_config, _MODEL_AUTO: _register_model}
    if not lazy:
        for fn in hooks.values():
            fn()
        return
    pending = {}
    for name, fn in hooks.items():
        if name in sys.modules:
            fn()
        else:
            pending[name] = fn
    if pending:
        sys.meta_path.insert(0, _AfterImport(pending))
