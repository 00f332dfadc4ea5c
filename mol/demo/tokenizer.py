"""The family's shared tokenizer: byte-level BPE (GPT-2 style pre-tokenisation, so any byte string round-trips),
trained on the prose and code training splits in equal byte shares, with `<|endoftext|>` as id 0 serving as
bos, eos and pad."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mol.demo import EOS

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 1024


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def balanced_texts(prose: list[str], code: list[str]) -> Iterator[str]:
    """All of the smaller domain and as many bytes of the larger one, documents in the given order."""
    budget = min(sum(len(t) for t in prose), sum(len(t) for t in code))
    for docs in (prose, code):
        used = 0
        for text in docs:
            if used >= budget:
                break
            yield text[: budget - used]
            used += len(text)


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Save as a Hugging Face tokenizer folder (`tokenizer.json` + `tokenizer_config.json`)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
