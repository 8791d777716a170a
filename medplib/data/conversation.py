"""Conversation templates and tokenisation of a `Sample` into model inputs with supervised-only labels.

Placeholders are expanded here, so the model sees final lengths: `<image>` becomes
`<im_start>` + `num_image_tokens` x `<image>` + `<im_end>` (LLaVA-1.5 with `mm_use_im_start_end`), and each
`<region></region>` becomes `<region><region_feat></region>`; the model writes the image and region features into
those positions. Truncation drops text from the end but never splits an image block or a region triple, and
reports how many regions and target masks survive so their tensors can be trimmed to match. A training sample
whose answer is cut away entirely raises `AnswerTruncated`; a generation prompt is never cut (that would drop the
assistant prefix): one too long raises `PromptTooLong`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from medplib import constants as C
from medplib.data.schema import Turn
from medplib.tokenizer import SpecialIds


@dataclass(frozen=True)
class Template:
    system: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str  # closes a supervised answer; "{eos}" is the tokenizer's EOS


TEMPLATES = {
    # LLaVA v1 (SeparatorStyle.TWO), what upstream MedPLIB trains with.
    "llava_v1": Template(
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        user_prefix=" USER: ",
        user_suffix="",
        assistant_prefix=" ASSISTANT: ",
        assistant_suffix="{eos}",
    ),
    # ChatML, what SmolLM2-Instruct was tuned with (the `small` preset).
    "chatml": Template(
        system="<|im_start|>system\nYou are a helpful medical imaging assistant.<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
    ),
}


def chat_template(template_name: str, num_image_tokens: int) -> str:
    """A Jinja chat template (Hugging Face `apply_chat_template`) that renders `template_name` as
    `tokenize_conversation` builds it: the fixed system prompt, `<image>` expanded to its block and each
    `<region></region>` to its triple. A message's content is a string or a list of `{"type": "image"}` /
    `{"type": "text", "text": ...}` parts (an image part is `<image>` plus a newline, as `encode_sample` puts it);
    system messages are ignored (the model knows one system prompt). The assistant prefix closes every user turn,
    as in training, so `add_generation_prompt` adds nothing."""
    t = TEMPLATES[template_name]
    image_block = C.IMAGE_START_TOKEN + C.IMAGE_TOKEN * num_image_tokens + C.IMAGE_END_TOKEN
    region = C.REGION_START_TOKEN + C.REGION_FEATURE_TOKEN + C.REGION_END_TOKEN
    bos = "{% if bos_token %}{{ bos_token }}{% endif %}" if template_name == "llava_v1" else ""
    assistant_suffix = " + eos_token + ".join(repr(piece) for piece in t.assistant_suffix.split("{eos}"))
    return (
        bos
        + f"{{{{ {t.system!r} }}}}"
        + "{% for message in messages %}"
        + "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
        + "{% set ns = namespace(text='') %}{% for part in message['content'] %}"
        + f"{{% if part['type'] == 'image' %}}{{% set ns.text = ns.text + {C.IMAGE_TOKEN + chr(10)!r} %}}"
        + "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
        + "{% endfor %}{% set text = ns.text %}{% endif %}"
        + f"{{% set text = text | replace({C.IMAGE_TOKEN!r}, {image_block!r})"
        + f" | replace({C.REGION_START_TOKEN + C.REGION_END_TOKEN!r}, {region!r}) %}}"
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ {t.user_prefix!r} + text + {t.user_suffix!r} + {t.assistant_prefix!r} }}}}"
        + "{% elif message['role'] == 'assistant' %}"
        + f"{{{{ text + {assistant_suffix} }}}}"
        + "{% endif %}{% endfor %}"
    )


class PromptTooLong(ValueError):
    """A generation prompt longer than `max_length`: cutting it would drop the assistant prefix, so it is refused."""

    def __init__(self, tokens: int, max_length: int) -> None:
        self.tokens, self.max_length = tokens, max_length
        super().__init__(
            f"the prompt is {tokens} tokens (image, region prompts and chat template included) but the model's "
            f"context holds {max_length} (max_length); shorten the conversation by at least {tokens - max_length} tokens"
        )


class AnswerTruncated(ValueError):
    """A training sample whose supervised answer `max_length` cuts away entirely: it would teach nothing."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    num_regions: int  # regions whose feature token survived truncation
    num_masks: int  # `<SEG>` tokens that survived truncation (their masks are kept, in order)


def expand_regions(text: str) -> str:
    region = C.REGION_START_TOKEN + C.REGION_FEATURE_TOKEN + C.REGION_END_TOKEN
    return text.replace(C.REGION_START_TOKEN + C.REGION_END_TOKEN, region)


def expand_image(piece: list[int], ids: SpecialIds, num_image_tokens: int) -> list[int]:
    """Token ids with each `<image>` id replaced by the image block (`<im_start>`, `num_image_tokens` x `<image>`,
    `<im_end>`): what tokenising the expanded text gives, since all three are added tokens that split the text
    around them, but without making the tokenizer match 66 added tokens a row (0.23 -> 0.10 ms a row)."""
    if ids.image not in piece:
        return piece
    at = piece.index(ids.image)
    block = [ids.image_start, *[ids.image] * num_image_tokens, ids.image_end]
    return piece[:at] + block + expand_image(piece[at + 1 :], ids, num_image_tokens)


