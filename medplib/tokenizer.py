"""The tokenizer the model and the data contract share, with MedPLIB's special tokens added."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medplib import constants as C


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    # A byte-level BPE with no merges: every UTF-8 byte is one token. Deterministic, needs no training data
    # and no download, which is all the random-init `tiny` preset needs.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """`"byte"`, a local tokenizer directory or a `pkg:` reference (`pkg:smollm2`) -> a tokenizer with MedPLIB's
    special tokens added."""
    if str(source) == "byte":
        tok = _byte_level_tokenizer()
    else:
        from medplib.model.packaged import is_packaged, resolve_weights

        if is_packaged(source):
            source = resolve_weights(source)
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist (nothing is downloaded)")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    add_special_tokens(tok)
    return tok


def add_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    vocab = tok.get_vocab()  # a new dict of the whole vocabulary each call: ~18 ms for SmolLM2's 49k tokens
    missing = [t for t in C.SPECIAL_TOKENS if t not in vocab]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the placeholder tokens, looked up once per tokenizer."""

    image: int
    image_start: int
    image_end: int
    region_start: int
    region_end: int
    region_feature: int
    seg: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> SpecialIds:
        ids = tok.convert_tokens_to_ids
        return cls(
            image=ids(C.IMAGE_TOKEN),
            image_start=ids(C.IMAGE_START_TOKEN),
            image_end=ids(C.IMAGE_END_TOKEN),
            region_start=ids(C.REGION_START_TOKEN),
            region_end=ids(C.REGION_END_TOKEN),
            region_feature=ids(C.REGION_FEATURE_TOKEN),
            seg=ids(C.SEG_TOKEN),
            eos=tok.eos_token_id,
            pad=tok.pad_token_id,
        )
