"""Export as a `MoLForCausalLM` folder: the network's config (mol.layout.network_config: the recipe's slots and
each source's architecture), every weight (source blocks, base embeddings/norm/head, adapters, routers) in
safetensors shards under the network's own names, and the network's files themselves beside them, copied from
the library byte for byte (mol.network): the loaded model runs the code `mol.build` runs."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import torch
from torch import nn

from mol import layout
from mol.errors import RecipeError
from mol.export.shards import TensorEntry, entry_from_file, entry_from_tensor
from mol.network import NETWORK_FILES
from mol.planning import Plan

AUTO_MAP = {
    "AutoConfig": "configuration_mol.MoLConfig",
    "AutoModelForCausalLM": "modeling_mol.MoLForCausalLM",
}
PREFIX = "model."  # MoLForCausalLM holds the network as `model`
_LIBRARY = Path(__file__).resolve().parent.parent / "network"


def remote_config(the_plan: Plan, parts: nn.Module, dtype: torch.dtype, recipe_dict: dict):
    cfg = layout.network_config(
        the_plan,
        recipe=recipe_dict,
        router_code={
            kind: f"{Path(file).stem}.{cls.__name__}" for kind, cls, file in _outside_routers(parts)
        },
        architectures=["MoLForCausalLM"],
        auto_map=dict(AUTO_MAP),
    )
    cfg.dtype = str(dtype).removeprefix("torch.")
    if parts.head_trained:  # a trained head is a tensor of its own, even where the source ties it
        cfg.tie_word_embeddings = False
        for lane in (cfg.lanes or {}).values():
            lane["tie_word_embeddings"] = False
    return cfg


def remote_entries(the_plan: Plan, parts: nn.Module, dtype: torch.dtype | None) -> list[TensorEntry]:
    """Every tensor of the network under its name in MoLForCausalLM: the parts read from the sources' files
    (mol.layout.file_parts, as `mol.build` reads them), then the adapters and routers of `parts` (and its final
    norm and head where they were trained: those replace the source's)."""
    entries: list[TensorEntry] = []
    trained = parts.trainable_state_dict()
    for path, alias, prefix in layout.file_parts(the_plan):
        src = the_plan.sources[alias]
        for name in parts.get_submodule(path).state_dict():
            if f"{path}.{name}" in trained:
                continue
            entries.append(entry_from_file(f"{PREFIX}{path}.{name}", src.tensors[f"{prefix}.{name}"], dtype))
    for name, tensor in parts.trainable_state_dict().items():
        # Routers run in float32 whatever the model's dtype (as in the runtime); adapters follow the model.
        entries.append(entry_from_tensor(PREFIX + name, tensor, None if ".router." in name else dtype))
    return entries


def copy_code(folder: Path, parts: nn.Module) -> None:
    """The library's network files, and the file of any router kind registered from outside them."""
    for name in NETWORK_FILES:
        shutil.copyfile(_LIBRARY / name, folder / name)
    for _, _, file in _outside_routers(parts):
        shutil.copyfile(file, folder / Path(file).name)


def _outside_routers(parts: nn.Module) -> list[tuple[str, type, str]]:
    """(kind, class, source file) of each router kind in use that is defined outside mol.network."""
    out = {}
    for slot in parts.slots:
        if slot.router is None:
            continue
        cls = type(slot.router)
        try:
            file = inspect.getsourcefile(cls)
        except TypeError:
            file = None
        if file is None:
            raise RecipeError(
                f"Router type '{cls.kind}' ({cls.__name__}) has no source file to travel with the export; "
                "define it in a .py file of its own that imports only torch."
            )
        if Path(file).resolve().parent != _LIBRARY:
            out[cls.kind] = (cls.kind, cls, file)
    return list(out.values())
