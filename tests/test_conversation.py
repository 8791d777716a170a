"""Conversation template, placeholder expansion, label masking and truncation."""

from __future__ import annotations

import pytest

from medplib import constants as C
from medplib.data.conversation import (
    AnswerTruncated,
    PromptTooLong,
    expand_image,
    token_ids,
    tokenize_conversation,
)
from medplib.data.schema import Turn
from medplib.tokenizer import SpecialIds, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("byte")


TURNS = [
    Turn(role="human", text="<image>\nWhat is in <region></region>?"),
    Turn(role="gpt", text="The left putamen."),
    Turn(role="human", text="Segment it."),
    Turn(role="gpt", text="Sure, <SEG>."),
]


def test_llava_v1_prompt_and_labels_supervise_only_answers(tok):
    out = tokenize_conversation(TURNS, tok, "llava_v1", num_image_tokens=16, max_length=1024)
    ids = SpecialIds.of(tok)
    text = tok.decode(out.input_ids)
    assert text.startswith("<s>A chat between a curious human")
    assert " USER: <im_start>" in text and " ASSISTANT: The left putamen.</s> USER: Segment it." in text
    assert out.input_ids.count(ids.image) == 16 and out.num_regions == 1 and out.num_masks == 1
    supervised = tok.decode(
        [t for t, lab in zip(out.input_ids, out.labels, strict=True) if lab != C.IGNORE_INDEX]
    )
    assert supervised == "The left putamen.</s>Sure, <SEG>.</s>"


@pytest.mark.parametrize(
    "text", ["<image>\nWhat is this?", "x<image>y", "<image>", "a <image> b <image>c", "no image here"]
)
def test_image_ids_expand_to_what_the_expanded_text_tokenises_to(tok, text):
    """The image block is spliced into the ids after tokenising (66 fewer added tokens for the tokenizer to
    match a row); wherever `<image>` stands, the ids are those of the expanded text."""
    block = C.IMAGE_START_TOKEN + C.IMAGE_TOKEN * 5 + C.IMAGE_END_TOKEN
    expected = tok(text.replace(C.IMAGE_TOKEN, block), add_special_tokens=False).input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    assert expand_image(ids, SpecialIds.of(tok), 5) == expected


def test_generation_prompt_ends_with_the_assistant_prefix(tok):
    out = tokenize_conversation(TURNS[:1], tok, "llava_v1", 4, 512, for_generation=True)
    assert tok.decode(out.input_ids).endswith(" ASSISTANT: ")
    assert all(lab == C.IGNORE_INDEX for lab in out.labels)
    with pytest.raises(ValueError, match="end with a human turn"):
        tokenize_conversation(TURNS[:2], tok, "llava_v1", 4, 512, for_generation=True)


def test_chatml_template(tok):
    out = tokenize_conversation(TURNS[:2], tok, "chatml", 4, 512)
    assert "<|im_start|>assistant\nThe left putamen.<|im_end|>\n" in tok.decode(out.input_ids)


def test_truncation_never_splits_an_image_block_or_a_region(tok):
    ids = SpecialIds.of(tok)
    full = tokenize_conversation(TURNS, tok, "llava_v1", 16, 4096)
    region_at = full.input_ids.index(ids.region_feature)
    # Cut right after `<region>`: the whole triple goes, so no region token is left dangling (a first answer
    # before the region keeps the sample worth training on).
    answered_first = [
        Turn(role="human", text="<image>\nWhat is shown?"),
        Turn(role="gpt", text="A brain."),
        Turn(role="human", text="And <region></region>?"),
        Turn(role="gpt", text="The putamen."),
    ]
    later = tokenize_conversation(answered_first, tok, "llava_v1", 16, 4096).input_ids.index(
        ids.region_feature
    )
    cut = tokenize_conversation(answered_first, tok, "llava_v1", 16, later)
    assert ids.region_start not in cut.input_ids and cut.num_regions == 0
    # Cut after the region and part of the answer: the `<SEG>` is gone, so no mask is kept for it.
    answer = tokenize_conversation(TURNS, tok, "llava_v1", 16, region_at + 20)
    assert answer.num_regions == 1 and answer.num_masks == 0 and len(answer.input_ids) <= region_at + 20
    image_at = full.input_ids.index(ids.image)
    with pytest.raises(ValueError, match="cannot hold the image block"):
        tokenize_conversation(TURNS, tok, "llava_v1", 16, image_at + 5)


