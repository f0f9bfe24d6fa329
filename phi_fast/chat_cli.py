"""`phi_fast chat`: an interactive terminal conversation about an image, answers streamed as they are generated.

Each line is a user turn, answered through `Chat.ask(stream=True)`, so earlier turns stay in the KV cache and
only the new turn is prefilled. Lines starting with `/` are commands (`/help` lists them). Answers go to stdout;
command feedback and errors to stderr, one line each, after which the conversation goes on. The `>>> ` prompt is
shown only when stdin is a terminal, so piping questions in gives just the answers, one per line.
Ctrl-C during an answer stops that answer (the turn is dropped); at the prompt it ends the chat, like EOF.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

from .cli import USER_ERRORS, _one_line, add_load_options, add_sampling_options, load_model, sampling_params

if TYPE_CHECKING:
    from .api import Chat, Model
    from .sampling import SamplingParams

PROMPT_MARKER = ">>> "
HELP = """commands:
  /image PATH  start a new conversation about the image at PATH
  /text        start a new text-only conversation
  /reset       start the conversation over (same image)
  /help        this list
  /quit        leave (also /exit, Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during an answer stops it)"""


def add_chat_parser(sub: Any, **kwargs) -> None:
    """The `chat` subcommand, with the shared model-loading and sampling options."""
    chat = sub.add_parser("chat", help="talk about an image in the terminal (multi-turn, streamed)",
                          description="An interactive conversation about an image (or text only) with the "
                                      "checkpoint in --model. Type a question per line; /help lists the "
                                      "commands.", **kwargs)
    add_load_options(chat)
    chat.add_argument("--image", metavar="PATH", help="image to talk about (omit for text only; /image switches)")
    add_sampling_options(chat, output=False)
    chat.set_defaults(run=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    """`chat`: load the model, then answer lines from stdin until /quit or EOF."""
    params = sampling_params(args)
    if args.image is not None and not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: " + ("is a folder" if os.path.isdir(args.image) else "no such file"))
    with _sigint_only_in_this_thread():
        model = load_model(args)
        interactive = sys.stdin.isatty()
        if interactive:
            try:
                importlib.import_module("readline")  # once imported, input() has line editing and history
            except ImportError:
                pass
        repl = ChatRepl(model, params, args.image, interactive=interactive)
    return repl.run()


@contextlib.contextmanager
def _sigint_only_in_this_thread() -> Iterator[None]:
    """Threads started inside (tqdm's monitor, torch's worker pool) never take SIGINT. Ctrl-C at the prompt must
    reach the main thread: readline waits for input in a select() that only a signal to its own thread wakes."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class ChatRepl:
    """The read-answer loop over `stdin`, answers to `out`, feedback and errors to `err`."""

    def __init__(self, model: "Model", params: "SamplingParams", image: str | None, *, interactive: bool,
                 stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None):
        self.model = model
        self.params = params
        self.interactive = interactive
        self.stdin = stdin or sys.stdin
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.image = image
        self.chat: Chat = model.chat(image)
        self.commands: dict[str, Callable[[str], bool]] = {
            "/image": self._image, "/text": self._text, "/reset": self._reset, "/help": self._help,
            "/quit": self._quit, "/exit": self._quit}

    def run(self) -> int:
        """Answer lines until /quit, EOF or Ctrl-C at the prompt; 0."""
        if self.interactive:
            about = f"about {self.image}" if self.image is not None else "text only"
            self._say(f"phi_fast chat ({about}); /help lists the commands")
        try:
            while True:
                try:
                    line = self._read_line()
                except (EOFError, KeyboardInterrupt):
                    if self.interactive:
                        print(file=self.out, flush=True)  # end the prompt's line
                    return 0
                except UnicodeDecodeError:
                    self._say("error: that line is not UTF-8 text")
                    continue
                if not self._handle(line.strip()):
                    return 0
        finally:
            self.chat.close()

    def _read_line(self) -> str:
        if self.interactive and self.stdin is sys.stdin:
            return input(PROMPT_MARKER)  # readline editing on a terminal
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line

    def _handle(self, line: str) -> bool:
        """Run one line (a command or a question); False to stop."""
        if not line:
            return True
        if line.startswith("/"):
            name, _, arg = line.partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self._say(f"error: unknown command {name!r:.40} (/help lists the commands)")
                return True
            return command(arg.strip())
        self._answer(line)
        return True

    def _answer(self, question: str) -> None:
        """Stream the answer to `question` to out, one flushed write per piece, then a newline."""
        p = self.params
        wrote, held = False, ""  # held: trailing whitespace, written only once more text follows it
        try:
            pieces = self.chat.ask(question, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                   top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=list(p.stop) or None,
                                   stream=True)
            try:
                for piece in pieces:  # printed as ask() returns the answer: stripped
                    text = held + piece if wrote else piece.lstrip()
                    visible = text.rstrip()
                    held = text[len(visible):]
                    if visible:
                        self.out.write(visible)
                        self.out.flush()
                        wrote = True
            finally:
                pieces.close()  # after Ctrl-C or an error: aborts the request, the turn is not kept
        except KeyboardInterrupt:
            print(file=self.out, flush=True)
            self._say("(answer stopped; that turn is dropped)")
            return
        except USER_ERRORS as error:
            if wrote:
                print(file=self.out, flush=True)
            self._say(f"error: {_one_line(error)}")
            return
        print(file=self.out, flush=True)

    # --- commands: each returns False to stop -----------------------------------------------------------------

    def _image(self, arg: str) -> bool:
        if not arg:
            self._say("error: /image needs a path: /image PATH")
            return True
        path = os.path.expanduser(arg)
        try:
            chat = self.model.chat(path)  # loads and preprocesses now: a bad image keeps the old conversation
        except USER_ERRORS as error:
            self._say(f"error: {_one_line(error)}")
            return True
        self._switch(chat, path)
        self._say(f"(new conversation about {path})")
        return True

    def _text(self, arg: str) -> bool:
        self._switch(self.model.chat(None), None)
        self._say("(new text-only conversation)")
        return True

    def _reset(self, arg: str) -> bool:
        self.chat.reset()
        self._say("(conversation reset)")
        return True

    def _help(self, arg: str) -> bool:
        self._say(HELP)
        return True

    def _quit(self, arg: str) -> bool:
        return False

    def _switch(self, chat: "Chat", image: str | None) -> None:
        self.chat.close()
        self.chat, self.image = chat, image

    def _say(self, text: str) -> None:
        print(text, file=self.err, flush=True)
