"""Offline noun extraction: a remote-sensing vocabulary plus a few context rules.

The vocabulary (``vocabulary.txt``) sorts open-class words into sections; this module holds the closed-class
grammar words and the rules that resolve words which can be nouns or something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from mpsclip.errors import MPSCLIPError
from mpsclip.keywords.records import Outcome

NOUN = "nouns"
NOUN_OR_VERB = "noun_or_verb"
NOUN_OR_ADJECTIVE = "noun_or_adjective"
COLOUR = "colours"
NON_NOUN = "non_nouns"
SECTIONS = (NOUN, NOUN_OR_VERB, NOUN_OR_ADJECTIVE, COLOUR, NON_NOUN)
CLOSED = "closed"
UNKNOWN = "unknown"
PUNCT = "punct"

DETERMINERS = frozenset(
    "the a an this that these those its their our his her my your each every another some any no all both "
    "either neither several many few".split()
)
PREPOSITIONS = frozenset(
    "of with at in on by to into onto from for among amid against beside besides between through along across "
    "around near over under below above behind beyond within without inside outside towards toward upon "
    "alongside beneath like via".split()
)
SUBJECTS = frozenset("it they which that who we he she here there".split())
VERB_MARKERS = frozenset("to can could will would may might must should not don't doesn't never".split())
NUMBERS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty thirty "
    "forty fifty hundred hundreds thousand thousands dozen dozens tens".split()
)
QUANTIFIERS = frozenset("lot lots number variety bunch plenty couple series amount kind kinds sort sorts".split())
OTHER_CLOSED = frozenset(
    "and or but nor so than because if although though while when where whereas since as not there here is are "
    "was were be been being am has have had having do does did can could will would may might must should it "
    "its they them their we us you i me he she him his her what whose whom who which other others ones one "
    "nothing something anything everything etc yes yeah cannot doesn isn aren wasn s t much more most less "
    "least half next".split()
)
CLOSED_WORDS = (DETERMINERS | PREPOSITIONS | SUBJECTS | VERB_MARKERS | NUMBERS | OTHER_CLOSED) - QUANTIFIERS
COLOUR_MODIFIERS = frozenset("dark light pale bright deep".split())
NON_NOUN_SUFFIXES = ("ly", "ed", "ing", "ous", "ful", "ive", "able", "ible", "ic", "ical", "ish", "less", "est")

_TOKEN = re.compile(r"[a-z]+(?:['\-][a-z]+)*|\d+(?:[.,]\d+)*|[^\sa-z\d]")


@dataclass(frozen=True)
class Vocabulary:
    """Word classes read from a vocabulary file; phrases are tuples of words (multi-word nouns)."""

    words: dict[str, str]
    phrases: frozenset[tuple[str, ...]]
    longest_phrase: int


@dataclass
class Token:
    text: str
    kind: str
    is_noun: bool = False


def load_vocabulary(path: Path | None = None) -> Vocabulary:
    """Read ``path`` (default: the packaged ``vocabulary.txt``) into a :class:`Vocabulary`."""
    if path is None:
        text = resources.files("mpsclip.keywords").joinpath("vocabulary.txt").read_text(encoding="utf-8")
        source = "mpsclip/keywords/vocabulary.txt"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise MPSCLIPError(f"cannot read vocabulary file {path}: {err}; pass an existing text file") from err
        source = str(path)
    return parse_vocabulary(text, source)


def parse_vocabulary(text: str, source: str = "<vocabulary>") -> Vocabulary:
    words: dict[str, str] = {}
    phrases: set[tuple[str, ...]] = set()
    section = NOUN
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            if section not in SECTIONS:
                raise MPSCLIPError(
                    f"{source}:{number}: unknown section [{section}]; use one of "
                    + ", ".join(f"[{name}]" for name in SECTIONS)
                )
            continue
        parts = tuple(line.split())
        if len(parts) > 1:
            if section != NOUN:
                raise MPSCLIPError(f"{source}:{number}: multi-word term {line!r} must be in the [nouns] section")
            phrases.add(parts)
        else:
            words[parts[0]] = section
    longest = max((len(phrase) for phrase in phrases), default=1)
    return Vocabulary(words=words, phrases=frozenset(phrases), longest_phrase=longest)


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of a regular English plural (most likely first)."""
    forms = []
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("ves"):
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return forms


def word_class(word: str, vocabulary: Vocabulary) -> str:
    if word in QUANTIFIERS:
        return NOUN
    if word in CLOSED_WORDS or "'" in word:
        return CLOSED
    if word in vocabulary.words:
        return vocabulary.words[word]
    for singular in singular_forms(word):
        kind = vocabulary.words.get(singular)
        if kind in (NOUN, NOUN_OR_VERB, NOUN_OR_ADJECTIVE):
            return kind
    return UNKNOWN


def tokenize(caption: str) -> list[str]:
    tokens = []
    for token in _TOKEN.findall(caption.lower().replace("\u2019", "'")):
        if token.endswith("'s") and token not in ("it's", "that's", "there's", "what's"):
            token = token[:-2]
        tokens.append(token)
    return tokens


