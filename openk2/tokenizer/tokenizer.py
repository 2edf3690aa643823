"""The K2 tokenizer: a tiktoken BPE in Kimi K2's on-disk format.

Format (the same files moonshotai/Kimi-K2-Instruct ships):
  * `tiktoken.model`: one "base64(token bytes) rank" per line; ranks 0..n-1 are the base
    vocabulary (163,584 for K2, 7,936 for the `small` preset, 256 for the byte-level `tiny`).
  * 256 reserved special ids n..n+255 follow; the named ones sit at fixed offsets from n,
    the rest are `<|reserved_token_{id}|>`.
  * `tokenizer_config.json` (optional): HF-style `added_tokens_decoder` naming the specials,
    plus the chat template as Jinja.

The encoder IS a `tiktoken.Encoding` (Rust, fancy-regex) built from the file and K2's split
pattern, so ids match plain tiktoken exactly. Around it we only add chunking: BPE cost grows
quadratically with the length of one pre-token, so runs of more than MAX_RUN_CHARS
whitespace or non-whitespace characters are cut into pieces before encoding.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from collections.abc import Iterable
from pathlib import Path

import tiktoken

# K2's split pattern (tokenization_kimi.py): cl100k/o200k-style, but Han runs are their own
# pre-tokens and letters exclude Han via class intersection (`&&`, supported by fancy-regex and
# by the Oniguruma engine of the `tokenizers` library we train with).
K2_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

NUM_RESERVED_SPECIAL = 256
# Named specials at their offsets from the base vocabulary size (K2: 163584 + offset).
SPECIAL_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
}
# attribute name -> special token string
SPECIAL_ATTRS: dict[str, str] = {
    "bos_id": "[BOS]",
    "eos_id": "[EOS]",
    "im_end_id": "<|im_end|>",
    "im_user_id": "<|im_user|>",
    "im_assistant_id": "<|im_assistant|>",
    "im_system_id": "<|im_system|>",
    "im_middle_id": "<|im_middle|>",
    "tool_calls_section_begin_id": "<|tool_calls_section_begin|>",
    "tool_calls_section_end_id": "<|tool_calls_section_end|>",
    "tool_call_begin_id": "<|tool_call_begin|>",
    "tool_call_argument_begin_id": "<|tool_call_argument_begin|>",
    "tool_call_end_id": "<|tool_call_end|>",
}

MODEL_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"  # the same BPE for transformers / vLLM (`tokenizers` format)
TEMPLATE_FILE = "chat_template.jinja"  # a checkpoint's own chat template; wins over the config's
MAX_RUN_CHARS = 4096  # longest whitespace / non-whitespace run handed to BPE in one piece
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


def default_special_names(n_base: int) -> dict[int, str]:
    """id -> name for the 256 reserved ids after a base vocabulary of n_base tokens."""
    names = {n_base + i: f"<|reserved_token_{n_base + i}|>" for i in range(NUM_RESERVED_SPECIAL)}
    for name, offset in SPECIAL_OFFSETS.items():
        names[n_base + offset] = name
    return names


def load_tiktoken_model(path: str | Path) -> dict[bytes, int]:
    """Parse a `tiktoken.model` file; ranks must be exactly 0..n-1 with no duplicate token."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model file not found: {path}")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad token or rank ({e})") from None
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (each once)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: single bytes {missing[:8]}... are missing, so some text cannot encode")
    return ranks


def save_tiktoken_model(ranks: dict[bytes, int], path: str | Path) -> None:
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n")


def _may_have_long_run(text: str) -> bool:
    """Cheap pre-check: a run longer than MAX_RUN_CHARS covers a whole aligned block of half
    that size, and on ordinary text each block is ruled out after its first word."""
    b = MAX_RUN_CHARS // 2
    for i in range(0, len(text) - b + 1, b):
        block = text[i : i + b]
        if block.isspace():
            return True
        if not block[0].isspace() and not block[-1].isspace() and len(block.split(None, 1)) == 1:
            return True
    return False


def _long_run_cuts(text: str) -> list[int]:
    """Positions at which to cut so that no whitespace/non-whitespace run exceeds MAX_RUN_CHARS.

    Cuts fall inside long runs only (never at a run's start), so text without such runs is
    encoded exactly as plain tiktoken would encode it.
    """
    if not _may_have_long_run(text):
        return []
    cuts = []
    for m in _LONG_RUN.finditer(text):
        cuts.extend(range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS))
    return cuts


# Runs anchored at their first character, so the scan stays linear on pathological input.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")


