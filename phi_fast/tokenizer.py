"""Phi-2's tokenizer: CodeGen/GPT-2 byte-level BPE on top of the `tokenizers` library.

A checkpoint folder holds either `tokenizer.json`, or the slow-tokenizer files `vocab.json` + `merges.txt`
(+ `added_tokens.json`, `special_tokens_map.json`, `tokenizer_config.json`). Both give the same ids.
No BOS is ever added (spec section 6); `<|endoftext|>` is EOS.

`clean_up_tokenization_spaces` (read from tokenizer_config.json, off when absent) reproduces the space clean-up
transformers 4.36 applied when decoding (" ." -> ".", " n't" -> "n't", ...); the streaming decoder honours it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"

# transformers' clean_up_tokenization, applied in this order to the whole text.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Where text can be split so that clean(a + b) == clean(a) + clean(b): the clean-up only deletes spaces, so a
# boundary no pattern can span in the raw text stays unspanned through every pass. That holds after a character
# no pattern contains, and between two non-spaces that are not consecutive inside a pattern (such as "'s").
_CLEANUP_CHARS = frozenset("".join(old for old, _ in _CLEANUPS))
_CLEANUP_PAIRS = frozenset(old[i:i + 2] for old, _ in _CLEANUPS for i in range(len(old) - 1) if " " not in old[i:i + 2])


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English contractions."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read tokenizer file {path}: {err}") from err


def _token_content(value: object) -> str | None:
    """A special token entry is either a string or a dict with "content" (special_tokens_map.json style)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(folder: Path) -> set[str]:
    """Special-token strings named by special_tokens_map.json and tokenizer_config.json, plus EOS."""
    names = {EOS_TOKEN}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / filename
        if not path.is_file():
            continue
        data = _read_json(path)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(data.get(key))
            if content is not None:
                names.add(content)
        for value in data.get("additional_special_tokens") or []:
            content = _token_content(value)
            if content is not None:
                names.add(content)
        for entry in (data.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and entry.get("special") and isinstance(entry.get("content"), str):
                names.add(entry["content"])
    return names


def _register_special_tokens(tok: tokenizers.Tokenizer, names: Iterable[str]) -> None:
    """Mark tokens already in the vocabulary as special (matched whole in text, skipped when decoding)."""
    present = [name for name in sorted(names) if tok.token_to_id(name) is not None]
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in present])


