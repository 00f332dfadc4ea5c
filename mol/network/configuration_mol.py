"""Configuration of a MoL (mixture-of-layers) model exported by Mango: the recipe, each source model's own
configuration and module layout, and the slots: all `MoLNetwork` needs to build itself. Self-contained
(transformers only): it is copied next to the weights so that
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` works without Mango."""

from transformers import PretrainedConfig


class MoLConfig(PretrainedConfig):
    """`sources`: alias -> {"config": the source's config dict, "modules": where its parts live};
    `slots`: [{"experts": [{"name", "alias", "layer", "cache_index", "adapter", "add_positions", "window"}],
    "router": None | {"type", "top_k"}}]; `num_hidden_layers` counts slot-experts (one KV-cache layer each);
    `router_code`: router type -> "module.Class" for a kind whose file travels beside this one; `lanes`,
    `stitches`, `mixture`: several one-stream networks side by side, joined (then `slots` is empty)."""

    model_type = "mol"

    def __init__(
        self,
        base: str = "",
        sources: dict | None = None,
        slots: list | None = None,
        recipe: dict | None = None,
        adapter_rank: int | None = None,
        router_code: dict | None = None,
        lanes: dict | None = None,
        stitches: list | None = None,
        mixture: dict | None = None,
        hidden_size: int = 0,
        vocab_size: int = 0,
        num_hidden_layers: int = 0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.base = base
        self.sources = sources or {}
        self.slots = slots or []
        self.recipe = recipe or {}
        self.adapter_rank = adapter_rank
        self.router_code = router_code or {}
        self.lanes = lanes or {}  # lane name -> the fields of a one-stream MoLConfig
        self.stitches = stitches or []  # [{"from", "to", "after": [i, j], "type", "rank", "heads"}]
        self.mixture = mixture  # {"type": "token" | "sequence"} over the lanes' distributions
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache
        super().__init__(**kwargs)
