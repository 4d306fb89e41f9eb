"""Concept names, their placeholder tokens and the prompts that name them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import AttenCraftError

PLACEHOLDER_FORMAT = "<c{}>"


@dataclass(frozen=True)
class Concept:
    """One concept: the user's word for it (also its initializer word) and its placeholder token."""

    word: str
    placeholder: str


def parse_concepts(words: str | list[str]) -> list[Concept]:
    """Turn "cat, dog" (or a list) into concepts <c0>, <c1>, ...; at least two, non-empty, distinct."""
    items = words.split(",") if isinstance(words, str) else list(words)
    names = [" ".join(str(w).split()) for w in items]
    if any(not n for n in names):
        raise AttenCraftError(
            f"Empty concept name in {words!r}: give comma-separated words, e.g. \"cat, dog\".")
    if len(names) < 2:
        raise AttenCraftError(
            f"AttenCraft needs at least two concepts, got {len(names)} ({', '.join(names) or 'none'}). "
            "Name every object to learn, comma-separated, e.g. \"cat, dog\".")
    placeholders = [n for n in names if re.fullmatch(r"<c\d+>", n)]
    if placeholders:
        raise AttenCraftError(f"{', '.join(placeholders)} is a placeholder name, not a word: name each concept with a "
                              "word that describes it (e.g. \"cat\"); the placeholders <c0>, <c1>, ... are given.")
    lowered = [n.lower() for n in names]
    dupes = sorted({n for n in lowered if lowered.count(n) > 1})
    if dupes:
        raise AttenCraftError(
            f"Concept names must differ; repeated: {', '.join(dupes)}. Use a distinct word for each object "
            "(e.g. \"black cat, white cat\").")
    return [Concept(name, PLACEHOLDER_FORMAT.format(i)) for i, name in enumerate(names)]


def concepts_prompt(placeholders: list[str], template: str = "a photo of {}") -> str:
    """"a photo of <c0> and <c1> [and <c2> ...]" for the given placeholders, in the given order."""
    return template.format(" and ".join(placeholders))


def add_concept_tokens(tokenizer, text_encoder, concepts: list[Concept]) -> list[int]:
    """Add each placeholder to the tokenizer and set its embedding row from its initializer word.

    A word the tokenizer splits into several tokens gets the mean of their embeddings. Placeholders that
    already exist (a model that was extended before) are reused and re-initialised. Returns the token ids.
    """
    placeholders = [c.placeholder for c in concepts]
    tokenizer.add_tokens([p for p in placeholders if p not in tokenizer.get_vocab()])
    ids = tokenizer.convert_tokens_to_ids(placeholders)
    if len(tokenizer) > text_encoder.get_input_embeddings().weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for concept, token_id in zip(concepts, ids):
            init_ids = initializer_ids(tokenizer, concept.word)
            table[token_id] = table[init_ids].mean(dim=0)
    return ids


def initializer_ids(tokenizer, word: str) -> list[int]:
    """The token ids of an initializer word without start/end tokens (several for a split word)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise AttenCraftError(f"The initializer word {word!r} gives no tokens; use an ordinary word.")
    return ids


def tokenize_prompt(tokenizer, prompt: str, max_length: int | None = None, what: str = "prompt") -> torch.Tensor:
    """Token ids [1, max_length] (default: the tokenizer's model_max_length) padded as SD does; a longer prompt is
    an error (never cut silently)."""
    ids = tokenizer(prompt, verbose=False).input_ids  # the length is said below, not in a library warning
    limit = max_length or tokenizer.model_max_length
    if len(ids) > limit:
        shown = prompt if len(prompt) <= 200 else prompt[:200] + "..."
        advice = "Use fewer concepts or shorter words." if what == "prompt" else f"Shorten the {what}."
        raise AttenCraftError(
            f"The {what} is {len(ids)} tokens long but the text encoder takes at most {limit} "
            f"(start and end tokens included), and the rest would be cut: {shown!r}. {advice}")
    return tokenizer(prompt, padding="max_length", max_length=limit, return_tensors="pt").input_ids


def token_positions(tokenizer, prompt: str, placeholders: list[str], start_token: bool = True) -> dict[str, int]:
    """Index of each placeholder token in the tokenized prompt, plus "<sot>" for the start-of-text token if the
    tokenizer puts one first (CLIP does, T5 does not)."""
    ids = tokenize_prompt(tokenizer, prompt)[0].tolist()
    positions = {"<sot>": 0} if start_token else {}
    for placeholder in placeholders:
        token_id = tokenizer.convert_tokens_to_ids(placeholder)
        if ids.count(token_id) != 1:
            raise AttenCraftError(f"The prompt {prompt!r} must contain {placeholder} exactly once.")
        positions[placeholder] = ids.index(token_id)
    return positions