def _byte_level_bpe(folder: Path) -> tokenizers.Tokenizer:
    """Build the GPT-2/CodeGen tokenizer from vocab.json + merges.txt (+ added_tokens.json)."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as err:  # the Rust side raises a plain Exception for unreadable vocab or merges
        raise ValueError(f"cannot read tokenizer files {vocab} and {merges}: {err}") from err
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    special = _special_tokens(folder)
    added_path = folder / "added_tokens.json"
    added = _read_json(added_path) if added_path.is_file() else {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        for key, entry in (_read_json(config_path).get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                added.setdefault(entry["content"], int(key))
    # Ids are assigned in order, so add by increasing id and check each lands where the files say.
    bpe_size = tok.get_vocab_size(with_added_tokens=False)
    for content, token_id in sorted(added.items(), key=lambda item: item[1]):
        token = AddedToken(content, special=content in special, normalized=content not in special)
        if content in special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(content)
        if got != token_id:
            raise ValueError(f"added token {content!r} in {folder} has id {token_id} but gets id {got}: added ids "
                             f"must follow the {bpe_size} ids of vocab.json without gaps")
    _register_special_tokens(tok, special)
    return tok


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme): the printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the code points 256, 257, ... in byte order. Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(extra)})
    return table


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """Byte-level BPE tokenizer of a checkpoint folder: encode without BOS, decode, EOS id, streaming decode."""

    def __init__(self, tok: tokenizers.Tokenizer, clean_up_tokenization_spaces: bool = False):
        self._tok = tok
        self._tok.no_truncation()
        self._tok.no_padding()
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, or else vocab.json + merges.txt (+ added/special token files), from `path`."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a directory")
        json_path = folder / "tokenizer.json"
        if json_path.is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(json_path))
            except Exception as err:  # the Rust side raises a plain Exception for malformed files
                raise ValueError(f"cannot read tokenizer file {json_path}: {err}") from err
            _register_special_tokens(tok, _special_tokens(folder))
        else:
            missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + "
                                        f"merges.txt (missing: {', '.join(missing)})")
            tok = _byte_level_bpe(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        logger.debug("loaded tokenizer from %s (%d tokens)", folder, tok.get_vocab_size())
        return cls(tok, bool(config.get("clean_up_tokenization_spaces", False)))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        """Id of `<|endoftext|>` (EOS and pad)."""
        token_id = self._tok.token_to_id(EOS_TOKEN)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN} token, so it has no end-of-sequence id")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added. Special tokens written in the text map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of `ids`. Clean-up defaults to the folder's tokenizer_config.json setting."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character; logprobs report these);
        b"" for an id the model's vocabulary has but the tokenizer does not (its padding rows)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # an added token (e.g. a whitespace run) is stored as plain text
            return piece.encode("utf-8")

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A StreamDecoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces; pieces hold only complete characters.

    `"".join(pieces from push) + finish() == tokenizer.decode(all ids)` (with the same special-token and clean-up
    settings). A token that ends inside a multi-byte UTF-8 character is held back until the character completes;
    with clean-up on, the few characters a later " ." or " 's" could still change are held back too.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._clean_up = tokenizer.clean_up_tokenization_spaces
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self._read_offset = 0
        self._pending = ""  # raw text taken but held back for clean-up

    def _raw(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, self._skip_special_tokens, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one id; return the new complete text ("" when nothing can be released yet)."""
        self._ids.append(token_id)
        prefix = self._raw(self._ids[self._prefix_offset:self._read_offset])
        text = self._raw(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new, or the last token stops inside a UTF-8 character
        self._pending += text[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Release everything held back (call once, after the last id)."""
        tail = self._raw(self._ids[self._prefix_offset:])
        prefix = self._raw(self._ids[self._prefix_offset:self._read_offset])
        self._pending += tail[len(prefix):]
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._clean_up:
            out, self._pending = self._pending, ""
            return out
        cut = len(self._pending) if final else _last_clean_up_boundary(self._pending)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return clean_up_tokenization(out)


def _last_clean_up_boundary(text: str) -> int:
    """Largest p such that clean-up of text[:p] cannot change whatever follows it (0 if none)."""
    for p in range(len(text), 0, -1):
        before = text[p - 1]
        if before not in _CLEANUP_CHARS:
            return p
        if p < len(text) and before != " " and text[p] != " " and text[p - 1:p + 1] not in _CLEANUP_PAIRS:
            return p
    return 0


# Built-in English text for demo tokenizers: the prompt template and everyday image descriptions.
_DEMO_TEXT = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. USER: What is in the image? ASSISTANT: The image shows a cat.
USER: What color is the cat? ASSISTANT: The cat is orange with white paws, and it is sitting on a wooden table.
USER: Describe the picture in detail. ASSISTANT: A small dog runs across a green field under a blue sky. There
are two trees on the left side of the photo, and a red car is parked near a house in the background.
USER: How many people are there? ASSISTANT: There are three people: a man, a woman and a child. They are
standing in front of a building and smiling at the camera. USER: Is it day or night? ASSISTANT: It is day.
The sun is shining and the street is busy with bicycles, buses and people walking to work.
USER: What is written on the sign? ASSISTANT: The sign says "Stop". It is a red octagon at a corner.
USER: Why is the boy holding an umbrella? ASSISTANT: Because it is raining, and he doesn't want to get wet.
The kitchen has a white fridge, a stove, a sink, some plates, cups, a bowl of fruit with apples and bananas.
A plane flies over the mountains; snow covers the peaks. A boat sails on the lake near the beach at sunset.
Yes. No. Maybe. I'm not sure. It's a photo of a bird. They're playing football. We've seen this before.
"""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a GPT-2-style byte-level BPE on `texts`: at most `vocab_size` ids, `<|endoftext|>` the last one.

    The pre-tokenizer and decoder are the ones `Tokenizer.from_dir` builds from vocab.json + merges.txt, so
    the result saved either way loads back the same.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size {vocab_size} too small: a byte-level BPE needs 256 byte tokens + EOS")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def write_demo_tokenizer(folder: Path, vocab_size: int = 1000) -> None:
    """Write tokenizer.json + tokenizer_config.json for a demo checkpoint: at most `vocab_size` ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_DEMO_TEXT.splitlines(), vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "CodeGenTokenizer", "add_prefix_space": False, "bos_token": EOS_TOKEN,
              "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
