"""`prefopt generate --model DIR` with no prompt: the chat (prefopt.chat).

At a pseudo-terminal (the child made its controlling terminal, so Ctrl-C is a SIGINT as at a real
one): role marks, readline, /reset, /exit, Ctrl-C at the prompt. Piped: answers only, on stdout.
In process: the streamed text is `Generator.answer`'s, and Ctrl-C during an answer stops it. Every
read from the terminal has a deadline, so a chat that hangs fails the test instead of hanging it.
"""

import io
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from prefopt.chat import AnswerStream, chat, stream_answer
from prefopt.evaluation import Generator

NEW_TOKENS = 8
DEADLINE = 180  # seconds for any one expected output: a guard against a hang, not a measurement

# the child takes the terminal on its stdin as its controlling terminal, then becomes prefopt
# The child takes the terminal as its controlling one, and Ctrl-C back: a job started in the background by a
# non-interactive shell (`make test &`, nohup) has SIGINT ignored, which every process it starts inherits.
CTTY = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'prefopt'] + sys.argv[1:])")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from prefopt.demo import task_corpus
    from prefopt.tiny import save_tiny, tiny_model, train_tokenizer

    tokenizer = train_tokenizer(task_corpus(), vocab_size=300)
    return save_tiny(tiny_model("llama", tokenizer, seed=0), tokenizer, tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def generator(model_dir):
    return Generator(str(model_dir), max_new_tokens=NEW_TOKENS)


def user(text):
    return {"role": "user", "content": text}


def _env(tmp_path) -> dict:
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    return {**os.environ, "PYTHONPATH": src, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TERM": "dumb",
            "PYTHONIOENCODING": "utf-8"}


class Terminal:
    """A child process on a pseudo-terminal: `expect` reads until a text appears (or fails at the
    deadline, showing what came), `send` types."""

    def __init__(self, args: list[str], env: dict):
        master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", CTTY, *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=env, start_new_session=True)
        os.close(slave)
        self.fd, self.out, self.seen = master, b"", 0

    def _read(self, deadline: float) -> bool:
        """More output, False at the end of it (the child closed the terminal)."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"nothing more within {DEADLINE}s; the output:\n{self.text()}")
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every end of the terminal's other side is closed
            chunk = b""
        self.out += chunk
        return bool(chunk)

    def expect(self, text: str):
        want, deadline = text.replace("\n", "\r\n").encode(), time.monotonic() + DEADLINE
        while want not in self.out[self.seen:]:
            if not self._read(deadline):
                raise AssertionError(f"{text!r} never came; the output:\n{self.text()}")
        self.seen = self.out.index(want, self.seen) + len(want)

    def send(self, text: str):
        os.write(self.fd, text.encode())

    def interrupt(self):
        """Ctrl-C once the child waits, with no timeout, in select() on the terminal alone (fd 0: the
        first argument is 1) for the next key. CPython's readline handles a SIGINT only when it
        interrupts that select; one arriving while a key is being processed waits for the next key
        (a person's keys never come that close together; a test's do)."""
        deadline, syscall = time.monotonic() + DEADLINE, f"/proc/{self.proc.pid}/syscall"
        while time.monotonic() < deadline:
            try:
                with open(syscall) as f:
                    args = f.read().split()
            except OSError:  # not ours to read here: send it anyway
                break
            if len(args) > 5 and args[1] == "0x1" and args[5] == "0x0":
                break
        self.send("\x03")

    def finish(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while self._read(deadline):
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=DEADLINE)

    def text(self) -> str:
        return self.out.decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_a_chat_at_a_terminal(model_dir, generator, tmp_path):
    first = generator.answer([[user("Sort: 3 1 2")]], progress=False)[0]
    fresh = generator.answer([[user("hello")]], progress=False)[0]
    continued = generator.answer([[user("Sort: 3 1 2"), {"role": "assistant", "content": first}, user("hello")]],
                                 progress=False)[0]
    assert fresh != continued  # so the answer after /reset shows the conversation was forgotten
    term = Terminal(["generate", "--model", str(model_dir), "--max_new_tokens", str(NEW_TOKENS)], _env(tmp_path))
    try:
        term.expect("you> ")
        term.send("/help\r")
        term.expect("/reset   forget the conversation")
        term.send("/nonsense\r")
        term.expect("unknown command /nonsense; /help lists the commands")
        term.send("Sort: 3 1 2\r")
        term.expect(f"model> {first}\n")
        term.expect("you> ")
        term.send("/reset\r")
        term.expect("(conversation reset: 1 turn forgotten)")
        term.send("hello\r")
        term.expect(f"model> {fresh}\n")
        term.expect("you> ")
        term.send("/exit\r")
        assert term.finish() == 0
    finally:
        term.proc.kill()
        term.proc.wait()
    assert "Traceback" not in term.text()
    # readline's history, kept for the next chat (and nobody else's to read)
    history = tmp_path / "cache" / "prefopt" / "chat_history"
    assert "Sort: 3 1 2" in history.read_text() and "/reset" in history.read_text()
    assert history.stat().st_mode & 0o077 == 0


def test_ctrl_c_at_the_prompt_clears_then_ends(model_dir, tmp_path):
    term = Terminal(["generate", "--model", str(model_dir), "--max_new_tokens", "2"], _env(tmp_path))
    try:
        term.expect("you> ")
        term.send("half a message")
        term.expect("half a message")  # echoed: readline has it
        term.interrupt()
        term.expect("(Ctrl-C again, Ctrl-D or /exit ends the chat)")
        term.expect("you> ")
        term.interrupt()
        assert term.finish() == 0
    finally:
        term.proc.kill()
        term.proc.wait()
    assert "Traceback" not in term.text() and "interrupted" not in term.text()


def test_end_of_input_ends_the_chat(model_dir, tmp_path):
    term = Terminal(["generate", "--model", str(model_dir), "--max_new_tokens", "2"], _env(tmp_path))
    try:
        term.expect("you> ")
        term.send("\x04")  # Ctrl-D on an empty line
        assert term.finish() == 0
    finally:
        term.proc.kill()
        term.proc.wait()
    assert "Traceback" not in term.text()


def test_piped_chat_prints_answers_only(model_dir, generator, tmp_path):
    first = generator.answer([[user("Sort: 3 1 2")]], progress=False)[0]
    fresh = generator.answer([[user("hello")]], progress=False)[0]
    done = subprocess.run([sys.executable, "-m", "prefopt", "generate", "--model", str(model_dir),
                           "--max_new_tokens", str(NEW_TOKENS)],
                          input="Sort: 3 1 2\n\n/reset\n/help\nhello\n/exit\nnever read\n", capture_output=True,
                          text=True, encoding="utf-8", env=_env(tmp_path), timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first}\n{fresh}\n"  # no marks, no prompt, no escape sequences: answers only
    assert "(conversation reset: 1 turn forgotten)" in done.stderr and "/exit    end the chat" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache" / "prefopt" / "chat_history").exists()  # no readline, no history file


@pytest.mark.parametrize("new_tokens", [1, NEW_TOKENS, 48])
@pytest.mark.parametrize("message", ["Sort: 3 1 2", "hello there"])
def test_streamed_text_is_the_greedy_answer(model_dir, message, new_tokens):
    gen = Generator(str(model_dir), max_new_tokens=new_tokens)
    conversation = [user(message)]
    (whole,) = gen.answer([conversation], progress=False)
    pieces = []
    assert stream_answer(gen, conversation, pieces.append) == whole
    assert "".join(pieces) == whole
    if len(gen.tokenizer(whole, add_special_tokens=False)["input_ids"]) > 4:
        assert len(pieces) > 1  # written as it came, not once at the end


def test_stream_holds_back_what_the_whole_answer_strips(generator):
    """Whitespace at either end never shows (the answer is stripped), nor half a character: the
    byte-level tokenizer spells "€" (three bytes, none in its ASCII corpus) as three tokens."""
    import torch

    tok = generator.tokenizer
    pieces = []
    stream = AnswerStream(tok, pieces.append)
    stream.put(torch.tensor([tok("the prompt", add_special_tokens=False)["input_ids"]]))  # generate's first call
    assert pieces == []
    euro = tok("€", add_special_tokens=False)["input_ids"]
    assert len(euro) == 3
    for text in ["  ", " 1", " 2 "]:
        for i in tok(text, add_special_tokens=False)["input_ids"]:
            stream.put(torch.tensor([i]))
    assert "".join(pieces) == "1 2"
    for i in euro[:2]:
        stream.put(torch.tensor([i]))
        assert "".join(pieces) == "1 2"  # nor its space, while what follows is unknown
    stream.put(torch.tensor([euro[2]]))
    stream.put(torch.tensor([generator.eos[0]]))
    stream.end()
    assert "".join(pieces) == stream.text() == "1 2 €"


def test_ctrl_c_during_an_answer_stops_it(monkeypatch, capsys, model_dir):
    """The first token's arrival sends this process a SIGINT, as Ctrl-C would: that answer stops
    short and is not kept (the next answer is the one to a fresh conversation), no traceback."""
    gen = Generator(str(model_dir), max_new_tokens=48)
    (fresh,) = gen.answer([[user("hello")]], progress=False)
    put, sent = AnswerStream.put, []

    def put_then_interrupt(self, value):
        put(self, value)
        if self.ids and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(AnswerStream, "put", put_then_interrupt)
    # Python's own Ctrl-C, as at a terminal (a background job's SIGINT is ignored: see CTTY)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert chat(gen, io.StringIO("Sort: 3 1 2\nhello\n")) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again
    finally:
        signal.signal(signal.SIGINT, outer)
    out, err = capsys.readouterr()
    assert sent and "(stopped; this turn is not kept)" in err
    assert out.endswith(f"\n{fresh}\n")
