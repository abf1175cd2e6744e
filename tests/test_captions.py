import pytest

from mpsclip.data.captions import normalize_caption, require_caption
from mpsclip.errors import MPSCLIPError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The river banks, decorated with trees.", "the river banks decorated with trees"),
        ('Some "big" (old) ships! Are* #here: yes; ~ok? it\'s', "some big old ships are here yes ok its"),
        ("a well-kept road/path", "a well kept road path"),
        ("a <person> walks", "a person walks"),
        ("  many \t\n  spaces   here ", "many spaces here"),
        ("Upper CASE", "upper case"),
        ("...", ""),
    ],
)
def test_normalize_caption(text: str, expected: str) -> None:
    assert normalize_caption(text) == expected


def test_normalize_caption_keeps_first_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert normalize_caption(" ".join(words)) == " ".join(words[:30])
    assert normalize_caption("a b, c d", max_words=2) == "a b"


def test_require_caption_names_file_and_record() -> None:
    assert require_caption("A Ship.", "ann.json", "record 3") == "a ship"
    with pytest.raises(MPSCLIPError, match=r"ann\.json: record 3: .*empty after normalisation"):
        require_caption(" ?! ", "ann.json", "record 3")