def _match_phrase(words: list[str], start: int, vocabulary: Vocabulary) -> int:
    """Length of the longest vocabulary phrase starting at ``start`` (0 if none)."""
    for length in range(min(vocabulary.longest_phrase, len(words) - start), 1, -1):
        candidate = words[start : start + length]
        head, last = tuple(candidate[:-1]), candidate[-1]
        if (*head, last) in vocabulary.phrases:
            return length
        if any((*head, singular) in vocabulary.phrases for singular in singular_forms(last)):
            return length
    return 0


def _classify(caption: str, vocabulary: Vocabulary) -> list[Token]:
    words = tokenize(caption)
    tokens: list[Token] = []
    index = 0
    while index < len(words):
        length = _match_phrase(words, index, vocabulary)
        if length:
            tokens.append(Token(" ".join(words[index : index + length]), NOUN, is_noun=True))
            index += length
            continue
        word = words[index]
        kind = word_class(word, vocabulary) if word[0].isalpha() else PUNCT if not word[0].isdigit() else CLOSED
        tokens.append(Token(word, kind))
        index += 1
    return tokens


def _nounish(token: Token | None) -> bool:
    """Could this token be the head noun that a preceding word modifies?"""
    if token is None:
        return False
    if token.kind in (NOUN, NOUN_OR_ADJECTIVE):
        return True
    if token.kind == NOUN_OR_VERB:
        return not token.text.endswith("s")  # "the square looks", "a white building stands"
    if token.kind == UNKNOWN:
        return "-" not in token.text and "'" not in token.text and not token.text.endswith(NON_NOUN_SUFFIXES)
    return False


def _at(tokens: list[Token], index: int) -> Token | None:
    return tokens[index] if 0 <= index < len(tokens) else None


def _is_verb_slot(tokens: list[Token], index: int) -> bool:
    """A noun-or-verb word right after its subject ("the road crosses") or a verb marker ("to stand")."""
    before = _at(tokens, index - 1)
    if before is None:
        return False
    if before.text in VERB_MARKERS or before.text in SUBJECTS:
        return True
    if before.text == ",":
        after = _at(tokens, index + 1)
        return after is not None and after.text != "of" and after.text in PREPOSITIONS | DETERMINERS
    return before.is_noun or before.text.endswith("ly")


def _in_colour_chain(token: Token) -> bool:
    return token.kind == COLOUR or token.text in COLOUR_MODIFIERS or token.text in ("and", "or", "-", ",")


def _colour_is_noun(tokens: list[Token], index: int) -> bool:
    """A colour is a noun only when it stands alone in a noun slot: "the green", "with brown and orange"."""
    start = index
    while start > 0 and _in_colour_chain(tokens[start - 1]):
        start -= 1
    before = _at(tokens, start - 1)
    if before is None or not (before.text in DETERMINERS or before.text in PREPOSITIONS):
        return False
    end = index + 1
    while end < len(tokens) and _in_colour_chain(tokens[end]):
        end += 1
    after = _at(tokens, end)
    if after is None or after.kind in (PUNCT, CLOSED):
        return True
    return after.kind == NON_NOUN and after.text.endswith("ed")


def _unknown_is_noun(tokens: list[Token], index: int) -> bool:
    """A word missing from the vocabulary is a noun when it looks like one and sits in a noun slot."""
    word = tokens[index].text
    if len(word) < 3 or "-" in word or "'" in word or word.endswith(NON_NOUN_SUFFIXES):
        return False
    before = _at(tokens, index - 1)
    if before is None or before.kind == PUNCT:
        return False
    in_slot = (
        before.text in DETERMINERS
        or before.text in PREPOSITIONS
        or before.text in NUMBERS
        or before.kind in (COLOUR, NON_NOUN, NOUN_OR_ADJECTIVE)
    )
    return in_slot and not _nounish(_at(tokens, index + 1))


def _decide(tokens: list[Token]) -> None:
    for index, token in enumerate(tokens):
        if token.is_noun:
            continue
        after = _at(tokens, index + 1)
        if token.kind == NOUN:
            token.is_noun = True
        elif token.kind == NOUN_OR_VERB:
            token.is_noun = not _is_verb_slot(tokens, index)
        elif token.kind == NOUN_OR_ADJECTIVE:
            token.is_noun = not _nounish(after)
        elif token.kind == COLOUR:
            token.is_noun = _colour_is_noun(tokens, index)
        elif token.kind == UNKNOWN:
            token.is_noun = _unknown_is_noun(tokens, index)
        if token.text in QUANTIFIERS and after is not None and after.text == "of":
            token.is_noun = False


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    return load_vocabulary()


def extract_nouns_lexicon(caption: str, vocabulary: Vocabulary | None = None) -> list[str]:
    """Distinct lower-case nouns and multi-word noun terms of ``caption``, in first-seen order."""
    tokens = _classify(caption, vocabulary or default_vocabulary())
    _decide(tokens)
    return list(dict.fromkeys(token.text for token in tokens if token.is_noun))


@dataclass
class LexiconBackend:
    """The offline backend: never fails, needs no model."""

    vocabulary: Vocabulary
    name: str = "lexicon"

    def extract(self, captions: list[str]) -> list[Outcome]:
        return [Outcome(nouns=extract_nouns_lexicon(caption, self.vocabulary)) for caption in captions]
