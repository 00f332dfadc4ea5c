"""What makes an export's success mean something: the written folder is loaded the way users will load it,
`AutoModelForCausalLM.from_pretrained` (MoLForCausalLM through its own modelling code), onto the meta device, so
no weight is read. Its config must build a model and every parameter must be in the shards with the shape that
config gives it. A source whose config lies about a width, a tensor of the wrong shape or a missing one would
otherwise make a folder that from_pretrained rejects, or silently fills with random weights."""

from __future__ import annotations

from pathlib import Path

from mol.errors import CheckpointError


def check_loadable(folder: Path) -> None:
    """CheckpointError, in one line naming the first wrong tensor, unless `folder` loads completely."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # transformers' load report is a table and a progress bar; ours is one line
    hf_logging.disable_progress_bar()
    try:
        _, info = AutoModelForCausalLM.from_pretrained(
            str(folder),
            device_map="meta",
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            # No hub kernels: with Triton installed (torch's CUDA wheels) transformers would swap them in on
            # loading by default, and it refuses to on the meta device.
            use_kernels=False,
        )  # reported, not raised
    except Exception as exc:  # whatever transformers raises for a config or checkpoint it cannot load
        raise CheckpointError(
            f"The exported folder would not load ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); "
            "nothing was written."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problems = [
        f"tensor '{name}' is {list(found)} in the shards, but its config makes it {list(wanted)}"
        for name, found, wanted in sorted(info["mismatched_keys"])
    ]
    problems += [f"tensor '{name}' is missing from the shards" for name in sorted(info["missing_keys"])]
    problems += list(info.get("error_msgs") or [])
    if (
        problems
    ):  # extra tensors are fine: from_pretrained ignores them (old checkpoints carry rotary buffers)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"The exported folder would not load: {problems[0]}{more}; nothing was written."
        )
