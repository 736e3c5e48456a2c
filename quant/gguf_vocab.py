"""A GGUF file's tokenizer (llama.cpp's `tokenizer.ggml.*` metadata) as Hugging Face tokenizer files.

A GGUF holds no tokenizer.json: it lists the tokens, their types, the BPE merges and the special token ids.
The byte-level BPE they describe (`tokenizer.ggml.model = "gpt2"`) is rebuilt here with the `tokenizers`
library the way transformers' own GGUF loader builds it (a BPE model over the GPT-2 byte alphabet, control
tokens as special added tokens, user-defined ones as plain added tokens, the split regex the file's
`tokenizer.ggml.pre` names, a post-processor that adds BOS/EOS when the file says so), so that edgefed,
transformers and llama.cpp cut a text into the same ids.
"""

from __future__ import annotations

import json
from typing import Any

from edge_node.model.errors import CheckpointError

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex that splits text before byte-level BPE (the ones transformers' GGUF loader knows)
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Vocabularies trained with every digit split off first (Digits(individual_digits=True), then GPT-2's split):
# llama.cpp's pre-tokenizer for these names does exactly that, as do the models' own tokenizer.json files.
DIGIT_SPLITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
GPT2_SPLITS = ("gpt2", "default")  # GPT-2's own regex (ByteLevel's built-in one)


class TokenizerMetadataError(CheckpointError):
    """A GGUF file's tokenizer metadata is missing a field, malformed, or of a kind the importer cannot rebuild."""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the others are
    moved up past U+0100 in byte order (so a space is 'Ġ' and a newline 'Ċ')."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, moved = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + moved)
            moved += 1
    return out


def tokenizer_files(meta: dict[str, Any], source: str, context_length: int | None = None) -> dict[str, str]:
    """{file name: text} for tokenizer.json, tokenizer_config.json and chat_template.jinja (when the file has a
    template); {} for a GGUF without tokenizer metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return {}
    if kind != "gpt2":
        raise TokenizerMetadataError(
            f"{source}: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    tokens = _list(meta, "tokenizer.ggml.tokens", str, source)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerMetadataError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                                     f"{len(tokens)} tokens")
    special = {name: _token(meta, f"tokenizer.ggml.{key}", tokens, source) for name, key in
               (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                ("pad", "padding_token_id"))}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and special["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and special["eos"] is not None
    tok = byte_level_tokenizer(tokens, types, _merges(meta, source), meta.get("tokenizer.ggml.pre"),
                               [t for t in special.values() if t is not None])
    tok.post_processor = _post_processor(special, add_bos, add_eos)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
              "clean_up_tokenization_spaces": False,
              **{f"{name}_token": t[1] if t else None for name, t in special.items()}}
    if context_length:
        config["model_max_length"] = context_length
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        files["chat_template.jinja"] = template
    return files


def byte_level_tokenizer(tokens: list[str], types: list[int], merges: list[tuple[str, str]], pre: str | None,
                         special: list[tuple[int, str]] = ()):
    """A `tokenizers.Tokenizer` over GGUF's token list: BPE ids are the list's indices.

    llama.cpp writes ordinary tokens in the byte alphabet and added tokens (control, user-defined) as their
    text; an ordinary token holding other characters is re-spelled in the alphabet, as transformers does. An
    added token keeps its text as its vocabulary entry, so it keeps its id when registered as an added token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)  # a duplicate spelling keeps its first id (its later ids are unreachable)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    special_ids = {i for i, _ in special}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, (t, k) in
                            enumerate(zip(tokens, types, strict=True)) if k == CONTROL or i in special_ids])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, (t, k) in
                    enumerate(zip(tokens, types, strict=True)) if k == USER_DEFINED and i not in special_ids])
    return tok


def pre_tokenizer(pre: str | None):
    """The split applied before byte-level BPE for a `tokenizer.ggml.pre` name (GPT-2's for unknown names,
    as transformers does)."""
    from tokenizers import Regex, pre_tokenizers

    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in DIGIT_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def known_pre(pre: str | None) -> bool:
    return pre is None or pre in SPLITS or pre in DIGIT_SPLITS or pre in GPT2_SPLITS


def _post_processor(special: dict[str, tuple[int, str] | None], add_bos: bool, add_eos: bool):
    """BOS/EOS around every encoded text as the file asks: the template transformers builds from
    tokenizer_config.json's add_bos_token/add_eos_token, so both libraries add the same ids."""
    from tokenizers import processors

    bos, eos = special["bos"], special["eos"]
    head = f"{bos[1]}:0 " if add_bos else ""
    tail = f" {eos[1]}:0" if add_eos else ""
    pair_bos = f" {bos[1]}:1" if add_bos else ""
    pair_eos = f" {eos[1]}:1" if add_eos else ""
    ids = ([(bos[1], bos[0])] if add_bos else []) + ([(eos[1], eos[0])] if add_eos else [])
    return processors.TemplateProcessing(single=f"{head}$A:0{tail}",
                                         pair=f"{head}$A:0{tail}{pair_bos} $B:1{pair_eos}", special_tokens=ids)


def _list(meta: dict[str, Any], key: str, kind: type, source: str) -> list:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise TokenizerMetadataError(f"{source}: missing or malformed metadata {key!r} (a list of {kind.__name__})")
    return value


def _merges(meta: dict[str, Any], source: str) -> list[tuple[str, str]]:
    out = []
    for i, merge in enumerate(_list(meta, "tokenizer.ggml.merges", str, source)):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerMetadataError(f"{source}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens")
        out.append((parts[0], parts[1]))
    return out


def _token(meta: dict[str, Any], key: str, tokens: list[str], source: str) -> tuple[int, str] | None:
    """(id, text) of a special token id field, or None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < len(tokens):
        raise TokenizerMetadataError(f"{source}: {key} = {value!r} is not a token id (the vocabulary has "
                                     f"{len(tokens)} tokens)")
    return value, tokens[value]
