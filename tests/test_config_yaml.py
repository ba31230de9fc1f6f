"""Issue 11, item 8, the YAML half: the config is read safely. A key given twice is refused naming
both lines; anchors and merge keys still work; alias bombs, recursive aliases and deep nesting are
refused while the file is read; other encodings are named with the fix, and a UTF-8 byte-order
mark just works."""

import codecs

import pytest

from config_helpers import refused, write
from prefopt import yamlfile
from prefopt.config import load_config
from prefopt.errors import PrefoptError

KEEP_ONE = "YAML would silently keep the second. Keep one."


@pytest.mark.parametrize("text, message", [
    ("method: simpo\nbeta: 2.0\nlearning_rate: 1e-6\nbeta: 20.0\n",
     f"'beta' is given twice (line 2 and line 4); {KEEP_ONE}"),
    ("method: simpo\ndataset_mixer:\n  data/a.jsonl: 0.5\n  data/b.jsonl: 1.0\n  data/a.jsonl: 1.0\n",
     f"'data/a.jsonl' under dataset_mixer is given twice (line 3 and line 5); {KEEP_ONE}"),
    ("method: simpo\ndatasets:\n  - path: a.jsonl\n  - path: b.jsonl\n    split: train\n    columns: [prompt]\n"
     "    split: test\n", f"'split' under datasets[1] is given twice (line 5 and line 7); {KEEP_ONE}"),
    ("method: simpo\ndataset_mixture:\n  datasets:\n    - {id: a, weight: 0.5, weight: 1.0}\n",
     f"'weight' under dataset_mixture.datasets[0] is given twice on line 4; {KEEP_ONE}"),
    # two spellings of one value are one key to Python, so YAML would keep the second as well
    ("method: simpo\ncolumn_mapping: {1: a, 1.0: b}\n", f"'1.0' under column_mapping is given twice on line 2; {KEEP_ONE}"),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys, text, message):
    assert refused(tmp_path, capsys, text) == f"c.yaml: {message}"
    assert refused(tmp_path, capsys, text, command=("config", "explain")) == f"c.yaml: {message}"


def test_a_key_given_twice_on_the_command_line(tmp_path, capsys):
    err = refused(tmp_path, capsys, "method: simpo\n", "--dataset_mixer", "{a.jsonl: 1.0, a.jsonl: 0.5}")
    assert err == f"command line (--dataset_mixer): 'a.jsonl' is given twice on line 1; {KEEP_ONE}"


def test_anchors_and_merge_keys_still_work(tmp_path):
    # a merge key's keys are overridden by those written beside it, by YAML's rule: no duplicate
    text = """
method: simpo
datasets:
  - &source {path: a.jsonl, split: train, columns: [prompt, chosen, rejected]}
  - {<<: *source, split: test}
"""
    d = load_config(write(tmp_path, text)).data
    assert [(s.path, s.split, s.columns) for s in d.train_datasets + d.eval_datasets] == [
        ("a.jsonl", "train", ["prompt", "chosen", "rejected"]), ("a.jsonl", "test", ["prompt", "chosen", "rejected"])]
    text = "method: simpo\nlora_target_modules: &modules [q_proj, v_proj]\nlora_modules_to_save: *modules\n"
    assert load_config(write(tmp_path, text)).model.lora_modules_to_save == ["q_proj", "v_proj"]


def test_an_alias_bomb_is_refused_while_it_is_read(tmp_path, capsys):
    # nine levels of nine aliases: 9^9 = 387,420,489 strings once expanded. Level k is 1 + 9 times
    # level k-1 (a: 10, b: 91, c: 820, d: 7,381, e: 66,430, f: 597,871), so the bound of 100,000
    # is crossed at f, line 7, before the rest is composed; and before anything else is checked.
    lines = ["method: simpo", "a: &a [q, q, q, q, q, q, q, q, q]"]
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    assert refused(tmp_path, capsys, "\n".join(lines)) == (
        "c.yaml: line 7: this value expands to more than 100,000 values through YAML aliases (*name); write the "
        "values out instead.")


def read_yaml_text(text: str):
    return yamlfile.parse_yaml(text, "c.yaml")


def test_alias_expansion_is_counted_in_full(monkeypatch):
    # {a: &x [1, 2], b: *x}: the list is 3 values (itself and two items), and b's alias stands for
    # all 3 again: 1 (mapping) + 1 + 3 (a) + 1 + 3 (b) = 9. Counting the alias as 1 would give 7.
    text = "{a: &x [1, 2], b: *x}"
    monkeypatch.setattr(yamlfile, "MAX_YAML_VALUES", 9)
    assert read_yaml_text(text) == {"a": [1, 2], "b": [1, 2]}
    monkeypatch.setattr(yamlfile, "MAX_YAML_VALUES", 8)
    with pytest.raises(PrefoptError, match="line 1: this value expands to more than 8 values"):
        read_yaml_text(text)


def test_recursive_aliases_and_deep_nesting_are_refused():
    with pytest.raises(PrefoptError) as e:
        read_yaml_text("method: simpo\nlora_target_modules: &a [q, *a]\n")
    assert str(e.value) == ("c.yaml: line 2: the alias *a refers to a value that contains it; a config cannot hold a "
                            "recursive value.")
    with pytest.raises(PrefoptError) as e:  # 500 levels: without the bound, PyYAML's composer hits RecursionError
        read_yaml_text("lora_target_modules: " + "[" * 500 + "]" * 500)
    assert str(e.value) == "c.yaml: line 1: the YAML nests more than 64 levels deep; a config is a mapping of keys to values."
    assert read_yaml_text("a: " + "[" * 64 + "]" * 64)["a"] is not None  # the innermost list at depth 64
    with pytest.raises(PrefoptError, match="nests more than 64 levels"):
        read_yaml_text("a: " + "[" * 65 + "]" * 65)


UTF8_FIX = 'save it as UTF-8 (your editor\'s "save with encoding")'


@pytest.mark.parametrize("encoded, message", [
    (codecs.BOM_UTF16_LE + "method: simpo\n".encode("utf-16-le"),
     f"the file is UTF-16 (little-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-16 -t UTF-8 c.yaml > fixed.yaml`."),
    (codecs.BOM_UTF16_BE + "method: simpo\n".encode("utf-16-be"),
     f"the file is UTF-16 (big-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-16 -t UTF-8 c.yaml > fixed.yaml`."),
    (codecs.BOM_UTF32_LE + "method: simpo\n".encode("utf-32-le"),
     f"the file is UTF-32 (little-endian) text; configs are read as UTF-8: {UTF8_FIX}, or convert it with "
     "`iconv -f UTF-32 -t UTF-8 c.yaml > fixed.yaml`."),
    ("method: simpo\n".encode("utf-16-le"),
     "the file holds NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark, and configs are read "
     f"as UTF-8: {UTF8_FIX}."),
    ("method: simpo\nchat_template: 'café'\n".encode("latin-1"),
     f"line 2: not UTF-8 text (byte 0xe9: invalid continuation byte); {UTF8_FIX}."),
])
def test_other_encodings_are_named_with_the_fix(tmp_path, capsys, encoded, message):
    assert refused(tmp_path, capsys, encoded) == f"c.yaml: {message}"


def test_a_utf8_byte_order_mark_just_works(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(codecs.BOM_UTF8 + "method: simpo\nbeta: 3.0\nchat_template: 'café'\n".encode())
    cfg = load_config(path)
    assert (cfg.objective.method, cfg.objective.beta, cfg.data.chat_template) == ("simpo", 3.0, "café")
