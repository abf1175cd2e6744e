"""Keyword (noun) extraction from remote-sensing captions: offline lexicon, local LLM or chat-completions API.

``extract_nouns_lexicon("two storage tanks near a parking lot")`` gives ``["storage tanks", "parking lot"]``.
"""

from __future__ import annotations

import re

from mpsclip.keywords.lexicon import LexiconBackend, Vocabulary, extract_nouns_lexicon, load_vocabulary

__all__ = [
    "ApiBackend",
    "ApiConfig",
    "LexiconBackend",
    "LlmBackend",
    "Vocabulary",
    "evaluate_nouns",
    "extract_nouns_lexicon",
    "load_vocabulary",
]


def _words(nouns: list[str]) -> set[str]:
    """Distinct lower-case words of a noun list; multi-word terms count word by word."""
    return {word for noun in nouns for word in re.split(r"[\s\-]+", noun.lower()) if word}


def evaluate_nouns(predicted: list[list[str]], reference: list[list[str]]) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 over each record's set of distinct noun words.

    Multi-word terms are split into words on both sides ("parking lot" counts as "parking" and "lot"),
    because reference files list single words.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted records but {len(reference)} reference records")
    true_pos = false_pos = false_neg = 0
    for guess, truth in zip(predicted, reference, strict=True):
        guess_words, truth_words = _words(guess), _words(truth)
        true_pos += len(guess_words & truth_words)
        false_pos += len(guess_words - truth_words)
        false_neg += len(truth_words - guess_words)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def __getattr__(name: str) -> object:
    """The model and HTTP backends load lazily so that importing the package stays cheap."""
    if name == "LlmBackend":
        from mpsclip.keywords.llm import LlmBackend

        return LlmBackend
    if name in ("ApiBackend", "ApiConfig"):
        from mpsclip.keywords import api

        return getattr(api, name)
    raise AttributeError(f"module 'mpsclip.keywords' has no attribute {name!r}")
