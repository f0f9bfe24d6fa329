"""`phi_fast chat` and the streaming Chat.ask under it: answers stream, equal Chat.ask on the same turns, the
commands (/image, /text, /reset, /help, /quit) do what /help says, and mistakes are one line, never the end.
The program itself is driven through a pty (a terminal: prompt marker, Ctrl-C, Ctrl-D) and through a pipe."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import phi_fast
from phi_fast.chat_cli import PROMPT_MARKER, ChatRepl
from phi_fast.sampling import SamplingParams

from engine_fixtures import random_image, tiny_llava_phi
from package_under_test import child_env, run_python

TOKENS = 10
QUESTIONS = ("What is it?", "And the colours?", "Describe it again.")
READ_TIMEOUT = 120.0  # seconds for one answer of the tiny model in a child process (a loaded 2-core machine)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_llava_phi(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def model(ckpt):
    return phi_fast.load(ckpt, progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("chat_images")
    paths = [folder / f"img{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        random_image(i).save(path)
    return paths


def asked(model, image, questions) -> list[str]:
    """Chat.ask's answers to `questions`, one conversation about `image`."""
    chat = model.chat(image)
    try:
        return [chat.ask(q, max_new_tokens=TOKENS) for q in questions]
    finally:
        chat.close()


# --- the streaming Chat.ask ------------------------------------------------------------------------------------

def test_streamed_turns_equal_ask(model, images):
    expected = asked(model, images[0], QUESTIONS)
    chat = model.chat(images[0])
    for i, question in enumerate(QUESTIONS):
        pieces = list(chat.ask(question, max_new_tokens=TOKENS, stream=True))
        assert "".join(pieces).strip() == expected[i]
        assert chat.turns == list(zip(QUESTIONS[:i + 1], expected[:i + 1]))
    chat.close()


def test_stream_closed_early_keeps_the_conversation(model, images):
    used = model.loop.call(lambda engine: engine.pool.num_free)
    expected = asked(model, images[0], QUESTIONS[:2])
    chat = model.chat(images[0])
    first = chat.ask(QUESTIONS[0], max_new_tokens=TOKENS)
    stream = chat.ask(QUESTIONS[1], max_new_tokens=TOKENS, stream=True)
    next(stream, None)
    stream.close()  # aborted: the turn is not kept
    assert chat.turns == [(QUESTIONS[0], first)]
    assert chat.ask(QUESTIONS[1], max_new_tokens=TOKENS) == expected[1]
    chat.reset()
    assert chat.turns == [] and chat.ask(QUESTIONS[0], max_new_tokens=TOKENS) == expected[0]
    chat.close()
    assert model.loop.call(lambda engine: engine.pool.num_free) == used  # every page back


def test_stream_flag_is_checked(model):
    with pytest.raises(ValueError, match="stream must be a bool"):
        model.chat().ask("hi", stream="yes")


# --- the REPL, in this process ---------------------------------------------------------------------------------