class K2Tokenizer:
    """Byte-level BPE with K2's pattern and special-token layout, backed by tiktoken."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: dict[int, str] | None = None,
        pattern: str = K2_PATTERN,
        chat_template: str | None = None,
        name: str = "k2",
    ):
        self.n_base = len(mergeable_ranks)
        self.vocab_size = self.n_base + NUM_RESERVED_SPECIAL
        names = default_special_names(self.n_base)
        for i, s in (special_names or {}).items():
            if not self.n_base <= i < self.vocab_size:
                raise ValueError(f"special {s!r} has id {i}, outside {self.n_base}..{self.vocab_size - 1}")
            names[i] = s
        self.special_ids: dict[str, int] = {s: i for i, s in names.items()}
        if len(self.special_ids) != NUM_RESERVED_SPECIAL:
            raise ValueError("special token names must be distinct")
        for attr, s in SPECIAL_ATTRS.items():
            if s not in self.special_ids:
                raise ValueError(f"tokenizer config lacks the special token {s}")
            setattr(self, attr, self.special_ids[s])
        self.pattern = pattern
        self.chat_template = chat_template
        self.mergeable_ranks = mergeable_ranks
        self.enc = tiktoken.Encoding(
            name=name,
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_ids,
            explicit_n_vocab=self.vocab_size,
        )
        # Longest names first so that a name that prefixes another cannot shadow it.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives)))

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> K2Tokenizer:
        """Load `tiktoken.model` (+ `tokenizer_config.json` when present) from a directory."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        ranks = load_tiktoken_model(directory / MODEL_FILE)
        names, template, pattern = None, None, K2_PATTERN
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: invalid JSON ({e})") from None
            names = {int(i): v["content"] for i, v in config.get("added_tokens_decoder", {}).items()}
            template = config.get("chat_template")
            pattern = config.get("pat_str", K2_PATTERN)
        if (directory / TEMPLATE_FILE).is_file():
            template = (directory / TEMPLATE_FILE).read_text()
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: chat_template must be one Jinja string")
        return cls(ranks, names, pattern=pattern, chat_template=template, name=directory.name or "k2")

    @classmethod
    def default(cls) -> K2Tokenizer:
        """The shipped tokenizer of the `small` preset: 7,936 BPE tokens + 256 specials."""
        if not (ASSETS_DIR / MODEL_FILE).is_file():
            raise FileNotFoundError(
                f"the default tokenizer is missing from {ASSETS_DIR}; recreate it with "
                "`python -m openk2.tokenizer.train --default`"
            )
        return cls.from_pretrained(ASSETS_DIR)

    @classmethod
    def byte_level(cls) -> K2Tokenizer:
        """The `tiny` preset's tokenizer: one token per byte (ids 0..255) + 256 specials."""
        from openk2.tokenizer.chat import JINJA_TEMPLATE

        return cls({bytes([b]): b for b in range(256)}, chat_template=JINJA_TEMPLATE, name="k2-bytes")

    @classmethod
    def load(cls, name: str | Path) -> K2Tokenizer:
        """By name, as the command lines and configs give it: 'default' (the `small` preset's),
        'byte-level' (also spelled 'byte' or 'bytes': the `tiny` preset's), or a directory."""
        if name == "default":
            return cls.default()
        if name in ("byte-level", "byte", "bytes"):
            return cls.byte_level()
        return cls.from_pretrained(name)

    def save_pretrained(
        self, directory: str | Path, model_max_length: int = 131072, hf_tokenizer: bool = False
    ) -> Path:
        """Write `tiktoken.model` and `tokenizer_config.json` (with the Jinja chat template).

        `model_max_length` should be the model's max positions (K2's 131072 by default). With
        hf_tokenizer=True also write `tokenizer.json` (see `hf_tokenizer_json`) and name
        transformers' fast tokenizer as the class, so `AutoTokenizer` gives our exact ids
        without remote code."""
        from openk2.tokenizer.chat import JINJA_TEMPLATE

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tiktoken_model(self.mergeable_ranks, directory / MODEL_FILE)
        if hf_tokenizer:
            text = json.dumps(hf_tokenizer_json(self), ensure_ascii=False)
            (directory / HF_TOKENIZER_FILE).write_text(text)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast" if hf_tokenizer else "TikTokenTokenizer",
            "vocab_size": self.vocab_size,
            "num_base_tokens": self.n_base,
            "bos_token": "[BOS]",
            "eos_token": "[EOS]",
            "pat_str": self.pattern,
            "model_max_length": int(model_max_length),
            "added_tokens_decoder": {
                str(i): {"content": s, "special": True}
                for s, i in sorted(self.special_ids.items(), key=lambda kv: kv[1])
            },
            "chat_template": self.chat_template or JINJA_TEMPLATE,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        chat_template: str | None = None,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        **kwargs,
    ) -> str | list[int] | dict:
        """The conversation as a prompt, with transformers' arguments and meaning.

        The template is `chat_template` if given, else this tokenizer's own (a directory's
        `chat_template.jinja` or tokenizer_config.json `chat_template`), else the built-in K2
        template (`openk2.tokenizer.chat`, which renders as Kimi-K2-Instruct-0905's). A template
        equal to one of our built-in Jinja texts is rendered by the built-in code; any other is
        rendered as Jinja in transformers' environment, extra keyword arguments becoming template
        variables. tokenize=False gives the text; tokenize=True the ids (built-in: user text
        never turns into special ids; Jinja: special-token strings in the text are parsed, as
        transformers does). Unlike transformers 5, ids come back as a plain list unless
        return_dict=True ({"input_ids", "attention_mask"[, "assistant_masks"]}); the assistant
        mask needs the built-in template.
        """
        from openk2.tokenizer.chat import JINJA_TEMPLATES, encode_chat, render, render_jinja

        template = chat_template if chat_template is not None else self.chat_template
        variant = next((v for v, t in JINJA_TEMPLATES.items() if template in (None, t)), None)
        if variant is None and return_assistant_tokens_mask:
            raise ValueError("return_assistant_tokens_mask needs the built-in chat template")
        if not tokenize:
            if variant is None:
                return render_jinja(template, messages, tools, add_generation_prompt, **kwargs)
            return render(messages, tools, add_generation_prompt, variant=variant)
        if variant is None:
            text = render_jinja(template, messages, tools, add_generation_prompt, **kwargs)
            ids, mask = self.encode(text, allow_special=True), None
        else:
            enc = encode_chat(self, messages, tools, add_generation_prompt, variant=variant)
            ids, mask = enc.ids, enc.assistant_mask
        if not return_dict:
            return ids
        out: dict = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if return_assistant_tokens_mask:
            out["assistant_masks"] = [int(m) for m in mask]
        return out

    # ---- encode / decode ----------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        if len(text) <= MAX_RUN_CHARS:
            return self.enc.encode_ordinary(text)
        cuts = _long_run_cuts(text)
        if not cuts:
            return self.enc.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for cut in [*cuts, len(text)]:
            ids.extend(self.enc.encode_ordinary(text[start:cut]))
            start = cut
        return ids

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` stay plain text unless allow_special."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if not allow_special:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids.extend(self._encode_ordinary(text[start : m.start()]))
            ids.append(self.special_ids[m.group()])
            start = m.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> raw bytes (special tokens as their names)."""
        return self.enc.decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(self._check_ids([token_id])[0])

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_base

    @property
    def tool_call_marker_ids(self) -> list[int]:
        """The five tool-call markers: the only special tokens a reply's text keeps when tools are
        offered (the tool-call parser reads them; any other special token is dropped)."""
        return [
            self.tool_calls_section_begin_id,
            self.tool_calls_section_end_id,
            self.tool_call_begin_id,
            self.tool_call_argument_begin_id,
            self.tool_call_end_id,
        ]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"K2Tokenizer(n_base={self.n_base}, vocab_size={self.vocab_size}, bos={self.bos_id})"


def hf_tokenizer_json(tok: K2Tokenizer) -> dict:
    """The tokenizer as a `tokenizers` (Hugging Face fast tokenizer) definition with identical ids.

    Pre-tokenization is K2's split pattern followed by the byte-to-character map of ByteLevel;
    the model is BPE over the same vocabulary, with one merge (a, b) for every token that is the
    concatenation of two tokens, ordered by the rank of the result. tiktoken merges, at each
    step, the adjacent pair whose concatenation has the lowest rank, and BPE the pair listed
    first, so both build the same tokens (`ignore_merges` mirrors tiktoken's shortcut for a
    pre-token that is itself a token). The 256 specials are added tokens. Text with a
    whitespace or non-whitespace run longer than MAX_RUN_CHARS is the one difference: the fast
    tokenizer does not cut such runs (tests check parity on ordinary text and code).
    """
    from openk2.tokenizer.train import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def chars(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    ranks = tok.mergeable_ranks
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, chars(token[:cut]), chars(token[cut:])))
    merges.sort()
    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
        for name, i in sorted(tok.special_ids.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {chars(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[a, b] for *_, a, b in merges],
        },
    }


class IncrementalDecoder:
    """Streaming detokenizer: push ids one at a time, get the text that is now complete.

    A token may end in the middle of a UTF-8 character (bytes of one emoji can span several
    tokens); the tail is held back until the character completes, and invalid bytes come out
    as U+FFFD. Special tokens come out as their names unless skip_special.
    """

    def __init__(self, tokenizer: K2Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: whatever incomplete character remains becomes U+FFFD."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
