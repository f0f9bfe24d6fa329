"""The command line: `phi_fast generate ...`, `phi_fast serve ...` and `phi_fast demo` (the same as
`python -m phi_fast ...`).

Every subcommand takes the model-loading options from `add_load_options` (one definition, reused by each
subcommand) and the sampling options from `add_sampling_options`. A user's mistake (a bad argument, model folder,
image or prompt, a malformed command line) ends in one line on stderr and exit status 1; a reader
that closes stdout early (`| head`) ends the run quietly with status 141, like any Unix filter killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

from . import _ext

if TYPE_CHECKING:
    from .api import Model
    from .image import ImageInput
    from .sampling import SamplingParams

log = logging.getLogger(__name__)

# What the library raises for a user's mistake (ConfigError, CheckpointError, CacheFullError and bad images or
# prompts are among these), or for an environment it cannot run in (a missing build, too little memory).
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError, MemoryError)
PROMPT_FILE_LIMIT = 1 << 20  # bytes; the context holds 2048 tokens, so a larger prompt file is a mistake
EXIT_USER_ERROR = 1
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE, as a shell reports a filter killed by it
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "int4")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the CLI on `argv` (default sys.argv[1:]); returns the exit status. `prog` names the command in usage
    lines (default: the name it was started as, e.g. `phi_fast` for the console script)."""
    parser = build_parser(prog or Path(sys.argv[0]).name or "phi_fast")
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _ext.extension()  # every command runs the kernels: a missing or stale build fails before anything is done
        return args.run(args)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 128 + 2
    except USER_ERRORS as error:
        log.info("details", exc_info=True)
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of every subcommand; `-v/--verbose` is accepted before and after the subcommand."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO level (with tracebacks of reported errors)")
    parser = Parser(prog=prog, parents=[common], formatter_class=HelpFormatter,
                    description="LLaVA-Phi inference: answer questions about images.")
    parser.add_argument("--version", action="version", version=f"phi_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("generate", parents=[common], formatter_class=HelpFormatter,
                         help="answer a question about an image (or a text-only question) with a checkpoint",
                         description="Answer a question about an image, or a text-only question, with the "
                                     "checkpoint in --model.")
    add_load_options(gen)
    question = gen.add_argument_group("question")
    question.add_argument("--image", metavar="PATH", help="image file (omit for a text-only question)")
    prompt = question.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the question; '-' reads it from standard input")
    prompt.add_argument("--prompt-file", type=Path, metavar="PATH", help="read the question from this file (UTF-8)")
    add_sampling_options(gen)
    gen.set_defaults(run=run_generate)

    from .chat_cli import add_chat_parser
    from .demo import add_demo_parser

    add_chat_parser(sub, parents=[common], formatter_class=HelpFormatter)
    add_demo_parser(sub, parents=[common], formatter_class=HelpFormatter)

    from .serve import add_serve_parser

    add_serve_parser(sub, parents=[common], formatter_class=HelpFormatter)
    return parser


class Parser(argparse.ArgumentParser):
    """argparse, except that a malformed command line is one line and exit status 1 like every other user error
    (argparse prints its usage block and exits 2); subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show (None, False, a suppressed default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        nothing = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "%(default)" in text or nothing or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_load_options(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    """The options that pick and load a model, shared by every subcommand (demo writes its own: model=False)."""
    group = parser.add_argument_group("model")
    if model:
        env_model = os.environ.get("PHI_FAST_MODEL")
        group.add_argument("--model", required=not env_model, type=Path, default=env_model, metavar="FOLDER",
                           help="checkpoint folder (config.json, *.safetensors, tokenizer); $PHI_FAST_MODEL "
                                "when not given")
    group.add_argument("--device", default="cpu", type=_device, metavar="{cpu,cuda,cuda:N}", help="where to run")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                       help="pack the language model's linear weights at load time (int8 per channel, int4 in groups)")
    group.add_argument("--token-budget", type=_int_at_least(1), default=None, metavar="N",
                       help="tokens one engine step computes at most: running answers first, then chunks of new "
                            "prompts (default: 512 on cpu, 4096 on cuda)")


def load_model(args: argparse.Namespace, folder: Path | None = None, **engine: object) -> "Model":
    """Loads the model the load options name (or `folder`), after checking the folder is one; `engine`: more
    Model.load settings (max_num_seqs, cache_memory)."""
    from .api import load

    folder = folder if folder is not None else args.model
    if folder.is_file():
        hint = (f"; give the folder that holds it: --model {folder.parent}" if folder.name == "config.json"
                else "")
        raise ValueError(f"--model {folder}: is a file, not a checkpoint folder{hint}")
    if not folder.exists():
        raise ValueError(f"--model {folder}: no such folder")
    return load(folder, args.device, args.dtype, progress=sys.stderr.isatty(), quantize=args.quantize,
                token_budget=args.token_budget, **engine)


def add_sampling_options(parser: argparse.ArgumentParser, *, output: bool = True) -> None:
    """How tokens are picked and when the answer stops, and (output=True) how it is printed."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=_int_at_least(1), default=128, metavar="N",
                       help="stop after this many tokens")
    group.add_argument("--temperature", type=_finite_float(0.0), default=0.0, metavar="T",
                       help="0 picks the most likely token (greedy, deterministic)")
    group.add_argument("--top-p", type=_probability, default=1.0, metavar="P",
                       help="sample from the smallest set of tokens whose probability reaches P")
    group.add_argument("--top-k", type=_int_at_least(0), default=0, metavar="K",
                       help="sample from the K most likely tokens (0: all)")
    group.add_argument("--seed", type=_int_at_least(0), default=None, metavar="S",
                       help="makes sampling reproducible (default: random)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="end the answer before TEXT; repeat for several (a newline in bash: $'\\n')")
    if not output:
        return
    how = parser.add_argument_group("output").add_mutually_exclusive_group()
    how.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    how.add_argument("--json", action="store_true",
                     help="print one JSON object: answer, finish_reason, prompt_tokens, completion_tokens, timings")


def sampling_params(args: argparse.Namespace) -> "SamplingParams":
    """The SamplingParams of the sampling options."""
    from .sampling import SamplingParams

    for text in args.stop:
        _check_utf8(text, "--stop")
        if not text:
            raise ValueError("--stop: a stop string must not be empty")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


@dataclass
class Answer:
    """One finished answer and what it took."""

    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int  # prompt positions, image rows included
    completion_tokens: int
    first_text_s: float  # from submitting to the first piece of text (image encode and prefill included)
    generate_s: float  # from submitting to the end

    def to_json(self, **extra) -> str:
        """The --json output: the answer, why it ended, token counts and timings."""
        decode = (self.completion_tokens - 1) / (self.generate_s - self.first_text_s) \
            if self.completion_tokens > 1 and self.generate_s > self.first_text_s else None
        return json.dumps({"answer": self.text, "finish_reason": self.finish_reason,
                           "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                           "timings": {**extra, "first_text_s": round(self.first_text_s, 4),
                                       "generate_s": round(self.generate_s, 4),
                                       "decode_tokens_per_s": None if decode is None else round(decode, 2)}},
                          ensure_ascii=False)


