"""The command line: `generate` answers like the API, every option does what --help says, and a user's mistake
ends in one line and exit status 1 (malformed command lines too), never a traceback; `demo` runs the whole pipeline
and never writes into a folder it did not create."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import phi_fast
from phi_fast import cli, demo
from phi_fast.prompt import build_prompt, tokenize_prompt

from checkpoints import make_tiny_checkpoints
from package_under_test import child_env, run_python
from tokenizer_fixture import write_tokenizer

QUESTION = "What is it?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("cli"), variants=("llava_phi",))
    write_tokenizer(tiny.paths["llava_phi"])
    return tiny.paths["llava_phi"]


@pytest.fixture(scope="module")
def model(ckpt):
    return phi_fast.load(ckpt, progress=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
    return path


def _cli(*args: str | bytes, **kwargs) -> subprocess.CompletedProcess:
    """`python -m phi_fast ARGS` in a child process."""
    return run_python(["-m", "phi_fast", *args], **kwargs)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """cli.main(ARGS) in this process: (exit status, stdout, stderr); argparse's exits give their status too."""
    try:
        code = cli.main(list(args), prog="phi_fast")
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == cli.EXIT_USER_ERROR, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "phi_fast" in lines[0].partition(": error: ")[0], err
    for needle in needles:
        assert needle in lines[-1], err