class Recorder(io.StringIO):
    """stdout that counts flushed writes, so a test sees the answer arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def repl(model, image, lines: list[str]) -> tuple[ChatRepl, str, str, int]:
    out, err = Recorder(), io.StringIO()
    r = ChatRepl(model, SamplingParams(max_new_tokens=TOKENS), None if image is None else str(image),
                 interactive=False, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out, err=err)
    assert r.run() == 0
    return r, out.getvalue(), err.getvalue(), out.writes


def test_repl_answers_equal_ask(model, images):
    q = QUESTIONS
    _, out, err, writes = repl(model, images[0], [q[0], "", q[1], "/reset", q[0], f"/image {images[1]}", q[2],
                                                 "/text", q[0], "/quit", q[1]])
    about0 = asked(model, images[0], q[:2])
    expected = [*about0, about0[0], asked(model, images[1], q[2:3])[0], asked(model, None, q[:1])[0]]
    assert all(expected) and len(set(expected)) > 2  # the tiny model says something, not always the same
    assert out == "".join(a + "\n" for a in expected)  # nothing after /quit
    assert writes > 2 * len(expected)  # streamed: an answer is written piece by piece, not at once
    assert err.splitlines() == ["(conversation reset)", f"(new conversation about {images[1]})",
                                "(new text-only conversation)"]


def test_repl_mistakes_are_one_line_and_the_chat_goes_on(model, images, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    lines = [QUESTIONS[0], "/image", f"/image {tmp_path / 'missing.png'}", f"/image {not_image}", "/bogus",
             "/help", QUESTIONS[1]]
    r, out, err, _ = repl(model, images[0], lines)
    assert out == "".join(a + "\n" for a in asked(model, images[0], QUESTIONS[:2]))  # same conversation throughout
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4
    assert "/image needs a path" in errors[0] and "missing.png" in errors[1] and "no such file" in errors[1]
    assert "notes.txt" in errors[2] and "unknown command '/bogus'" in errors[3]
    assert "/image PATH" in err and "/reset" in err  # the help text
    assert r.image == str(images[0])


class InterruptOnce(Recorder):
    """stdout whose first write raises KeyboardInterrupt, as Ctrl-C arriving while an answer streams."""

    def write(self, text: str) -> int:
        if self.writes == 0:
            self.writes += 1
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_an_answer_drops_that_turn(model, images):
    free = model.loop.call(lambda engine: engine.pool.num_free)
    out, err = InterruptOnce(), io.StringIO()
    r = ChatRepl(model, SamplingParams(max_new_tokens=TOKENS), str(images[0]), interactive=False,
                 stdin=io.StringIO(f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n"), out=out, err=err)
    assert r.run() == 0
    assert "answer stopped" in err.getvalue()
    # the second question is the conversation's first turn: the interrupted one was dropped
    assert out.getvalue() == "\n" + asked(model, images[0], QUESTIONS[1:2])[0] + "\n"
    assert model.loop.call(lambda engine: engine.pool.num_free) == free  # its pages are back


def test_repl_prompt_too_long_is_an_error_line(model, images):
    long_question = " ".join(["word"] * 5000)  # far past the tiny model's context
    _, out, err, _ = repl(model, images[0], [long_question, QUESTIONS[0]])
    assert out.endswith(asked(model, images[0], QUESTIONS[:1])[0] + "\n")
    assert err.startswith("error: ") and len(err.splitlines()) == 1


# --- the program: a pipe, then a terminal ---------------------------------------------------------------------

def test_piped_questions(ckpt, model, images):
    result = run_python(["-m", "phi_fast", "chat", "--model", str(ckpt), "--image", str(images[0]),
                         "--max-new-tokens", str(TOKENS)], input="\n".join(QUESTIONS[:2]) + "\n", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(a + "\n" for a in asked(model, images[0], QUESTIONS[:2]))  # no prompt marker


def test_bad_image_option_is_one_line(ckpt, tmp_path):
    result = run_python(["-m", "phi_fast", "chat", "--model", str(ckpt), "--image", str(tmp_path / "no.png")],
                        input="", timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f": error: --image {tmp_path / 'no.png'}: no such file"), lines


class Terminal:
    """`python -m phi_fast chat ...` with a pty as its stdin, stdout and stderr; reads are bounded."""

    def __init__(self, args: list[str], cwd: Path):
        self.master, slave = os.openpty()
        env = child_env(TERM="dumb")  # readline's escape sequences off
        self.proc = subprocess.Popen([sys.executable, "-m", "phi_fast", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd=cwd, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = READ_TIMEOUT) -> str:
        """Everything printed up to and including the next `marker`."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"no {marker!r} within {timeout} s; got {self.seen!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before {marker!r}; got {self.seen!r}")
            self.seen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        head, _, self.seen = self.seen.partition(marker)
        return head

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            os.close(self.master)


def _answer(text: str, question: str) -> str:
    """The answer in what the terminal showed after `question` was typed (it echoes the line first)."""
    echoed = question + "\n"
    assert text.startswith(echoed), text
    return text[len(echoed):]


def test_terminal_session(ckpt, model, images, tmp_path):
    term = Terminal(["--model", str(ckpt), "--image", str(images[0]), "--max-new-tokens", str(TOKENS)], tmp_path)
    try:
        assert "/help lists the commands" in term.read_until(PROMPT_MARKER)
        about0 = asked(model, images[0], QUESTIONS[:2])
        for question, expected in zip(QUESTIONS[:2], about0):
            term.send(question + "\n")
            assert _answer(term.read_until(PROMPT_MARKER), question) == expected + "\n"
        term.send(f"/image {images[1]}\n")
        assert f"(new conversation about {images[1]})" in term.read_until(PROMPT_MARKER)
        term.send(QUESTIONS[0] + "\n")
        assert _answer(term.read_until(PROMPT_MARKER), QUESTIONS[0]) == asked(model, images[1], QUESTIONS[:1])[0] + "\n"
        term.send("/reset\n")
        assert "(conversation reset)" in term.read_until(PROMPT_MARKER)
        term.send("\x04")  # Ctrl-D at the prompt: EOF
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.close(1)


def test_terminal_ctrl_c_at_the_prompt_ends_cleanly(ckpt, tmp_path):
    term = Terminal(["--model", str(ckpt)], tmp_path)
    try:
        assert "text only" in term.read_until(PROMPT_MARKER)
        # What Ctrl-C sends (the pty is not the child's controlling tty). A signal that lands between readline
        # printing the prompt and entering its select() is only seen at the next one (CPython's readline), so
        # send again until the chat answers it with the newline that ends the prompt's line.
        for _ in range(10):
            term.proc.send_signal(signal.SIGINT)
            try:
                term.read_until("\n", timeout=3)
                break
            except AssertionError:
                continue
        assert term.close() == 0
        assert "Traceback" not in term.seen
    finally:
        if term.proc.poll() is None:
            term.close(1)
