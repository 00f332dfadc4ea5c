"""The fused network, written once: adapters, routers, expert blocks, slots and the stack (`MoLNetwork`), and
`MoLForCausalLM` around it. These files import only torch and transformers (and Triton where torch has it) and
each other (relatively), because an exported routed folder carries them, byte for byte, as its remote code:
`mol.build` and `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` run the very same modules."""

# The files an export copies beside the weights (transformers loads them as one package of remote code).
NETWORK_FILES = (
    "configuration_mol.py",
    "adapters.py",
    "attention.py",
    "decode_attention.py",
    "fusing.py",
    "gated_mlp.py",
    "kernels.py",
    "mixing.py",
    "rotary.py",
    "routers.py",
    "subclassing.py",
    "modeling_mol.py",
)
