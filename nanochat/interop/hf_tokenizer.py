"""Our tokenizer as a Hugging Face ``tokenizer.json`` and back, plus nanochat's chat template in Jinja.

Export builds, with the ``tokenizers`` library, the byte-level BPE that tiktoken runs: the vocabulary is
our ranks with each token's bytes spelled in GPT-2's printable byte alphabet (:func:`bytes_to_unicode`),
the ids are the ranks, the merge list is recovered from the ranks the way tiktoken's educational
``bpe(token, max_rank)`` does (each token splits into exactly the two parts that merged into it, in rank
order), the pre-tokenizer is our split pattern followed by a byte-level mapping, ``ignore_merges`` is on
(tiktoken returns a whole pre-token found in the vocabulary without merging), and the 9 special tokens
keep the last 9 ids. ``tokenizer(text)`` prepends ``<|bos|>`` like nanochat's document encoding;
``add_special_tokens=False`` gives exactly :meth:`Tokenizer.encode`. Import reverses the mapping and
refuses (TokenizerMappingError, saying why) anything that is not such a tokenizer; it then checks the
result against the source on probe strings.

Difference to know: Hugging Face tokenizers treat special-token strings inside text as special tokens
(like tiktoken's ``allowed_special="all"``), :meth:`Tokenizer.encode` treats them as text; pass
``split_special_tokens=True`` to get ours (docs/interop.md).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_text
from nanochat.interop.hf_format import TokenizerMappingError, require
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BOS = "<|bos|>"
EOS = "<|assistant_end|>"  # end of an assistant turn: what a chat generation stops on
PAD = EOS

# Renders exactly Tokenizer.render_conversation (and, with add_generation_prompt, render_for_completion:
# a trailing assistant message is dropped and <|assistant_start|> appended). A leading system message is
# merged into the first user message with a blank line; user and system content is a string or a list of
# {"type": "text", "text": ...} parts joined as they are (as our server joins OpenAI content parts, and the
# form vLLM's frontend passes by default); assistant content is a string or a list of
# {"type": "text"|"python"|"python_output", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] != 'text' -%}"
    "{{- raise_exception('user and system content parts must be of type text') -}}{%- endif -%}"
    "{{- part['text'] -}}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = text_of(messages[0]['content']) + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if add_generation_prompt and turns and turns[-1]['role'] == 'assistant' -%}"
    "{%- set turns = turns[:-1] -%}{%- endif -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('roles must alternate user, assistant, ... starting with user "
    "(system only first)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (system if loop.first else '') + text_of(message['content']) + '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown assistant part type (allowed: text, python, python_output)') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if not turns or turns[-1]['role'] != 'user' -%}"
    "{{- raise_exception('the conversation must end with a user message') -}}{%- endif -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)

# Probe texts for checking an imported tokenizer against its source (with a sample of its own tokens).
_PROBES = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(12345678))\r\n",
    "I'm sure they'll say we've done it; isn't it? DON'T SHOUT.",
    "Prices: $3.99, 1,000,000 units, 2024-11-28T10:00Z, 0xFF, 3.14159e-10",
    "日本語のテキスト、中文文本，한국어 텍스트, émojis 🎉🚀👩‍👩‍👧 and accents café naïve Ωμέγα",
    "   leading spaces\n\n\n\ttabs\t\tand trailing   ",
    '{"json": [1, 2, {"k": null}], \'x\': true}',
)


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (byte-level BPE's token spelling)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _unspell(text: str, source: str) -> bytes:
    table = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        raise TokenizerMappingError(
            f"{source}: vocabulary entry {text!r} is not in the byte-level alphabet; only byte-level BPE "
            "tokenizers (GPT-2/tiktoken style) can be mapped to nanochat's tokenizer"
        ) from None


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE merged into ``token``: run BPE on its bytes with the ranks below its own."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise TokenizerMappingError(f"token {token!r} (rank {rank}) is not reachable by merging lower ranks")
    return parts[0], parts[1]


def build_hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` giving our ids (see the module doc). Needs the ``hf`` extra."""
    tk = require("tokenizers", "building tokenizer.json")
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks: dict[bytes, int] = tokenizer.enc._mergeable_ranks
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(_spell(part) for part in _merge_of(token, rank, ranks))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    hf = tk.Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = tokenizer.get_bos_token_id()
    hf.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
    )
    return hf


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (specials, chat template) to ``out_dir``."""
    build_hf_tokenizer(tokenizer).save(str(out_dir / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_text(
        out_dir / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    )


# ---- import ----------------------------------------------------------------------------------------


def _split_pattern(pre: dict[str, Any] | None, source: str) -> str:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"]:
        raise TokenizerMappingError(
            f"{source}: pre_tokenizer is {kinds or None}; nanochat needs a regex Split followed by ByteLevel "
            "(tiktoken-style byte-level BPE, as `nanochat export hf` writes)"
        )
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if not pattern or split.get("invert") or split.get("behavior") != "Isolated":
        raise TokenizerMappingError(
            f"{source}: the Split pre-tokenizer must be a non-inverted, isolated regex"
        )
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        raise TokenizerMappingError(
            f"{source}: the ByteLevel pre-tokenizer must not add a prefix space or split"
        )
    return pattern


def _check_specials(added: list[dict[str, Any]], n_ranks: int, source: str) -> None:
    got = sorted((int(t["id"]), t["content"]) for t in added)
    want = [(n_ranks + i, t) for i, t in enumerate(SPECIAL_TOKENS)]
    if got != want:
        raise TokenizerMappingError(
            f"{source}: added tokens are {[c for _, c in got][:12]} at ids {[i for i, _ in got][:12]}; "
            "nanochat needs "
            f"exactly its 9 special tokens {SPECIAL_TOKENS} as the last 9 ids ({n_ranks}..{n_ranks + 8})"
        )


def _check_merge_order(merges: list[Any], vocab: dict[str, int], source: str) -> None:
    last = -1
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = vocab.get(left + right)
        if result is None or result < last:
            raise TokenizerMappingError(
                f"{source}: merge {index} ({left!r} + {right!r}) "
                + ("makes a token not in the vocabulary" if result is None else "is out of rank order")
                + "; tiktoken needs merges in the order of the ids they create"
            )
        last = result


def tokenizer_from_hf(path: str | Path) -> Tokenizer:
    """Our Tokenizer from a ``tokenizer.json`` that is byte-level BPE with nanochat's special tokens.

    Raises TokenizerMappingError naming what does not fit (model type, normalizer, pre-tokenizer,
    alphabet, id layout, special tokens, merge order, or a probe string encoded differently).
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise TokenizerMappingError(
            f"{path} is missing: a transformers model directory needs its tokenizer.json"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerMappingError(f"{path} is not valid JSON ({err})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerMappingError(
            f"{source}: model type {model.get('type')!r}; only byte-level BPE maps to ours"
        )
    if data.get("normalizer"):
        raise TokenizerMappingError(
            f"{source}: has a normalizer ({data['normalizer'].get('type')}); ours has none"
        )
    pattern = _split_pattern(data.get("pre_tokenizer"), source)
    vocab: dict[str, int] = model.get("vocab") or {}
    ranks = {_unspell(text, source): int(i) for text, i in vocab.items()}
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise TokenizerMappingError(
            f"{source}: vocabulary ids are not a contiguous 0..N-1 range over all 256 bytes"
        )
    _check_specials(data.get("added_tokens") or [], len(ranks), source)
    _check_merge_order(model.get("merges") or [], vocab, source)
    try:
        ours = Tokenizer.from_ranks(pattern, ranks)
    except ValueError as err:  # tiktoken rejects the pattern
        raise TokenizerMappingError(
            f"{source}: the split pattern does not compile for tiktoken ({err})"
        ) from None
    _verify(ours, path, vocab)
    return ours


def _verify(ours: Tokenizer, path: Path, vocab: dict[str, int]) -> None:
    """Encode probe strings (and a sample of the vocabulary) with the source and ours: they must agree."""
    tk = require("tokenizers", "importing tokenizer.json")
    source = tk.Tokenizer.from_file(str(path))
    sample = sorted(vocab, key=vocab.get)[:: max(1, len(vocab) // 2000)]
    texts = [*_PROBES, ours.decode([vocab[t] for t in sample])]
    for text in texts:
        theirs = source.encode(text, add_special_tokens=False).ids
        if theirs != ours.encode(text):
            raise TokenizerMappingError(
                f"{path}: encodes {text[:40]!r} differently from the tiktoken tokenizer built from it; "
                "it is not a tokenizer nanochat can reproduce exactly"
            )
