"""Hard-negative captions: a caption with two of its words exchanged so that it no longer describes the
image, for CLIP training against bag-of-words matching.

A contrastive CLIP learns what tells a caption apart from the other captions of its batch. In a batch
of random pairs, "a red circle and a blue square" and "a blue circle and a red square" are almost never
together, so nothing rewards binding each colour to its shape, and the text and image embeddings of the
two come out nearly equal (eval/probe.py ``pairs``: cosine 0.998 for a 600-step CLIP on the synthetic
shapes, and picks at chance). The DALL-E 2 paper names this as the cause of unCLIP's binding failures.
Training against such a caption as an extra negative for its image (as NegCLIP does with swapped
words) makes the difference count.

Three kinds, each a word-level edit that keeps the caption grammatical:

- ``colour``: the first two distinct colour words are exchanged, with the articles before them
  corrected ("an orange triangle and a yellow diamond" -> "a yellow triangle and an orange diamond",
  so that the article gives nothing away);
- ``binding``: the same, between colour words of single objects only (each after "a" or "an", neither
  before "background"): a negative no shortcut tells apart. ``colour`` also exchanges "two red circles
  and a blue square" (which colour has more objects) and "a pink triangle on a grey background" (which
  colour is the background's), and a CLIP learns those without learning to bind;
- ``relation``: the first spatial word is replaced by its opposite (left/right, above/below).

A caption without two such colours, or without a spatial word, has no negative of that kind (None).
Works on any English caption, not only the synthetic grammar: the colour list covers common colour
names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

KINDS = ("colour", "binding", "relation")
COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple pink cyan magenta violet brown black white grey gray gold silver".split()
)
OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above"}
_WORD = re.compile(r"[A-Za-z]+")


def _with_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _article(before: str, noun: str) -> str:
    """``before`` ("a" or "an", any case) fitted to the word after it."""
    fitted = "an" if noun[:1].lower() in "aeiou" else "a"
    return _with_case(fitted, before)


def swap_colours(caption: str, objects_only: bool = False) -> str | None:
    """The caption with its first two distinct colour words exchanged (articles fitted); None without two.
    ``objects_only``: only colour words of single objects count (after "a"/"an", not before "background")."""
    words = list(_WORD.finditer(caption))
    lower = [w.group().lower() for w in words]

    def eligible(k: int) -> bool:
        if lower[k] not in COLOUR_WORDS:
            return False
        if not objects_only:
            return True
        after = lower[k + 1] if k + 1 < len(lower) else ""
        return k > 0 and lower[k - 1] in ("a", "an") and after != "background"

    first = next((k for k in range(len(words)) if eligible(k)), None)
    if first is None:
        return None
    a = lower[first]
    second = next((k for k in range(first + 1, len(words)) if eligible(k) and lower[k] != a), None)
    if second is None:
        return None
    new = {first: words[second].group().lower(), second: a}  # word index -> replacement (lower case)
    for k in (first, second):
        new[k] = _with_case(new[k], words[k].group())
        if k > 0 and words[k - 1].group().lower() in ("a", "an"):
            new[k - 1] = _article(words[k - 1].group(), new[k])
    out, end = [], 0
    for k in sorted(new):
        out += [caption[end : words[k].start()], new[k]]
        end = words[k].end()
    return "".join(out) + caption[end:]


def flip_relation(caption: str) -> str | None:
    """The caption with its first spatial word (left, right, above, below) replaced by the opposite."""
    for w in _WORD.finditer(caption):
        opposite = OPPOSITES.get(w.group().lower())
        if opposite is not None:
            return caption[: w.start()] + _with_case(opposite, w.group()) + caption[w.end() :]
    return None


def swap_object_colours(caption: str) -> str | None:
    """``swap_colours`` between single objects only: the ``binding`` kind."""
    return swap_colours(caption, objects_only=True)


PERTURB = {"colour": swap_colours, "binding": swap_object_colours, "relation": flip_relation}


def check_kinds(kinds: Sequence[str], where: str = "hard_negatives") -> list[str]:
    """``kinds`` as a list, or a ValueError naming the option and the known kinds."""
    kinds = list(kinds or [])
    unknown = [k for k in kinds if k not in PERTURB]
    if unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"{where}={kinds}: expected distinct kinds among {list(KINDS)}")
    return kinds


def hard_negatives(captions: Sequence[str], kinds: Sequence[str]) -> list[list[str | None]]:
    """For each kind in ``kinds``, each caption's negative of that kind or None: ``[kind][caption]``."""
    return [[PERTURB[kind](c) if c else None for c in captions] for kind in check_kinds(kinds)]


def negative_tokens(
    captions: Sequence[str], kinds: Sequence[str], tokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard negatives of ``captions`` for each of ``kinds`` (kind-major: K * B), tokenised, and which
    of them exist (a caption without a negative of a kind is tokenised as the empty caption, masked out)."""
    negatives = [c for kind in hard_negatives(captions, kinds) for c in kind]
    tokens = tokenizer([c or "" for c in negatives])
    return tokens, torch.tensor([c is not None for c in negatives])
