"""Helpers of the config tests (test_config*.py): a config file written from text, and the CLI's
one-line refusal of one."""

from prefopt.cli import main


def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def refused(tmp_path, capsys, content: str | bytes, *argv: str, command=("train",)) -> str:
    """Run the CLI on a config pointing at a model folder that does not exist; return the error.

    The model check comes later in the pipeline with its own message, so an exact match on the
    config's message shows the refusal came first; and nothing is written."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    args = [*command, str(path)]
    if command == ("train",):
        args += ["--model_name_or_path", str(tmp_path / "never-loaded"), "--output_dir", str(out)]
    assert main([*args, *argv]) == 2
    err = capsys.readouterr().err
    assert not out.exists()
    assert err.startswith("prefopt: error: ") and err.endswith("\n") and err.count("\n") == 1  # one line, no traceback
    return err.removeprefix("prefopt: error: ").removesuffix("\n").replace(str(path), "c.yaml")
