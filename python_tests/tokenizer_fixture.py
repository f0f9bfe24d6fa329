"""Test helper: a small GPT-2/CodeGen-style byte-level BPE tokenizer written to a folder in either file format.

Layout mirrors Phi-2's: `<|endoftext|>` is the last id of the BPE vocabulary (special), followed by a few added
whitespace-run tokens (CodeGen's added_tokens.json, not special).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken

from phi_fast.tokenizer import EOS_TOKEN, train_tokenizer

SPACE_RUNS = ("    ", "\t\t")  # added (non-special) tokens after EOS, like CodeGen's

TRAINING_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is the cat doing? ASSISTANT: The cat is sleeping on a sofa next to a window.",
    "USER: Describe the image. ASSISTANT: A red bus drives down a busy street in the city at night.",
    "There are two dogs, three birds and one horse in the field. It isn't raining; we're outside.",
    "Le café est très bon. Un chat noir dort près de la fenêtre. 猫が好きです。",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 1, 2, 3, 10, 42, 2024. Questions? Answers! Yes, no, maybe.",
]


def write_tokenizer(folder: str | Path, fmt: str = "json", vocab_size: int = 400,
                    clean_up_tokenization_spaces: bool | None = None) -> Path:
    """Train the tokenizer and write it to `folder`; returns the folder.

    fmt "json": tokenizer.json. fmt "files": vocab.json (EOS included) + merges.txt + added_tokens.json +
    special_tokens_map.json. A tokenizer_config.json is written when `clean_up_tokenization_spaces` is given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(TRAINING_TEXT, vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    tok.add_tokens([AddedToken(run, normalized=True) for run in SPACE_RUNS])
    if fmt == "json":
        tok.save(str(folder / "tokenizer.json"))
    elif fmt == "files":
        tok.model.save(str(folder))  # vocab.json + merges.txt of the BPE model (without the added tokens)
        vocab_path = folder / "vocab.json"
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        vocab[EOS_TOKEN] = eos_id
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        added = {run: tok.token_to_id(run) for run in SPACE_RUNS}
        (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
        special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
        (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    else:
        raise ValueError(f"unknown tokenizer format {fmt!r} (expected 'json' or 'files')")
    if clean_up_tokenization_spaces is not None:
        config = {"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, "eos_token": EOS_TOKEN,
                  "bos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                  "clean_up_tokenization_spaces": clean_up_tokenization_spaces}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
