import json

import pytest

from selfalign.errors import UserError
from selfalign.jsonl import JsonlAppender, read_jsonl, write_jsonl_atomic


def write(path, text):
    path.write_bytes(text.encode())


def test_torn_last_line_is_dropped_with_warning(tmp_path, caplog):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}\n{"id": 2}\n{"id": 3, "te')
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]
    assert "torn last line" in caplog.text


def test_malformed_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r":2: expected a JSON object"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}\n\n   \n{"id": 2}\n')
    assert len(read_jsonl(path)) == 2


def test_appender_cuts_torn_tail_before_appending(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}\n{"id": 2, "x"')
    with JsonlAppender(path) as out:
        assert out.ids == {1}
        assert out.write_batch([{"id": 2}, {"id": 3}]) == 2
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2, 3]


def test_appender_adds_missing_newline_after_complete_last_record(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"id": 1}')
    with JsonlAppender(path) as out:
        out.write_batch([{"id": 2}])
    assert [r["id"] for r in read_jsonl(path)] == [1, 2]


def test_appender_never_writes_an_id_twice(tmp_path):
    path = tmp_path / "a.jsonl"
    with JsonlAppender(path) as out:
        out.write_batch([{"id": "a"}, {"id": "b"}, {"id": "a"}])
    with JsonlAppender(path) as out:
        assert out.write_batch([{"id": "b"}, {"id": "c"}]) == 1
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_appender_refuses_corrupt_file_without_touching_it(tmp_path):
    path = tmp_path / "a.jsonl"
    original = '{"id": 1}\ngarbage\n{"id": 3}\n'
    write(path, original)
    with pytest.raises(UserError):
        JsonlAppender(path)
    assert path.read_text() == original


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out" / "a.jsonl"
    write_jsonl_atomic(path, [{"id": 1, "text": "é"}])
    write_jsonl_atomic(path, [{"id": 2}])
    assert read_jsonl(path) == [{"id": 2}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]


def test_atomic_write_gives_files_the_usual_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_jsonl_atomic(tmp_path / "a.jsonl", [{"id": 1}])
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_read_records_takes_jsonl_or_a_json_array(tmp_path):
    from selfalign.jsonl import read_records

    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (tmp_path / "b.txt").write_text('[{"id": 1}, {"id": 2}]')
    assert read_records(tmp_path / "a.jsonl") == read_records(tmp_path / "b.txt")
    with pytest.raises(UserError, match="nothere.json: file not found"):
        read_records(tmp_path / "nothere.json")
