"""Issue 15, item 2: `prefopt data CONFIG` runs the data pipeline alone and shows what the trainer
will get: the data report train prints, and the first train pairs decoded from the collator's ids
with the scored part told apart (⟦…⟧ in a file or pipe, colour on a terminal), special tokens
marked and BOS/EOS counted; the same, plain, in output_dir/data_preview.txt, which replaces only
prefopt's own previous preview. No model weights load. `max_steps: 0` points to it."""

import io
import re
import sys

import pytest
import transformers
import xxhash

from prefopt import preview
from prefopt.cli import USAGE, main
from prefopt.config import load_config
from prefopt.data import format_report, prepare
from prefopt.manifest import read_manifest
from prefopt.models import load_tokenizer
from prefopt.preview import MARKER, PREVIEW_FILE, bos_eos

ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("preview", {"train": (8, 0), "test": (4, 1)}, chat=True, method="simpo",
                     per_device_train_batch_size=2)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Any model load fails the test: `prefopt data` loads the tokenizer only. The modules that bind
    load_model by name are imported first, so none of them keeps the stand-in after the test."""
    import prefopt.pipeline  # noqa: F401
    import prefopt.trl.model  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("prefopt data loaded model weights")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
    monkeypatch.setattr("prefopt.models.load_model", refuse)
    monkeypatch.delenv("NO_COLOR", raising=False)


def run_data(ws, out, *args) -> int:
    return main(["data", str(ws.root / "config.yaml"), "--output_dir", str(out), *args])


def sequence_block(text: str, pair: int, name: str) -> str:
    """The decoded `name` sequence (chosen or rejected) of train pair `pair` in a preview."""
    after = text.split(f"=== train pair {pair}:", 1)[1]
    block = after.split(f"--- {name} (", 1)[1].split("\n", 1)[1]
    return re.split(r"\n(?:--- |\n=== |prefopt: )", block + "\n", maxsplit=1)[0]


def scored_text(block: str) -> tuple[str, str]:
    """(the text before ⟦, the text between ⟦ and ⟧), special-token marks taken off."""
    prompt, rest = block.split("⟦", 1)
    scored, tail = rest.split("⟧", 1)
    assert tail == "" and "⟦" not in scored  # one scored part, at the end
    unmark = lambda s: s.replace("«", "").replace("»", "")  # noqa: E731
    return unmark(prompt), unmark(scored)


def test_prints_the_report_and_examples_and_writes_the_same(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_data(ws, out, "--examples", "2") == 0
    printed = capsys.readouterr().out

    cfg = load_config(str(ws.root / "config.yaml"), ["--output_dir", str(out)])
    tokenizer = load_tokenizer(cfg.model)
    report = format_report(prepare(cfg, tokenizer).report)
    assert report in printed  # the lines train prints, from the same code
    assert "train: 8 of 8 pairs kept" in printed and "eval: 4 of 4 pairs kept" in printed
    assert "=== train pair 0:" in printed and "=== train pair 1:" in printed and "=== train pair 2:" not in printed
    assert f"{ws.data}[train] row 0 — prompt" in printed  # which rows
    assert "legend: ⟦…⟧: the scored part" in printed and "\033[" not in printed  # captured: not a terminal
    assert "«<|im_start|>»assistant" in printed and "«<s>»" in printed  # special tokens marked
    assert "--- chosen (prompt + chosen: " in printed and "BOS 1, EOS 1)" in printed and "check:" not in printed

    assert sorted(p.name for p in out.iterdir()) == [PREVIEW_FILE]  # nothing else written there
    written = (out / PREVIEW_FILE).read_text()
    body = printed.rsplit("prefopt: data preview written to", 1)
    assert body[1].strip() == str(out / PREVIEW_FILE)
    assert written == f"{MARKER}{xxhash.xxh3_64_hexdigest(body[0].encode())}\n{body[0]}"


@pytest.mark.parametrize("method, layout", [("simpo", "packed"), ("orpo", "padded")])
def test_the_scored_part_is_what_the_trainers_collator_scores(ws, tmp_path, capsys, monkeypatch, method, layout):
    """The preview's ⟦…⟧ against the collator the trainer builds for the real model (its layout,
    its method): the decoded completion targets of each sequence, and the prompt before them."""
    out = tmp_path / "run"
    assert run_data(ws, out, "--method", method, "--layout", layout) == 0
    printed = capsys.readouterr().out
    monkeypatch.undo()  # the test itself loads the model, for the trainer's collator
    from transformers import AutoModelForCausalLM

    from prefopt.trainer import collator_for_model

    cfg = load_config(str(ws.root / "config.yaml"), ["--output_dir", str(out), "--method", method, "--layout", layout])
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare(cfg, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(ws.model)
    collator = collator_for_model(cfg, model, tokenizer, log=lambda *a: None)
    assert collator.score_prompt == (method == "orpo")
    for i in range(3):
        pair = prepared.train[i]
        batch = collator([pair])
        for seq, name in ((0, "chosen"), (1, "rejected")):
            keep = (batch["score_seq"] == seq) & batch["score_is_completion"]
            targets = batch["score_target"][keep].tolist()
            assert targets == pair[f"{name}_ids"]  # what the loss scores: the whole completion
            prompt, scored = scored_text(sequence_block(printed, i, name))
            assert scored == tokenizer.decode(targets)
            assert prompt == tokenizer.decode(pair["prompt_ids"])
    assert ("NLL term also scores the chosen prompt" in printed) == (method == "orpo")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_on_a_terminal_only_and_plain_in_the_file(ws, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    out = tmp_path / "run"
    assert run_data(ws, out, "--examples", "1") == 0
    shown = terminal.getvalue()
    written = (out / PREVIEW_FILE).read_text().split("\n", 1)[1]
    assert preview.GREEN in shown and "⟦" not in shown and "\033[" not in written and "⟦" in written
    # the same text, marked two ways: without colour and brackets (and their legends), line for line
    strip = lambda text: [line for line in text.replace("⟦", "").replace("⟧", "").splitlines()  # noqa: E731
                          if not line.startswith(("legend:", "prefopt: data preview written"))]
    assert strip(ANSI.sub("", shown)) == strip(written)

    monkeypatch.setenv("NO_COLOR", "1")
    terminal.seek(0), terminal.truncate()
    assert run_data(ws, out, "--examples", "1") == 0
    assert "\033[" not in terminal.getvalue() and "⟦" in terminal.getvalue()


def test_a_users_file_is_never_overwritten(ws, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / PREVIEW_FILE).write_text("my notes\n")
    assert run_data(ws, out) == 2
    assert "is not a preview prefopt wrote" in capsys.readouterr().err
    assert (out / PREVIEW_FILE).read_text() == "my notes\n"

    (out / PREVIEW_FILE).unlink()
    assert run_data(ws, out, "--examples", "1") == 0
    assert run_data(ws, out, "--examples", "2") == 0  # prefopt's own preview is replaced
    assert "=== train pair 1:" in (out / PREVIEW_FILE).read_text()
    (out / PREVIEW_FILE).write_text((out / PREVIEW_FILE).read_text() + "my note\n")  # edited: now the user's
    capsys.readouterr()
    assert run_data(ws, out) == 2
    assert "or it was edited since" in capsys.readouterr().err

    elsewhere = tmp_path / "notes" / "look.txt"
    assert run_data(ws, out, "--output", str(elsewhere), "--examples", "0") == 0
    assert "examples: none asked for" in elsewhere.read_text()
    assert f"written to {elsewhere}" in capsys.readouterr().out


def test_a_train_run_starts_where_a_preview_was_written(ws, tmp_path):
    """The preview is not one of the run's files: train neither refuses the folder for it nor deletes it."""
    from prefopt import runs

    out = tmp_path / "run"
    assert run_data(ws, out, "--examples", "1") == 0
    plan = runs.plan(load_config(str(ws.root / "config.yaml"), ["--output_dir", str(out)]))
    assert plan.fresh and not plan.finished and plan.remove == []
    runs.commit(plan, {"files": {}, "train": None, "eval": None}, 1, log=lambda *a: None)
    assert read_manifest(out)["foreign"] == [PREVIEW_FILE] and PREVIEW_FILE not in read_manifest(out)["files"]
    again = runs.plan(load_config(str(ws.root / "config.yaml"), ["--output_dir", str(out),
                                                                  "--overwrite_output_dir", "true"]))
    assert out / PREVIEW_FILE not in again.remove and again.remove  # the run's own files go, the preview stays


