"""`prefopt generate --model DIR` with no prompt: an interactive chat with a saved model.

    you> Sort: 3 1 2
    model> 1 2 3
    you> /reset

At a terminal the turns are marked (`you> `, then the model folder's name), the line is edited
with readline (history kept across sessions in $XDG_CACHE_HOME/prefopt/chat_history, default
~/.cache/prefopt) and the answer is streamed as it is generated. Piped, it reads line by line and
writes each answer to stdout, unmarked and followed by a newline, nothing else (notices go to
stderr).

Commands: /help, /reset (forget the conversation), /exit (also end of input, Ctrl-D). Ctrl-C
during an answer stops it and returns to the prompt (the turn is not kept); at the prompt it
clears the line, and a second Ctrl-C in a row ends. `//text` sends `/text` as a message.

The answer is generated as `evaluation.Generator.answer` generates it (the saved chat template,
every EOS id the Generator stops at, its generation settings) and decoded the same way, so the
streamed text is the answer `prefopt generate --prompt` prints for the same conversation.
"""

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HELP = """commands:
  /help    this list
  /reset   forget the conversation and start a new one
  /exit    end the chat (so do end of input, Ctrl-D, and Ctrl-C twice at the prompt)
Ctrl-C while the model answers stops that answer. //text sends /text as a message."""

HISTORY_LENGTH = 1000


class AnswerStream:
    """generate's streamer: decodes the answer so far as `Generator.answer` decodes the whole
    (special tokens, EOS among them, skipped; stripped) and writes what is new. Held back until
    more comes: leading and trailing whitespace (the whole answer is stripped) and a trailing
    replacement character (a character whose bytes are not all generated yet)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # generate's first call hands over the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.text().rstrip().rstrip("\ufffd").rstrip()
        self._show(text)

    def end(self):
        self._show(self.text())

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def _show(self, text: str):
        # a decode that rewrote what is on screen (rare) is not shown again; the answer kept is `text()`
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


class _StopOnRequest:
    """A stopping criterion that ends generation once `requested` is set (by Ctrl-C)."""

    def __init__(self):
        self.requested = False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)


def stream_answer(generator, conversation: list[dict], write: Callable[[str], None]) -> str | None:
    """Answer `conversation` as `generator.answer` would, writing the text as it comes; None when
    Ctrl-C stopped it. A first Ctrl-C only asks generation to stop at the next token; a second
    one raises KeyboardInterrupt as usual."""
    from transformers import StoppingCriteriaList

    tokenizer = generator.tokenizer
    import torch

    ids = torch.tensor([generator.prompt_ids(conversation)])
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stream, stop = AnswerStream(tokenizer, write), _StopOnRequest()

    def on_sigint(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C is not ours to catch
        previous = None
    try:
        with torch.no_grad():
            generator.model.generate(**enc, eos_token_id=generator.eos, pad_token_id=tokenizer.pad_token_id,
                                     streamer=stream, stopping_criteria=StoppingCriteriaList([stop]),
                                     **generator.generation)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return None if stop.requested else stream.text()


def history_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "prefopt" / "chat_history"


class _Terminal:
    """Lines typed at a terminal: readline editing and history, `you> ` prompt, Ctrl-C clears."""

    interactive = True

    def __init__(self):
        try:
            import readline
        except ImportError:  # a Python built without it: plain input() still works
            readline = None
        self.readline = readline
        if readline is not None:
            readline.set_history_length(HISTORY_LENGTH)
            try:
                readline.read_history_file(history_file())
            except OSError:  # none yet, or unreadable: start with an empty history
                pass

    def read(self) -> str | None:
        """The next line; None to end (end of input, or Ctrl-C twice in a row)."""
        interrupted = False
        while True:
            try:
                return input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return None
            except KeyboardInterrupt:
                if interrupted:
                    print(file=sys.stderr)
                    return None
                interrupted = True
                print("\n(Ctrl-C again, Ctrl-D or /exit ends the chat)", file=sys.stderr)

    def close(self):
        if self.readline is None:
            return
        path = history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(path)
            path.chmod(0o600)  # what was typed is nobody else's to read
        except OSError as e:
            print(f"prefopt: could not save the chat history in {path} ({e})", file=sys.stderr)


class _Piped:
    """Lines from a pipe or file, one message each; no prompt, no editing."""

    interactive = False

    def __init__(self, stream):
        self.stream = stream

    def read(self) -> str | None:
        try:
            line = self.stream.readline()
        except KeyboardInterrupt:
            return None
        return line.rstrip("\r\n") if line else None

    def close(self):
        pass


def chat(generator, stdin=None) -> int:
    """Read a turn, answer it, keep the conversation, until /exit or the end of input."""
    stdin = sys.stdin if stdin is None else stdin
    console = _Terminal() if stdin.isatty() else _Piped(stdin)
    name = generator.name or "model"
    print(f"prefopt chat with {name}: type a message; /help lists the commands, /exit or Ctrl-D ends.",
          file=sys.stderr)
    conversation: list[dict] = []
    try:
        while (line := console.read()) is not None:
            message = line.strip()
            if not message:
                continue
            if message.startswith("/") and not message.startswith("//"):
                if _command(message, conversation) == "exit":
                    break
                continue
            _turn(generator, conversation, message.removeprefix("/"), console.interactive, name)
    finally:
        console.close()
    return 0


def _command(message: str, conversation: list[dict]) -> str | None:
    command = message.split()[0]
    if command in ("/exit", "/quit"):
        return "exit"
    if command == "/help":
        print(HELP, file=sys.stderr)
    elif command == "/reset":
        turns = sum(m["role"] == "user" for m in conversation)
        conversation.clear()
        print(f"(conversation reset: {turns} turn{'s' if turns != 1 else ''} forgotten)", file=sys.stderr)
    else:
        print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
    return None


def _turn(generator, conversation: list[dict], message: str, interactive: bool, name: str):
    """One exchange: the answer streamed to stdout (marked at a terminal) and kept, unless stopped."""
    def write(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        write(f"{name}> ")
    answer = stream_answer(generator, conversation + [{"role": "user", "content": message}], write)
    write("\n")
    if answer is None:
        print("(stopped; this turn is not kept)", file=sys.stderr)
        return
    conversation += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
