import json
from pathlib import Path

import pytest

from mpsclip.cli import main
from mpsclip.errors import MPSCLIPError
from mpsclip.keywords import evaluate_nouns, extract_nouns_lexicon
from mpsclip.keywords.lexicon import parse_vocabulary
from mpsclip.keywords.llm import DEFAULT_PROMPT, LlmBackend, NounListError, build_prompt, parse_noun_list
from mpsclip.keywords.records import Outcome, merge_outcomes, read_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsitmd"


@pytest.mark.parametrize(
    ("caption", "nouns"),
    [
        ("Two storage tanks near a parking lot.", ["storage tanks", "parking lot"]),
        (
            "Many green trees and white buildings are around the baseball field.",
            ["trees", "buildings", "baseball field"],
        ),
        ("The green is surrounded by bunkers on the golf course.", ["green", "bunkers", "golf course"]),
        ("A white house with a roof painted with brown and orange.", ["house", "roof", "brown", "orange"]),
        ("A road crosses the river and it stands near a square building.", ["road", "river", "building"]),
        ("The square is surrounded by lots of cars.", ["square", "cars"]),
        ("It's a piece of bareland with stands on one side.", ["piece", "bareland", "stands", "side"]),
    ],
)
def test_lexicon_examples(caption: str, nouns: list[str]) -> None:
    assert extract_nouns_lexicon(caption) == nouns


def test_vocabulary_file_format_errors() -> None:
    vocabulary = parse_vocabulary("# comment\n[nouns]\nhangar\nsolar farm\n[colours]\nteal\n")
    assert extract_nouns_lexicon("a solar farm beside the teal hangars", vocabulary) == ["solar farm", "hangars"]
    with pytest.raises(MPSCLIPError, match="unknown section"):
        parse_vocabulary("[verbs]\nrun\n")


def test_evaluate_nouns_splits_phrases_and_micro_averages() -> None:
    score = evaluate_nouns([["parking lot", "car"], ["tree"]], [["parking", "lot", "road"], ["tree", "tree"]])
    assert score["precision"] == pytest.approx(3 / 4)
    assert score["recall"] == pytest.approx(3 / 4)
    assert score["f1"] == pytest.approx(3 / 4)


def test_read_records_json_and_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a pond\n\nthe road\n")
    assert read_records(tmp_path / "a.txt") == [{"caption": "a pond"}, {"caption": "the road"}]
    (tmp_path / "b.json").write_text('[{"caption": 3}]')
    with pytest.raises(MPSCLIPError, match="record 0"):
        read_records(tmp_path / "b.json")


def test_merge_outcomes_keeps_old_nouns_on_failure() -> None:
    records = [{"caption": ["a", "b"], "nouns": ["old"]}, {"caption": "c"}]
    merged, failures = merge_outcomes(records, [Outcome(["x"]), Outcome(error="bad"), Outcome(["y", "y"])])
    assert merged == [{"caption": ["a", "b"], "nouns": ["old"]}, {"caption": "c", "nouns": ["y"]}]
    assert [(f.index, f.caption, f.error) for f in failures] == [(0, "b", "bad")]


def test_parse_noun_list_repair() -> None:
    assert parse_noun_list('["Tree", "road", "tree"]') == ["tree", "road"]
    assert parse_noun_list('```json\n["pond"]\n```') == ["pond"]
    assert parse_noun_list('Sure! The nouns are ["lake", "beach"]. Done') == ["lake", "beach"]
    for reply in ("no list here", "[1, 2]", '["a", '):
        with pytest.raises(NounListError):
            parse_noun_list(reply)
    assert build_prompt(DEFAULT_PROMPT, "a pond").endswith("Caption: a pond")
    assert build_prompt("Nouns please.", "a pond") == "Nouns please.\n\nCaption: a pond"


class FakeGenerator:
    """Answers in batches; the first reply for "bad" captions is garbage, the re-prompt succeeds."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.seen: set[str] = set()

    def generate(self, prompts: list[str]) -> list[str]:
        self.calls.append(len(prompts))
        replies = []
        for prompt in prompts:
            caption = prompt.rsplit("Caption: ", 1)[1]
            if caption == "never":
                replies.append("I cannot")
            elif caption.startswith("bad") and caption not in self.seen:
                self.seen.add(caption)
                replies.append("oops")
            else:
                replies.append(json.dumps(caption.split()))
        return replies


def test_llm_backend_batches_and_reprompts_once() -> None:
    generator = FakeGenerator()
    backend = LlmBackend(generator, batch_size=2, progress=False)
    outcomes = backend.extract(["a pond", "bad road", "never", "lake"])
    assert [o.nouns for o in outcomes] == [["a", "pond"], ["bad", "road"], None, ["lake"]]
    assert outcomes[2].error is not None
    assert generator.calls == [2, 1, 2, 1]


def test_llm_backend_needs_model_or_transformers() -> None:
    from mpsclip.keywords.llm import load_llm_backend

    with pytest.raises(MPSCLIPError, match="--llm-model"):
        load_llm_backend(None, DEFAULT_PROMPT, 8, "cpu")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(MPSCLIPError, match=r"mpsclip\[llm\]"):
            load_llm_backend("/nonexistent", DEFAULT_PROMPT, 8, "cpu")


def test_cli_lexicon_with_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.json"
    records = [{"caption": ["A pond near the road.", "Green trees."], "nouns": ["pond", "road", "trees"]}]
    source.write_text(json.dumps(records))
    output = tmp_path / "out.json"
    assert main(["keywords", str(source), "--out", str(output), "--evaluate"]) == 0
    assert json.loads(output.read_text())[0]["nouns"] == ["pond", "road", "trees"]
    assert "f1 1.0000" in capsys.readouterr().out
    assert not (tmp_path / "out.json.failures.json").exists()


def test_real_rsitmd_test_f1() -> None:
    path = DATA / "rsitmd_test1.json"
    if not path.is_file():
        pytest.skip("RSITMD data not present")
    records = json.loads(path.read_text())
    predicted = [[n for c in r["caption"] for n in extract_nouns_lexicon(c)] for r in records]
    assert evaluate_nouns(predicted, [r["nouns"] for r in records])["f1"] >= 0.90
