import json

import pytest

from explain.sweep.prompts import PromptFileError, content_id, parse_prompts, read_prompts


def test_text_file_skips_blank_and_comment_lines_and_gives_content_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n# a comment\n  a blue square  \na red circle\n")
    rows = read_prompts(path)
    assert [r.prompt for r in rows] == ["a red circle", "a blue square", "a red circle"]
    assert [r.line for r in rows] == [1, 4, 5]
    assert rows[0].id == content_id("a red circle", None)
    assert rows[2].id == rows[0].id + "~2"  # a repeat gets its own id
    assert all(r.valid for r in rows)


def test_ids_do_not_move_when_the_file_is_reordered_or_extended():
    a = parse_prompts("a red circle\na blue square\n", "txt")
    b = parse_prompts("a green triangle\na blue square\na red circle\n", "txt")
    assert {r.prompt: r.id for r in a}.items() <= {r.prompt: r.id for r in b}.items()


def test_csv_reads_seed_negative_and_ground_truth_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,Caption,seed,negative_prompt,subject,object\nr1,"a red circle, left",7,blurry,circle,\nr2,a cat on a mat,,,cat,mat\n')
    r1, r2 = read_prompts(path)
    assert (r1.id, r1.prompt, r1.seed, r1.negative) == ("r1", "a red circle, left", 7, "blurry")
    assert r1.truth == {"subject": "circle"}
    assert (r2.seed, r2.negative, r2.truth) == (None, None, {"subject": "cat", "object": "mat"})


def test_jsonl_keeps_any_json_ground_truth(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a red circle", "seed": 3, "scene": {"objects": [1, 2]}}) + "\n\n")
    (row,) = read_prompts(path)
    assert row.seed == 3 and row.truth == {"scene": {"objects": [1, 2]}}


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"prompt": ""}', "line 1 has an empty prompt"),
        ('{"seed": 3}', "line 1 has no prompt"),
        ('{"prompt": "a", "seed": "abc"}', "has the seed 'abc'; a seed is a whole number"),
        ('{"prompt": "a", "seed": -1}', "has the seed -1"),
        ('{"prompt": "a", "id": "no spaces allowed"}', "has the id 'no spaces allowed'"),
        ('{"prompt": 3}', "has a prompt that is a int, not text"),
        ('["a red circle"]', "line 1 is a JSON list, not an object"),
        ('{"prompt": "a" ', "line 1 is not valid JSON"),
    ],
)
def test_a_bad_row_is_marked_invalid_with_what_is_wrong_not_fatal(text, message):
    rows = parse_prompts(text + '\n{"prompt": "a red circle"}\n', "jsonl")
    assert len(rows) == 2
    assert not rows[0].valid and message in rows[0].error
    assert rows[1].valid and rows[1].prompt == "a red circle"
    assert rows[0].id and rows[0].id != rows[1].id


def test_a_csv_row_with_too_many_fields_is_invalid(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed\na red circle, left,3\na blue square,4\n")
    bad, good = read_prompts(path)
    assert "line 2 has 3 fields but the header has 2" in bad.error
    assert good.valid and good.seed == 4


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.csv", "id,seed\n1,2\n", "has no 'prompt' column (its header is: id, seed)"),
        ("p.csv", "", "is empty"),
        ("p.csv", "prompt,prompt\na,b\n", "has the column(s) prompt more than once"),
        ("p.txt", "\n# only comments\n", "holds no prompts"),
        ("p.yaml", "- a red circle\n", "cannot tell the format of p.yaml"),
        ("p.jsonl", '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', "the id 'x' is used on line 1 and line 2"),
    ],
)
def test_unreadable_files_raise_a_clear_error(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptFileError, match=None) as info:
        read_prompts(path)
    assert message in str(info.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(PromptFileError, match="no prompt file at"):
        read_prompts(tmp_path / "nope.txt")
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="is not UTF-8 text"):
        read_prompts(path)
