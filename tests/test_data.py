"""The CS224N readers on the real files, on small hand-written files, and stsAug reversal."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from bert_demo.tasks.data import (
    DataFormatError,
    PairExample,
    find_data_dir,
    read_pairs,
    read_sentences,
    read_task,
    reverse_pairs,
    task_file,
)

# --------------------------------------------------------------------------- real files

# Rows per file from the data README. Its STS numbers (6,041 / 864 / 1,726) count the
# header line too: the files hold 6,040 / 863 / 1,725 pairs, the sizes the CS224N
# handout gives (8,628 in all). quora-train.csv has 16,000 rows, one with an empty
# label (line 15624), which the reader skips with a warning.
REAL_FILES = {
    ("sst", "train"): 8544,
    ("sst", "dev"): 1101,
    ("sst", "test-student"): 2210,
    ("quora", "train"): 16000,
    ("quora", "dev"): 2000,
    ("sts", "train"): 6040,
    ("sts", "dev"): 863,
    ("sts", "test-student"): 1725,
    ("cfimdb", "train"): 1707,
    ("cfimdb", "dev"): 245,
    ("cfimdb", "test-student"): 488,
}
ID_LINE_10 = "55c4f22268e4df59ad90b43c0"  # sts-train.csv, line 10
SKIPPED_ROWS = {("quora", "train"): [15624]}
LABEL_RANGE = {"sst": (0, 4), "cfimdb": (0, 1), "quora": (0.0, 1.0), "sts": (0.0, 5.0)}


def real_data_dir() -> Path:
    try:
        return find_data_dir()
    except FileNotFoundError:
        pytest.skip("the CS224N data folder is not here (set BERT_DEMO_DATA)")


@pytest.mark.parametrize(("task", "split"), sorted(REAL_FILES))
def test_every_real_file_parses_with_the_readme_row_count(task: str, split: str) -> None:
    path = task_file(real_data_dir(), task, split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = read_task(path, task)
    skipped = SKIPPED_ROWS.get((task, split), [])
    assert len(examples) == REAL_FILES[task, split] - len(skipped)
    # Independent count: no field of these files spans lines, so rows = lines - header.
    with open(path, newline="", encoding="utf-8") as f:
        assert sum(1 for _ in f) - 1 == REAL_FILES[task, split]
    if skipped:
        assert len(caught) == 1
        assert f"line {skipped[0]}" in str(caught[0].message)
    else:
        assert not caught
    assert len({e.id for e in examples}) == len(examples)
    assert all(len(e.id) == 25 for e in examples)  # the hex ids, not the index column
    labels = [e.label for e in examples]
    if split == "test-student":
        assert all(label is None for label in labels)
    else:
        low, high = LABEL_RANGE[task]
        assert all(label is not None and low <= label <= high for label in labels)
        assert len(set(labels)) > 1


def test_real_quoting_is_decoded() -> None:
    """STS fields are CSV-quoted: wrapping quotes go, doubled quotes become one."""
    path = task_file(real_data_dir(), "sts", "train")
    examples = {e.id: e for e in read_pairs(path, "sts")}
    # Line 10 of the file reads: "In standard English, I think ""don't got"" has ..."
    assert examples[ID_LINE_10].sentence1 == (
        'In standard English, I think "don\'t got" has the same register as "ain\'t".'
    )
    assert examples["9aaabdce8cfff4c060b6f525c"].label == 0.8


def test_real_file_types() -> None:
    sst = read_sentences(task_file(real_data_dir(), "sst", "dev"), "sst")
    assert sst[0].sentence == "It 's a lovely film with lovely performances by Buy and Accorsi ."
    assert sst[0].label == 3
    assert type(sst[0].label) is int
    quora = read_pairs(task_file(real_data_dir(), "quora", "dev"), "quora")
    assert type(quora[0].label) is float
    assert {e.label for e in quora} == {0.0, 1.0}


# --------------------------------------------------------------------------- small files


def write(tmp_path: Path, name: str, lines: list[str], newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


SST_HEADER = "\tid\tsentence\tsentiment"
PAIR_HEADER = "\tid\tsentence1\tsentence2\tsimilarity"
QUORA_HEADER = "\tid\tsentence1\tsentence2\tis_duplicate"


def test_small_sst_file(tmp_path: Path) -> None:
    path = write(tmp_path, "sst.csv", [SST_HEADER, "0\ta1\t Great film .\t4", "1\ta2\tBad .\t0"])
    assert [(e.id, e.sentence, e.label) for e in read_sentences(path)] == [
        ("a1", "Great film .", 4),
        ("a2", "Bad .", 0),
    ]


def test_test_student_layout_with_extra_index_column(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", ["0\t\tid\tsentence", "1\t0.0\tb1\tFine .", "2\t1.0\tb2\tOk ."])
    assert [(e.id, e.label) for e in read_sentences(path)] == [("b1", None), ("b2", None)]
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}:1: .*'sentiment'"):
        read_sentences(path, labeled=True)


def test_labeled_false_ignores_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "sst.csv", [SST_HEADER, "0\ta1\tGreat .\t4"])
    assert read_sentences(path, labeled=False)[0].label is None


def test_quoted_fields_and_crlf(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "q.csv",
        [
            QUORA_HEADER,
            '7\tq1\t"Is ""Cast Away"" real?"\tWhy\tis it?\t1.0'.replace("\tis it?", " is it?"),
        ],
        newline="\r\n",
    )
    (example,) = read_pairs(path, "quora")
    assert example == PairExample("q1", 'Is "Cast Away" real?', "Why is it?", 1.0)


def test_official_sized_quora_file(tmp_path: Path) -> None:
    """The official 141,506-pair file has the same format; nothing may assume 16,000 rows."""
    rows = [QUORA_HEADER] + [
        f"{i}\tid{i:06d}\tQuestion {i}?\tAnother {i}?\t{i % 2}.0" for i in range(141_506)
    ]
    examples = read_pairs(write(tmp_path, "quora-train.csv", rows, newline="\r\n"), "quora")
    assert len(examples) == 141_506
    assert examples[-1] == PairExample("id141505", "Question 141505?", "Another 141505?", 1.0)


@pytest.mark.parametrize(
    ("task", "header", "row", "message"),
    [
        (
            "sst",
            SST_HEADER,
            "1\ta2\tToo few fields .",
            "expected 4 tab-separated fields like the header, found 3",
        ),
        (
            "sst",
            SST_HEADER,
            "1\ta2\tToo\tmany\t3",
            "expected 4 tab-separated fields like the header, found 5",
        ),
        ("sst", SST_HEADER, "1\ta2\tBad label .\tgood", "label 'good' is not a number"),
        (
            "sst",
            SST_HEADER,
            "1\ta2\tOut of range .\t5",
            r"label '5' is not an integer class in 0\.\.4",
        ),
        (
            "sst",
            SST_HEADER,
            "1\ta2\tNot an integer .\t2.5",
            r"label '2\.5' is not an integer class in 0\.\.4",
        ),
        ("sst", SST_HEADER, "1\ta2\t  \t2", "empty 'sentence'"),
        (
            "cfimdb",
            SST_HEADER,
            "1\ta2\tNot binary .\t3",
            r"label '3' is not an integer class in 0\.\.1",
        ),
        (
            "quora",
            QUORA_HEADER,
            "1\ta2\tA?\tB?\t0.5",
            r"label '0\.5' is not an integer class in 0\.\.1",
        ),
        ("sts", PAIR_HEADER, "1\ta2\tA.\tB.\t5.5", r"label '5\.5' is outside \[0\.0, 5\.0\]"),
        ("sts", PAIR_HEADER, "1\ta2\tA.\tB.\tnan", r"label 'nan' is outside \[0\.0, 5\.0\]"),
        ("sts", PAIR_HEADER, "1\ta2\tA.\tB.\t-0.1", r"label '-0\.1' is outside \[0\.0, 5\.0\]"),
    ],
)
def test_bad_row_names_file_and_line(
    tmp_path: Path, task: str, header: str, row: str, message: str
) -> None:
    good = "0\ta1\tFine .\t1" if header == SST_HEADER else "0\ta1\tA.\tB.\t1.0"
    path = write(tmp_path, f"{task}.csv", [header, good, good.replace("a1", "a0"), row])
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:4: {message}$"):
        read_task(path, task)


def test_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    """A quoted field spanning two lines moves later line numbers on, as an editor shows them."""
    path = write(
        tmp_path, "sts.csv", [PAIR_HEADER, '0\ta1\t"Two\nlines."\tB.\t1.0', "1\ta2\tA.\tB.\tx"]
    )
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:4: "):
        read_pairs(path, "sts")


def test_empty_label_is_skipped_with_a_warning_or_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "q.csv",
        [QUORA_HEADER, "0\ta1\tA?\tB?\t1.0", "1\ta2\tA?\tC?\t", "2\ta3\tD?\tE?\t0.0"],
    )
    with pytest.warns(
        UserWarning, match=r"skipped 1 row\(s\) with an empty 'is_duplicate' label \(line 3\)"
    ):
        examples = read_pairs(path, "quora")
    assert [e.id for e in examples] == ["a1", "a3"]
    with pytest.raises(
        DataFormatError, match=rf"^{re.escape(str(path))}:3: label '' is not a number"
    ):
        read_pairs(path, "quora", missing_label="error")


def test_header_problems(tmp_path: Path) -> None:
    empty = write(tmp_path, "empty.csv", [])
    empty.write_bytes(b"")
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(empty))}:1: empty file"):
        read_sentences(empty)
    no_column = write(tmp_path, "pairs.csv", ["\tid\tsentence\tsimilarity"])
    with pytest.raises(
        DataFormatError, match=rf"^{re.escape(str(no_column))}:1: header has no 'sentence1' column"
    ):
        read_pairs(no_column, "sts")


def test_wrong_reader_or_task_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "sst.csv", [SST_HEADER])
    with pytest.raises(ValueError, match="read_pairs"):
        read_sentences(path, "sts")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="read_sentences"):
        read_pairs(path, "sst")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task must be one of"):
        read_task(path, "mnli")
    with pytest.raises(ValueError, match="missing_label"):
        read_sentences(path, missing_label="drop")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- folders


def test_task_file_names_and_errors(tmp_path: Path) -> None:
    (tmp_path / "ids-sst-dev.csv").write_text(SST_HEADER + "\n")
    assert task_file(tmp_path, "sst", "dev") == tmp_path / "ids-sst-dev.csv"
    with pytest.raises(FileNotFoundError, match=r"quora-test-student\.csv"):
        task_file(tmp_path, "quora", "test-student")
    with pytest.raises(ValueError, match="split"):
        task_file(tmp_path, "sst", "validation")


def test_find_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, from_env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv("BERT_DEMO_DATA", str(from_env))
    assert find_data_dir(explicit) == explicit
    assert find_data_dir() == from_env
    monkeypatch.setenv("BERT_DEMO_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$BERT_DEMO_DATA.*BERT_DEMO_DATA"):
        find_data_dir()
    with pytest.raises(FileNotFoundError, match="the data argument"):
        find_data_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------- stsAug


def test_reverse_pairs_doubles_and_swaps() -> None:
    pairs = [PairExample("a", "first", "second", 4.2), PairExample("b", "one", "two", 0.0)]
    augmented = reverse_pairs(pairs)
    assert augmented[:2] == pairs
    assert augmented[2:] == [
        PairExample("a", "second", "first", 4.2),
        PairExample("b", "two", "one", 0.0),
    ]
    assert pairs[0].sentence1 == "first"  # the input is untouched
    assert reverse_pairs([]) == []
