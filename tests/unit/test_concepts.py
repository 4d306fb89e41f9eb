"""Concept names, placeholder tokens, initial embeddings and prompts."""

import pytest
import torch

from attencraft_core import AttenCraftError, parse_concepts
from attencraft_core.concepts import (add_concept_tokens, concepts_prompt, initializer_ids, token_positions,
                                      tokenize_prompt)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_placeholders_prompt_and_positions(tiny, n):
    words = ["cat", "dog", "bird", "ball"][:n]
    concepts = parse_concepts(", ".join(words))
    assert [c.placeholder for c in concepts] == [f"<c{i}>" for i in range(n)]
    ids = add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts)
    prompt = concepts_prompt([c.placeholder for c in concepts])
    assert prompt == "a photo of " + " and ".join(f"<c{i}>" for i in range(n))
    positions = token_positions(tiny.tokenizer, prompt, [c.placeholder for c in concepts])
    tokens = tokenize_prompt(tiny.tokenizer, prompt)[0].tolist()
    assert tokens[positions["<sot>"]] == tiny.tokenizer.bos_token_id
    for c, token_id in zip(concepts, ids):
        assert tokens[positions[c.placeholder]] == token_id
    # "a photo of" = 3 tokens after <sot>; then placeholder, "and", placeholder...
    assert [positions[c.placeholder] for c in concepts] == [4 + 2 * i for i in range(n)]


def test_embeddings_start_from_the_initializer_word(tiny):
    table_before = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    concepts = parse_concepts("cat, zebra")  # "zebra" is not in the tiny vocabulary: split into letters
    ids = add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts)
    table = tiny.text_encoder.get_input_embeddings().weight
    cat_ids = initializer_ids(tiny.tokenizer, "cat")
    zebra_ids = initializer_ids(tiny.tokenizer, "zebra")
    assert len(cat_ids) == 1 and len(zebra_ids) == 5
    torch.testing.assert_close(table[ids[0]], table_before[cat_ids[0]])
    torch.testing.assert_close(table[ids[1]], table_before[zebra_ids].mean(0))
    torch.testing.assert_close(table[: table_before.shape[0]], table_before)  # no old row changed


def test_adding_the_same_concepts_twice_reuses_the_tokens(tiny):
    concepts = parse_concepts("cat, dog")
    first = add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts)
    size = len(tiny.tokenizer)
    assert add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts) == first
    assert len(tiny.tokenizer) == size == tiny.text_encoder.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("text, message", [
    ("cat", "at least two concepts"),
    ("cat,", "Empty concept name"),
    (" , dog", "Empty concept name"),
    ("cat, Cat", "must differ; repeated: cat"),
])
def test_bad_concept_lists(text, message):
    with pytest.raises(AttenCraftError, match=message):
        parse_concepts(text)


def test_prompt_longer_than_the_tokenizer_allows(tiny):
    concepts = parse_concepts([f"w{i}" for i in range(40)])
    add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts)
    prompt = concepts_prompt([c.placeholder for c in concepts])
    with pytest.raises(AttenCraftError, match=r"tokens long but the text encoder takes at most 77"):
        tokenize_prompt(tiny.tokenizer, prompt)
