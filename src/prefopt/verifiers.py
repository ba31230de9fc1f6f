"""Ready-made reward functions for answers that can be checked, for `prefopt pairs`.

Each is called as fn(prompt, answer, row) -> float, like any `reward_function`; `row` is the
prompt's dataset row, which holds the reference (or the tests) in one of the columns named below.

Math word problems (GSM8K, MATH): 1.0 when the answer's final answer equals the row's reference,
else 0.0::

    reward_function: prefopt.verifiers:math_answer     # reference column: answer, reference,
                                                       # solution, ground_truth or gold

Code with tests (MBPP, HumanEval-style rows): the share of the row's tests the answer's code passes::

    reward_function: prefopt.verifiers:python_tests    # tests column: tests, test or test_list
                                                       # (runs the generated code: see python_tests)

A row without the column a function needs raises ValueError naming the columns looked for and
the ones the row has.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

REFERENCE_COLUMNS = ("answer", "reference", "solution", "ground_truth", "gold")
TEST_COLUMNS = ("tests", "test", "test_list")
DEFAULT_TIMEOUT = 10.0
RELATIVE_TOLERANCE = Fraction(1, 10**9)


def _column(row: dict, names: tuple[str, ...], what: str) -> tuple[str, object]:
    for name in names:
        if row.get(name) is not None:
            return name, row[name]
    raise ValueError(f"no {what}: looked for a column {', '.join(names)}; the row has "
                     f"{', '.join(map(str, row)) or 'no columns'}.")


# -- math: the final answer ----------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (nested braces counted), or None."""
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:/\d+)?"
_MARKER = re.compile(r"answer\s+is\s*:?|answer\s*:", re.IGNORECASE)


def _after_marker(text: str, marker: re.Pattern | str) -> str | None:
    """The rest of the line after the last `marker`: the whole if it reads as a number or has no
    number in it, else its first number ("is 18 apples." -> "18")."""
    hits = list(re.finditer(marker, text))
    if not hits:
        return None
    rest = text[hits[-1].end():].split("\n", 1)[0].strip().strip("*").strip()
    if parse_number(rest) is not None:
        return rest
    number = re.search(_NUMBER, rest)
    return number.group(0) if number else rest


def final_answer(text: str) -> str | None:
    """The answer's final answer: the last \\boxed{...}; else what follows the last '####'; else
    what follows the last 'answer is' / 'Answer:'; else the last number; None if none of these."""
    for found in (last_boxed(text), _after_marker(text, re.escape("####")), _after_marker(text, _MARKER)):
        if found is not None:
            return found
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def reference_answer(value) -> str:
    """A reference column's answer: what follows '####' (GSM8K's worked solutions), else the last
    \\boxed{...} (MATH's), else the value itself."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"the reference {value!r} is a {type(value).__name__}, not text or a number.")
    text = str(value)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text).strip()


# -- math: comparing ------------------------------------------------------------------------------

def _plain(text: str) -> str:
    """Markup that does not change a value: spaces, $, \\left/\\right, LaTeX spacing, \\text{x} -> x,
    a trailing period."""
    text = re.sub(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\left|\\right|\\[,;!]|\\?\$|\s+", "", text)
    return text.rstrip(".")


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number as answers write it (1,234 / $5 / 12% / -0.5 / 3/4 / \\frac{3}{4},
    \\dfrac, \\tfrac; the % is dropped: 12% reads 12), or None."""
    s = _plain(text).replace("\\%", "%").removesuffix("%")
    negative = s.startswith("-")
    s = s[1:] if negative else s
    frac = re.fullmatch(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if frac:
        top, bottom = parse_number(frac.group(1)), parse_number(frac.group(2))
        value = top / bottom if top is not None and bottom else None
    elif re.fullmatch(r"\d+(?:\.\d+)?/\d+(?:\.\d+)?", s):
        top, bottom = (Fraction(p) for p in s.split("/"))
        value = top / bottom if bottom else None
    elif re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+", s):
        value = Fraction(s.replace(",", ""))
    else:
        value = None
    return -value if negative and value is not None else value


def answers_match(got: str, want: str) -> bool:
    """Equal as numbers (within a relative 1e-9, exact for fractions and decimals), or else as
    text once markup, spaces and case are set aside."""
    a, b = parse_number(got), parse_number(want)
    if a is not None and b is not None:
        return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))
    return _plain(got).casefold() == _plain(want).casefold() != ""


