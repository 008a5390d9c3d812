"""JSONL prompt side-files."""

from __future__ import annotations

import json

import pytest

from restore.data.prompts import PromptNotFoundError, PromptTable


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def table_file(tmp_path):
    return _write(
        tmp_path / "prompts.jsonl",
        [
            {"path": "a/0001.png", "prompt": "a red car", "tags": ["car", "red", "street"]},
            "",
            {"path": "./b\\0002.png", "prompt": "two dogs", "caption": "Two dogs playing."},
            {"path": "x/0003.jpg", "prompt": "a tree"},
        ],
    )


def test_lookup_by_key_and_field(table_file):
    t = PromptTable(table_file)
    assert len(t) == 3
    assert t["a/0001.png"] == "a red car"
    assert t["b/0002.png"] == "two dogs"  # './' and backslashes normalised
    assert t["./a/0001.png"] == "a red car"
    assert PromptTable(table_file, key="tags")["a/0001.png"] == "car, red, street"
    assert PromptTable(table_file, key="caption")["b/0002.png"] == "Two dogs playing."


def test_stem_fallback(table_file):
    t = PromptTable(table_file)
    # LR file with another folder and extension still finds the GT-keyed entry by its unique stem.
    assert t["lr/0003.png"] == "a tree"
    assert "lr/0003.png" in t and "lr/9999.png" not in t


def test_ambiguous_stem_is_not_guessed(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"path": "a/1.png", "prompt": "A"}, {"path": "b/1.png", "prompt": "B"}])
    t = PromptTable(f)
    assert t["a/1.png"] == "A" and t["b/1.png"] == "B"
    with pytest.raises(PromptNotFoundError, match="several entries"):
        t["c/1.png"]


def test_missing_entry_names_image_and_side_file(table_file):
    t = PromptTable(table_file)
    with pytest.raises(KeyError) as info:
        t["z/0099.png"]
    assert isinstance(info.value, PromptNotFoundError)
    msg = str(info.value)
    assert "z/0099.png" in msg and str(table_file) in msg
    assert not msg.startswith("'")  # readable, not a quoted repr
    assert PromptTable(table_file, missing="empty")["z/0099.png"] == ""
    assert t.get("z/0099.png") is None and t.get("a/0001.png") == "a red car"


def test_entry_without_requested_field(table_file):
    t = PromptTable(table_file, key="caption")
    with pytest.raises(PromptNotFoundError) as info:
        t["a/0001.png"]
    assert "line 1" in str(info.value) and "caption" in str(info.value) and "a/0001.png" in str(info.value)
    assert PromptTable(table_file, key="caption", missing="empty")["a/0001.png"] == ""


def test_bad_json_line_reports_line_number(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"path": "1.png", "prompt": "x"}, "", '{"path": "2.png", "prompt": '])
    with pytest.raises(ValueError) as info:
        PromptTable(f)
    assert f"{f}:3" in str(info.value)


def test_structural_errors(tmp_path):
    f = _write(tmp_path / "nopath.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"nopath.jsonl:1.*\"path\""):
        PromptTable(f)
    f = _write(tmp_path / "dup.jsonl", [{"path": "1.png", "prompt": "x"}, {"path": "./1.png", "prompt": "y"}])
    with pytest.raises(ValueError, match=r"dup.jsonl:2.*duplicate.*line 1"):
        PromptTable(f)
    f = _write(tmp_path / "num.jsonl", [{"path": "1.png", "prompt": 3}])
    with pytest.raises(ValueError, match="num.jsonl:1"):
        PromptTable(f)["1.png"]
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        PromptTable(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="missing"):
        PromptTable(tmp_path / "num.jsonl", missing="skip")


def test_require_lists_missing_images(table_file):
    t = PromptTable(table_file)
    t.require(["a/0001.png", "b/0002.png"])
    keys = ["a/0001.png"] + [f"new/{i}.png" for i in range(8)]
    with pytest.raises(PromptNotFoundError) as info:
        t.require(keys)
    msg = str(info.value)
    assert "8 image(s)" in msg and "'new/0.png'" in msg and "and 3 more" in msg and str(table_file) in msg
    PromptTable(table_file, missing="empty").require(keys)  # no error


def test_record_returns_every_text_field(tmp_path):
    f = _write(
        tmp_path / "p.jsonl",
        [
            {"path": "lr/0001.png", "highlevel": "a red car", "lowlevel": "blurry, noisy", "score": 0.7},
            {"path": "0002.png", "tags": ["car", "street"], "meta": {"w": 4}, "note": None},
        ],
    )
    t = PromptTable(f)
    assert t.record("lr/0001.png") == {"highlevel": "a red car", "lowlevel": "blurry, noisy"}
    assert t.record("./lr\\0001.png") == t.record("lr/0001.png")  # same normalisation as t[...]
    assert t.record("gt/0002.jpg") == {"tags": "car, street"}  # stem fallback; non-text fields left out
    assert t.has_record("0002.png") and not t.has_record("0003.png")
    with pytest.raises(PromptNotFoundError, match=r"no prompt for image '0003\.png' in side-file"):
        t.record("0003.png")
    assert PromptTable(f, missing="empty").record("0003.png") == {}


def test_record_rejects_a_list_of_non_strings(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"path": "1.png", "tags": ["a", 2]}])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: field 'tags' must be a string or a list of strings"):
        PromptTable(f).record("1.png")