# --- generate ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_generate_prints_the_api_answer(ckpt, model, image, stream):
    expected = model.generate(str(image), QUESTION, max_new_tokens=12)
    out = _cli("generate", "--model", str(ckpt), "--image", str(image), "--prompt", QUESTION,
               "--max-new-tokens", "12", *(["--stream"] if stream else []))
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_prompt_from_stdin_and_from_a_file_equal_the_argument(ckpt, model, image, tmp_path, capsys, monkeypatch):
    expected = model.generate(str(image), QUESTION, max_new_tokens=6)
    common = ["generate", "--model", str(ckpt), "--image", str(image), "--max-new-tokens", "6"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{QUESTION}\n".encode())))
    assert _main(capsys, *common, "--prompt", "-") == (0, expected + "\n", "")
    (tmp_path / "q.txt").write_text(f"{QUESTION}\n", encoding="utf-8")
    assert _main(capsys, *common, "--prompt-file", str(tmp_path / "q.txt")) == (0, expected + "\n", "")


def test_json_reports_answer_finish_reason_token_counts_and_timings(ckpt, model, capsys):
    code, out, err = _main(capsys, "generate", "--model", str(ckpt), "--prompt", QUESTION,
                           "--max-new-tokens", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["answer"] == model.generate(None, QUESTION, max_new_tokens=5)
    prompt_ids = tokenize_prompt(model.tokenizer, build_prompt([(QUESTION, None)], with_image=False))
    assert result["prompt_tokens"] == len(prompt_ids)
    assert result["finish_reason"] in ("eos", "length")
    if result["finish_reason"] == "length":
        assert result["completion_tokens"] == 5
    else:
        assert 0 <= result["completion_tokens"] < 5
    timings = result["timings"]
    assert set(timings) >= {"load_s", "first_text_s", "generate_s", "decode_tokens_per_s"}
    assert 0 <= timings["first_text_s"] <= timings["generate_s"]


def test_stop_ends_the_answer_like_the_api(ckpt, model, capsys):
    full = model.generate(None, QUESTION, max_new_tokens=24)
    assert len(full) >= 6, "the tiny model's answer is too short to pick a stop string from"
    stop = full[3:5]
    expected = model.generate(None, QUESTION, max_new_tokens=24, stop=[stop])
    assert expected == full[:full.index(stop)].strip()
    code, out, err = _main(capsys, "generate", "--model", str(ckpt), "--prompt", QUESTION,
                           "--max-new-tokens", "24", "--stop", "never seen", "--stop", stop, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["answer"], result["finish_reason"]) == (expected, "stop")


def test_model_from_the_environment(ckpt, model, capsys, monkeypatch):
    monkeypatch.delenv("PHI_FAST_MODEL", raising=False)
    code, _, err = _main(capsys, "generate", "--prompt", QUESTION)
    _assert_one_line_error(code, err, "--model")
    monkeypatch.setenv("PHI_FAST_MODEL", str(ckpt))
    expected = model.generate(None, QUESTION, max_new_tokens=4)
    assert _main(capsys, "generate", "--prompt", QUESTION, "--max-new-tokens", "4") == (0, expected + "\n", "")


def test_verbose_is_accepted_before_and_after_the_subcommand():
    parser = cli.build_parser("phi_fast")
    base = ["generate", "--model", "m", "--prompt", "p"]
    assert parser.parse_args(["-v", *base]).verbose
    assert parser.parse_args([*base, "--verbose"]).verbose
    assert not getattr(parser.parse_args(base), "verbose", False)


# --- help, version, usage line ----------------------------------------------------------------------------

def test_help_shows_defaults_and_choices(capsys):
    code, out, _ = _main(capsys, "generate", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("--max-new-tokens N stop after this many tokens (default: 128)", "(default: cpu)",
                 "--dtype {float32,bfloat16,float16}", "--device {cpu,cuda,cuda:N}", "--temperature T",
                 "(default: 0.0)", "--top-p P", "(default: 1.0)", "--stop TEXT", "--json", "--prompt-file PATH"):
        assert text in flat
    code, out, _ = _main(capsys, "--help")
    assert code == 0 and "generate" in out and "demo" in out and "--version" in out


def test_version(capsys):
    code, out, _ = _main(capsys, "--version")
    assert (code, out) == (0, f"phi_fast {phi_fast.__version__}\n")


def test_usage_line_names_the_command_it_was_started_as(monkeypatch, capsys):
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert tomllib.loads(pyproject.read_text())["project"]["scripts"]["phi_fast"] == "phi_fast.cli:main"
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/phi_fast", "--help"])
    with pytest.raises(SystemExit):
        cli.main()  # as the console script calls it
    assert capsys.readouterr().out.startswith("usage: phi_fast ")
    out = _cli("--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m phi_fast "), out.stderr


def test_token_budget_reaches_the_engine_and_changes_no_answer(ckpt, model, image):
    expected = model.generate(str(image), QUESTION, max_new_tokens=12)
    out = _cli("generate", "--model", str(ckpt), "--image", str(image), "--prompt", QUESTION,
               "--max-new-tokens", "12", "--token-budget", "5", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["answer"] == expected
    args = cli.build_parser("phi_fast").parse_args(["generate", "--model", str(ckpt), "--prompt", "p", "--token-budget", "5"])
    loaded = cli.load_model(args)
    assert loaded.engine.token_budget == 5
    loaded.close()


# --- mistakes: one line, no traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"), ("--top-p", "0"),
    ("--top-p", "1.5"), ("--top-p", "nan"), ("--max-new-tokens", "0"), ("--max-new-tokens", "2.5"),
    ("--top-k", "-1"), ("--seed", "-3"), ("--device", "tpu"), ("--device", "cuda:x"), ("--dtype", "int8"),
    ("--token-budget", "0"), ("--token-budget", "many"),
])
def test_bad_option_values_are_usage_errors(capsys, option, value):
    code, _, err = _main(capsys, "generate", "--model", "m", "--prompt", "p", option, value)
    _assert_one_line_error(code, err, f"argument {option}", repr(value))


def test_stream_and_json_exclude_each_other(capsys):
    code, _, err = _main(capsys, "generate", "--model", "m", "--prompt", "p", "--stream", "--json")
    _assert_one_line_error(code, err, "not allowed with")


def test_config_json_given_as_the_model_folder(ckpt, capsys):
    code, _, err = _main(capsys, "generate", "--model", str(ckpt / "config.json"), "--prompt", "hi")
    _assert_one_line_error(code, err, "is a file, not a checkpoint folder", f"--model {ckpt}")
    assert "config.json/config.json" not in err


def test_generate_reports_a_bad_model_folder(tmp_path, capsys):
    code, _, err = _main(capsys, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    _assert_one_line_error(code, err, "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    code, _, err = _main(capsys, "generate", "--model", str(tmp_path / "empty"), "--prompt", "hi")
    _assert_one_line_error(code, err, "config.json")


def test_bad_prompt_and_image_sources(ckpt, tmp_path, capsys, monkeypatch):
    base = ["generate", "--model", str(ckpt)]
    code, _, err = _main(capsys, *base, "--prompt-file", str(tmp_path / "missing.txt"))
    _assert_one_line_error(code, err, "missing.txt", "No such file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9?".encode("latin-1"))
    code, _, err = _main(capsys, *base, "--prompt-file", str(tmp_path / "latin1.txt"))
    _assert_one_line_error(code, err, "latin1.txt", "not UTF-8", "0xe9", "offset 3")
    code, _, err = _main(capsys, *base, "--prompt-file", str(tmp_path))
    _assert_one_line_error(code, err, "is a folder")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"  \n")))
    code, _, err = _main(capsys, *base, "--prompt", "-")
    _assert_one_line_error(code, err, "the prompt is empty")
    code, _, err = _main(capsys, *base, "--prompt", "hi", "--image", str(tmp_path / "cat.jpg"))
    _assert_one_line_error(code, err, "cat.jpg", "no such file")
    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    code, _, err = _main(capsys, *base, "--prompt", "hi", "--image", str(tmp_path / "not_an_image.png"))
    _assert_one_line_error(code, err, "not_an_image.png")


def test_prompt_that_is_not_utf8(ckpt):
    out = _cli("generate", "--model", str(ckpt), "--prompt", b"caf\xe9?")
    _assert_one_line_error(out.returncode, out.stderr, "--prompt is not UTF-8", "0xe9", "offset 3")


def test_prompt_longer_than_the_context(ckpt, capsys):
    code, _, err = _main(capsys, "generate", "--model", str(ckpt), "--prompt", "word " * 5000)
    _assert_one_line_error(code, err)


def test_closed_stdout_under_stream_ends_quietly(ckpt):
    child = subprocess.Popen([sys.executable, "-m", "phi_fast", "generate", "--model", str(ckpt), "--prompt",
                              QUESTION, "--max-new-tokens", "64", "--stream"], cwd=str(ckpt.parent),
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # nobody reads: the first write gets EPIPE
    try:
        _, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == cli.EXIT_BROKEN_PIPE, err.decode()
    assert err == b""


# --- demo -------------------------------------------------------------------------------------------------

def test_demo_runs_the_whole_pipeline():
    out = _cli("demo", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "answer:" in out.stdout and "first text" in out.stdout and " tokens, " in out.stdout


def test_demo_json_and_its_own_folder_twice(tmp_path, capsys):
    folder = tmp_path / "demo"
    for _ in range(2):  # the second run overwrites the folder the first one wrote
        code, out, err = _main(capsys, "demo", "--dir", str(folder), "--max-new-tokens", "4", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["finish_reason"] in ("eos", "length") and set(result["timings"]) >= {"write_s", "load_s"}
    assert (folder / demo.MARKER).is_file() and (folder / "config.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(ckpt, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    code, _, err = _main(capsys, "demo", "--dir", str(ckpt))
    _assert_one_line_error(code, err, str(ckpt), "not empty", demo.MARKER)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = _main(capsys, "demo", "--dir", str(tmp_path / "notes.txt"))
    _assert_one_line_error(code, err, "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_errors_are_one_line(capsys):
    code, _, err = _main(capsys, "demo", "--stop", "")
    _assert_one_line_error(code, err, "--stop", "empty")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: --device cuda is no mistake here")
    code, _, err = _main(capsys, "demo", "--device", "cuda", "--max-new-tokens", "2")
    _assert_one_line_error(code, err, "cuda")