def math_answer(prompt, answer: str, row: dict) -> float:
    """1.0 if the answer's final answer (`final_answer`) equals the row's reference (the first
    column of answer, reference, solution, ground_truth, gold present; `reference_answer`), else 0.0."""
    column, value = _column(row, REFERENCE_COLUMNS, "reference answer")
    want = reference_answer(value)
    if not want:
        raise ValueError(f"the reference in column {column} is empty: {value!r}.")
    got = final_answer(answer)
    return float(got is not None and answers_match(got, want))


# -- code: running the row's tests ----------------------------------------------------------------

_RUNNER = '''
import json
job = json.load(open("job.json", encoding="utf-8"))
ns = {"__name__": "__solution__"}
exec(compile(job["code"], "solution.py", "exec"), ns)
exec(compile(job["setup"], "setup.py", "exec"), ns)
with open("results.txt", "w") as results:
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), ns)
            results.write("pass\\n")
        except BaseException:
            results.write("fail\\n")
        results.flush()
'''


def extract_code(answer: str) -> str:
    """The last ```python (or py) fenced block; else the last fenced block of any kind; else the
    whole answer. A block left open at the end (a cut-off answer) runs to the end."""
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", answer, re.DOTALL)
    python = [code for lang, code in blocks if lang.lower() in ("python", "python3", "py")]
    return (python or [code for _, code in blocks] or [answer])[-1]


def _tests_of(row: dict) -> tuple[list[str], str]:
    """The row's test strings and the setup run before them (MBPP's test_imports and
    test_setup_code; a HumanEval `check` is called on the row's entry_point)."""
    column, value = _column(row, TEST_COLUMNS, "tests")
    tests = [value] if isinstance(value, str) else value
    if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"column {column}: the tests are Python statements, as a string or a non-empty list "
                         f"of strings; found {value!r}.")
    entry = row.get("entry_point")
    if entry:
        tests = [t + f"\ncheck({entry})" if re.search(r"^def check\(", t, re.MULTILINE) else t for t in tests]
    imports = row.get("test_imports") or []
    setup = "\n".join(([imports] if isinstance(imports, str) else list(imports)) + [row.get("test_setup_code") or ""])
    return list(tests), setup


def _timeout_of(row: dict) -> float:
    value = row.get("timeout")
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"column timeout: {value!r} is not a number of seconds above 0.")
    return float(value)


def _run(folder: Path, timeout: float) -> None:
    """The runner in its own process group, killed whole at the timeout; its output discarded."""
    proc = subprocess.Popen([sys.executable, "-I", "runner.py"], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the code's own children too
        except (AttributeError, ProcessLookupError):  # no process groups (Windows), or already gone
            proc.kill()
        proc.wait()


def python_tests(prompt, answer: str, row: dict) -> float:
    """The share of the row's tests that the answer's code passes (a single test string: 1.0 or 0.0).

    NOT A SANDBOX: this runs the generated code on this machine, with your user's rights (files,
    network, processes). Naming `prefopt.verifiers:python_tests` in a config is opting in to that;
    run it where such code can do no harm (a container, a throwaway account).

    The code (`extract_code`) runs first in a fresh `python -I` process in a temporary folder
    (stdin closed, output discarded), then each test after it, one by one, in the same namespace;
    a test passes when it raises nothing. Code that raises fails every test. The row's `timeout`
    (seconds, default 10) bounds the whole run: the tests not finished by then fail. Tests are a
    string of statements (asserts) or a list of them, in the column tests, test or test_list.
    """
    tests, setup = _tests_of(row)
    timeout = _timeout_of(row)
    with tempfile.TemporaryDirectory(prefix="prefopt-tests-") as tmp:
        folder = Path(tmp)
        (folder / "runner.py").write_text(_RUNNER, encoding="utf-8")
        job = {"code": extract_code(answer), "setup": setup, "tests": tests}
        (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        _run(folder, timeout)
        results = folder / "results.txt"
        lines = results.read_text(encoding="utf-8").split() if results.exists() else []
    return sum(line == "pass" for line in lines[: len(tests)]) / len(tests)