def test_a_cut_that_leaves_no_answer_or_a_cut_prompt_is_refused(tok):
    ids = SpecialIds.of(tok)
    region_at = tokenize_conversation(TURNS, tok, "llava_v1", 16, 4096).input_ids.index(ids.region_feature)
    # Training: the only answers come after the cut, so nothing would be supervised.
    with pytest.raises(AnswerTruncated, match="cuts its answer away entirely"):
        tokenize_conversation(TURNS, tok, "llava_v1", 16, region_at)
    # Generation: a prompt is never cut (the assistant prefix would go); the error says what fits.
    prompt = tokenize_conversation(TURNS[:1], tok, "llava_v1", 16, 4096, for_generation=True)
    with pytest.raises(
        PromptTooLong, match=f"is {len(prompt.input_ids)} tokens .* holds 40 .* at least"
    ) as err:
        tokenize_conversation(TURNS[:1], tok, "llava_v1", 16, 40, for_generation=True)
    assert err.value.tokens == len(prompt.input_ids) and err.value.max_length == 40


def test_unknown_template_is_named(tok):
    with pytest.raises(ValueError, match="unknown conv_template 'vicuna'"):
        tokenize_conversation(TURNS, tok, "vicuna", 4, 512)


def test_special_tokens_are_single_tokens(tok):
    for token in C.SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False).input_ids) == 1, token


def test_token_ids_are_the_tokenizers_own():
    """`token_ids` calls a fast tokenizer's encoder directly; the ids are those of the tokenizer's call, also
    when the encoder was left set to truncate (then the call, which undoes that, runs)."""
    tok = build_tokenizer("byte")  # its own: this test sets the encoder to truncate
    texts = ["<image>\nWhat is <region><region_feat></region>?", "Sure, <SEG>.</s>", "  ünïcode\t", ""]
    want = tok(texts, add_special_tokens=False).input_ids
    assert token_ids(tok, texts) == want and want[0]
    tok.backend_tokenizer.enable_truncation(2)
    assert token_ids(tok, texts) == want


def test_token_ids_reuses_a_texts_ids_until_the_vocabulary_grows():
    """Texts tokenised already are served from the memo (rows repeat their system prompt, questions and short
    answers), the caller may change the lists it gets, and a token added to the vocabulary afterwards is seen."""
    from medplib.data import conversation

    tok = build_tokenizer("byte")  # its own: this test adds a token
    texts = ["Segment the left putamen.", "Segment the left putamen.", "Yes."]
    want = tok(texts, add_special_tokens=False).input_ids
    first = token_ids(tok, texts)
    assert first == want
    first[0].append(-1)  # a caller's list, not the memo's
    assert token_ids(tok, texts) == want
    memo = conversation._MEMOS[tok][1]
    assert set(memo) == {"Segment the left putamen.", "Yes."}
    memo["Yes."] = (7,)
    assert token_ids(tok, ["Yes."]) == [[7]]  # looked up, not tokenised
    long = "a description " * 100
    assert token_ids(tok, [long]) == tok([long], add_special_tokens=False).input_ids and long not in memo
    tok.add_tokens(["putamen"])
    grown = token_ids(tok, texts)
    assert grown == tok(texts, add_special_tokens=False).input_ids != want
    assert tok.convert_tokens_to_ids("putamen") in grown[0]
