import numpy as np
import pytest

from p2p_widgets.prompts import align, infer_kind, tokenize
from p2p_widgets.testing import MULTI_TOKEN_WORDS


def test_words_and_token_spans(tokenizer):
    prompt = tokenize(tokenizer, "a cat riding a bicycle")
    assert prompt.word_texts == ("a", "cat", "riding", "a", "bicycle")
    spans = [(w.start, w.end) for w in prompt.words]
    # begin-of-text is token 0; "bicycle" is several tokens, the others one each
    assert spans[0] == (1, 2)
    assert spans[-1][1] - spans[-1][0] == MULTI_TOKEN_WORDS["bicycle"]
    assert prompt.eos == spans[-1][1]
    assert prompt.ids[0] == tokenizer.bos_token_id
    assert prompt.ids[prompt.eos] == tokenizer.eos_token_id
    assert len(prompt.ids) == tokenizer.model_max_length
    # the ids are the tokenizer's own, word for word
    assert list(prompt.ids) == tokenizer("a cat riding a bicycle", padding="max_length", max_length=77)["input_ids"]


def test_punctuation_is_its_own_word(tokenizer):
    prompt = tokenize(tokenizer, "a cat, riding a bicycle!")
    assert prompt.word_texts == ("a", "cat", ",", "riding", "a", "bicycle", "!")
    assert prompt.token_indices("cat") == (2,)
    assert prompt.token_indices(",") == (3,)


def test_repeated_words_select_every_occurrence_and_indices_select_one(tokenizer):
    prompt = tokenize(tokenizer, "a cat and a dog")
    assert prompt.token_indices("a") == (1, 4)
    assert prompt.token_indices(3) == (4,)
    assert prompt.token_indices("A") == (1, 4)  # case-insensitive


def test_phrases_select_consecutive_words(tokenizer):
    prompt = tokenize(tokenizer, "a red cat and a red dog")
    assert prompt.token_indices("red cat") == (2, 3)
    assert prompt.token_indices("red") == (2, 6)


def test_absent_word_lists_the_prompt_words(tokenizer):
    prompt = tokenize(tokenizer, "a cat riding a bicycle")
    with pytest.raises(ValueError, match="'lion' is not in 'a cat riding a bicycle'") as error:
        prompt.find("lion")
    assert "'lion' is not in 'a cat riding a bicycle'" in str(error.value)
    assert "a, cat, riding, a, bicycle" in str(error.value)
    with pytest.raises(ValueError, match="word index 9 is out of range"):
        prompt.find(9)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_prompt_is_rejected(tokenizer, text):
    with pytest.raises(ValueError, match="empty"):
        tokenize(tokenizer, text)


def test_too_long_prompt_says_by_how_much(tokenizer):
    text = " ".join(["cat"] * 80)
    with pytest.raises(ValueError, match=r"80 tokens long .* at most 75; shorten it by 5 tokens"):
        tokenize(tokenizer, text)
    assert tokenize(tokenizer, " ".join(["cat"] * 75)).eos == 76


def test_swap_maps_words_by_position_and_keeps_trailing_tokens_aligned(tokenizer):
    source = tokenize(tokenizer, "a cat riding a bicycle")
    target = tokenize(tokenizer, "a dog riding a motorcycle")
    alignment = align(source, target, "swap")
    matrix = alignment.matrix
    assert alignment.kind == "swap" and alignment.mapped.all()
    assert matrix[0, 0] == 1  # begin-of-text
    assert matrix[2, 2] == 1  # cat -> dog
    bicycle, motorcycle = source.words[-1].tokens, target.words[-1].tokens
    assert len(bicycle) != len(motorcycle)
    block = matrix[np.ix_(list(bicycle), list(motorcycle))]
    assert np.allclose(block, 1 / len(motorcycle))
    # the word's attention mass is kept: the block's total equals the source token count
    assert block.sum() == pytest.approx(len(bicycle))
    # end-of-text and padding stay aligned from end-of-text, whatever the length difference
    shift = target.eos - source.eos
    assert shift != 0
    for offset in range(5):
        assert matrix[source.eos + offset, target.eos + offset] == 1
    # every source token hands on exactly its own mass, so a pixel's attention over the
    # tokens still sums to one after re-indexing
    assert np.allclose(matrix[: source.eos + 1].sum(axis=1), 1)


def test_swap_with_different_word_counts_suggests_refinement(tokenizer):
    source = tokenize(tokenizer, "a cat riding a bicycle")
    target = tokenize(tokenizer, "a cat riding a red bicycle")
    with pytest.raises(ValueError, match=r"same number of words.*refine"):
        align(source, target, "swap")


@pytest.mark.parametrize(
    "target, new_words",
    [
        ("red a cat riding a bicycle", ["red"]),  # insertion at the start
        ("a cat happily riding a bicycle", ["happily"]),  # middle
        ("a cat riding a bicycle at night", ["at", "night"]),  # end
        ("a fluffy cat riding a big bicycle", ["fluffy", "big"]),  # two places
    ],
)
def test_refinement_aligns_common_words_and_leaves_new_words_unmapped(tokenizer, target, new_words):
    source = tokenize(tokenizer, "a cat riding a bicycle")
    target = tokenize(tokenizer, target)
    alignment = align(source, target)  # auto: different word counts -> refine
    assert alignment.kind == "refine"
    new_tokens = {t for w in new_words for t in target.token_indices(w)}
    for word in target.words:
        for token in word.tokens:
            assert alignment.mapped[token] == (token not in new_tokens)
    # matched words map token to token onto the same word in the source
    for word in ("cat", "riding", "bicycle"):
        for s, t in zip(source.token_indices(word), target.token_indices(word)):
            assert alignment.matrix[s, t] == 1
    assert alignment.matrix[source.eos, target.eos] == 1


def test_refinement_removing_words(tokenizer):
    source = tokenize(tokenizer, "a big cat riding a bicycle")
    target = tokenize(tokenizer, "a cat riding a bicycle")
    alignment = align(source, target, "refine")
    assert alignment.mapped[: target.eos + 1].all()
    assert alignment.matrix[source.token_indices("cat")[0], target.token_indices("cat")[0]] == 1
    assert alignment.matrix[source.token_indices("big")[0]].sum() == 0  # the removed word goes nowhere


def test_auto_kind(tokenizer):
    cat = tokenize(tokenizer, "a cat")
    assert infer_kind(cat, tokenize(tokenizer, "a dog")) == "swap"
    assert infer_kind(cat, tokenize(tokenizer, "a red dog")) == "refine"


def test_tokenizer_without_offsets_gives_the_same_spans(tokenizer):
    class NoOffsets:
        """Wraps a tokenizer the way a slow tokenizer behaves: no offset mapping."""

        def __init__(self, inner):
            self.inner = inner
            self.model_max_length = inner.model_max_length
            self.bos_token_id, self.eos_token_id, self.pad_token_id = (
                inner.bos_token_id,
                inner.eos_token_id,
                inner.pad_token_id,
            )

        def __call__(self, text, return_offsets_mapping=False, **kwargs):
            if return_offsets_mapping:
                raise NotImplementedError("slow tokenizers have no offsets")
            return self.inner(text, **kwargs)

    text = "a cat, riding a motorcycle!"
    assert tokenize(NoOffsets(tokenizer), text) == tokenize(tokenizer, text)