def _segments(
    turns: list[Turn], template: Template, eos: str, for_generation: bool
) -> list[tuple[str, bool]]:
    """(text, supervised) pieces; only assistant answers and their closing suffix are supervised."""
    pieces: list[tuple[str, bool]] = [(template.system, False)]
    for turn in turns:
        if turn.role == "human":
            pieces.append(
                (template.user_prefix + turn.text + template.user_suffix + template.assistant_prefix, False)
            )
        else:
            pieces.append((turn.text + template.assistant_suffix.format(eos=eos), True))
    if for_generation and turns and turns[-1].role == "gpt":
        raise ValueError("a generation prompt must end with a human turn")
    return pieces


# Token ids of the texts a tokenizer has tokenised, per tokenizer: at most _MEMO_TEXTS texts (then started anew) of
# at most _MEMO_CHARS characters each (a long text seldom repeats), so a serving process's memo stays a few MB.
_MEMOS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, dict[str, tuple[int, ...]]]] = (
    weakref.WeakKeyDictionary()
)
_MEMO_TEXTS = 8192
_MEMO_CHARS = 1000


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False).input_ids`. A fast tokenizer's own encoder is called directly
    where it neither truncates nor pads (what the call would set up: two thirds of tokenising a MeCoVQA-mini row),
    one text at a time (its batch call hands a row's few short texts to a thread pool: more CPU than it saves, and
    a prepare's processes keep every core busy already), and a text tokenised already is not tokenised again:
    rows repeat the system prompt, the templated questions and the short answers. A text is tokenised on its own
    either way, so its ids do not depend on the other texts; the memo starts anew when the vocabulary grows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    vocab = len(tokenizer)
    memo = _MEMOS.get(tokenizer)
    if memo is None or memo[0] != vocab or len(memo[1]) > _MEMO_TEXTS:
        memo = _MEMOS[tokenizer] = (vocab, {})
    known = memo[1]
    out = []
    for text in texts:
        ids = known.get(text)
        if ids is None:
            ids = tuple(backend.encode(text, add_special_tokens=False).ids)
            if len(text) <= _MEMO_CHARS:
                known[text] = ids
        out.append(list(ids))
    return out


def tokenize_conversation(
    turns: list[Turn],
    tokenizer: PreTrainedTokenizerBase,
    template_name: str,
    num_image_tokens: int,
    max_length: int,
    *,
    for_generation: bool = False,
    sample_id: str = "?",
) -> Tokenized:
    """Tokenise a conversation; labels are IGNORE_INDEX everywhere except assistant answers."""
    if template_name not in TEMPLATES:
        raise ValueError(f"unknown conv_template {template_name!r}; known: {', '.join(TEMPLATES)}")
    template = TEMPLATES[template_name]
    ids = SpecialIds.of(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None and template_name == "llava_v1":
        input_ids.append(tokenizer.bos_token_id)
        labels.append(C.IGNORE_INDEX)
    segments = _segments(turns, template, tokenizer.eos_token, for_generation)
    # One call for all pieces, each still tokenised on its own: on texts this short the per-call overhead
    # dominates (measured on 2,000 MeCoVQA-mini rows: 0.32 ms a row with a call per piece, 0.23 with one).
    texts = [expand_regions(text) for text, _ in segments]
    for piece, (_, supervised) in zip(token_ids(tokenizer, texts), segments, strict=True):
        piece = expand_image(piece, ids, num_image_tokens)
        input_ids += piece
        labels += piece if supervised else [C.IGNORE_INDEX] * len(piece)
    # Placeholders are inputs the model fills in, never prediction targets.
    placeholder_ids = {ids.image, ids.image_start, ids.image_end, ids.region_feature}
    labels = [
        C.IGNORE_INDEX if t in placeholder_ids else lab for t, lab in zip(input_ids, labels, strict=True)
    ]
    if len(input_ids) > max_length:
        if for_generation:
            raise PromptTooLong(len(input_ids), max_length)
        cut = _safe_cut(input_ids, max_length, ids)
        if cut <= 0 or (ids.image in input_ids and input_ids.index(ids.image) >= cut):
            raise ValueError(
                f"sample {sample_id}: max_length {max_length} cannot hold the image block "
                f"({num_image_tokens} tokens) and the prompt"
            )
        answer_at = next((i for i, lab in enumerate(labels) if lab != C.IGNORE_INDEX), None)
        if answer_at is not None and answer_at >= cut:
            raise AnswerTruncated(
                f"sample {sample_id}: max_length {max_length} cuts its answer away entirely (the conversation "
                f"is {len(input_ids)} tokens and the answer starts at token {answer_at})"
            )
        input_ids, labels = input_ids[:cut], labels[:cut]
    return Tokenized(
        input_ids=input_ids,
        labels=labels,
        num_regions=input_ids.count(ids.region_feature),
        num_masks=input_ids.count(ids.seg),
    )


def _safe_cut(input_ids: list[int], max_length: int, ids: SpecialIds) -> int:
    """Largest cut <= max_length that does not split an image block or a region triple."""
    cut = max_length
    # Inside an image block: move before its start.
    if ids.image_start in input_ids[:cut]:
        start = max(i for i in range(cut) if input_ids[i] == ids.image_start)
        if ids.image_end not in input_ids[start:cut]:
            cut = start
    # Inside a region triple (<region> <region_feat> </region>): move before `<region>`.
    for back in (1, 2):
        if cut - back >= 0 and input_ids[cut - back] == ids.region_start:
            cut -= back
            break
    return cut