def answer(model: "Model", image: "ImageInput | None", prompt: str, params: "SamplingParams",
           on_piece: Callable[[str], None] | None = None) -> Answer:
    """Answers one prompt through the model's own streaming path, handing each new piece of text to `on_piece`.

    It goes through Model.submit rather than generate() because --json reports the request's finish reason and
    token counts, which generate() does not return.
    """
    from .prompt import IMAGE_PLACEHOLDER

    t0 = time.perf_counter()
    content = prompt if image is None or IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}\n{prompt}"
    handle = model.submit([{"role": "user", "content": content}], [] if image is None else [image], params)[0]
    req = handle.request
    pieces, first = [], None
    for piece in handle.stream(None):
        first = time.perf_counter() if first is None else first
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    end = time.perf_counter()
    return Answer("".join(pieces), req.finish_reason, len(req.keys), len(req.output_ids),
                  (first or end) - t0, end - t0)


def run_generate(args: argparse.Namespace) -> int:
    """`generate`: load the model, answer, print (streamed, whole, or as JSON)."""
    prompt = read_prompt(args)
    params = sampling_params(args)
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"--image {args.image}: " + ("is a folder" if Path(args.image).is_dir() else "no such file"))
    t0 = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - t0
    result = answer(model, args.image, prompt, params, on_piece=_print_piece if args.stream else None)
    if args.json:
        print(result.to_json(load_s=round(load_s, 4)))
    elif args.stream:
        print(flush=True)
    else:
        print(result.text, flush=True)
    return 0


def read_prompt(args: argparse.Namespace) -> str:
    """The question from --prompt (or standard input for '-') or --prompt-file, checked to be UTF-8 text."""
    if args.prompt_file is not None:
        path = args.prompt_file
        if path.is_dir():
            raise ValueError(f"--prompt-file {path}: is a folder")
        with open(path, "rb") as f:  # OSError (no such file, permission) names the file
            data = f.read(PROMPT_FILE_LIMIT + 1)
        if len(data) > PROMPT_FILE_LIMIT:
            raise ValueError(f"--prompt-file {path}: larger than {PROMPT_FILE_LIMIT >> 20} MiB; the model's "
                             f"context holds 2048 tokens")
        text = _decode(data, f"--prompt-file {path}")
    elif args.prompt == "-":
        text = _decode(sys.stdin.buffer.read(PROMPT_FILE_LIMIT + 1), "the prompt on standard input")
        if len(text) > PROMPT_FILE_LIMIT:
            raise ValueError(f"the prompt on standard input is larger than {PROMPT_FILE_LIMIT >> 20} MiB")
    else:
        text = _check_utf8(args.prompt, "--prompt")
    text = text.strip()
    if not text:
        raise ValueError("the prompt is empty")
    return text


# --- argument types and helpers -------------------------------------------------------------------------------

def _device(text: str) -> str:
    if text == "cpu" or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from cpu, cuda, cuda:N)")


def _finite_float(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, got {text!r}")
        return value
    return parse


def _probability(text: str) -> float:
    value = _finite_float(0.0)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return value
    return parse


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def _check_utf8(text: str, what: str) -> str:
    """Arguments that are not valid UTF-8 reach Python with surrogate escapes; refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(text[:e.start].encode("utf-8", "surrogateescape"))
        byte = text[e.start].encode("utf-8", "surrogateescape")[0]
        raise ValueError(f"{what} is not UTF-8 text (byte {byte:#04x} at offset {offset})") from None
    return text


def _print_piece(piece: str) -> None:
    print(piece, end="", flush=True)


def _one_line(error: BaseException) -> str:
    """The error as one line: a file error as "PATH: reason", the library's own errors as their message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, RuntimeError, ImportError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