def test_bad_input_is_a_prefopt_error(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_data(ws, out, "--bogus_key", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("prefopt: error: ") and "bogus_key" in err and "Traceback" not in err
    for args, said in ((["--examples", "-1"], "not a whole number"), (["--examples", "two"], "not a whole number"),
                       (["--examples"], "expected one argument")):
        assert run_data(ws, out, *args) == 2
        assert said in capsys.readouterr().err
    assert main(["data"]) == 2 and "name a config file" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_help(capsys):
    assert main(["data", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--examples N" in shown and "--output FILE" in shown and "data_preview.txt" in shown
    assert "prefopt data CONFIG.yaml" in USAGE


def test_max_steps_0_points_to_prefopt_data(ws, capsys):
    assert main(["train", str(ws.root / "config.yaml"), "--max_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_steps must be -1 or a whole number of at least 1" in err and "run `prefopt data CONFIG.yaml`" in err


def test_bos_and_eos_counted_and_flagged(ws):
    tok = ws.tokenizer
    bos, eos, a = tok.bos_token_id, tok.eos_token_id, tok("5").input_ids[-1]
    assert bos_eos([bos, a, eos], tok) == "BOS 1, EOS 1"
    assert "BOS 2 times (a double BOS" in bos_eos([bos, bos, a, eos], tok)
    assert bos_eos([bos, a], tok) == "BOS 1, EOS 0; check: no EOS at the end"
    assert "EOS twice at the end" in bos_eos([bos, a, eos, eos], tok)
    assert "BOS not first" in bos_eos([a, bos, eos], tok)
