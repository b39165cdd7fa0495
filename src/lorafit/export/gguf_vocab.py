"""A Hugging Face tokenizer as GGUF tokenizer metadata, so llama.cpp encodes text to the same ids.

Two tokenizer families are read from the fast tokenizer's own ``tokenizer.json`` (the one the
Hugging Face model was trained with):

==================  ==========================================  ===============================
family              how it shows in tokenizer.json              GGUF ``tokenizer.ggml.model``
==================  ==========================================  ===============================
byte-level BPE      BPE model, ``ByteLevel`` pre-tokenizer      ``gpt2`` with merges and a
(GPT-2, Llama 3,    (alone, or after a ``Split`` regex)         ``tokenizer.ggml.pre`` naming
Qwen2)                                                          the split regex
SentencePiece BPE   BPE with ``byte_fallback``, ``Metaspace``   ``llama`` (llama.cpp's SPM
(Llama 2, Mistral)  pre-tokenizer or Prepend/Replace normaliser  tokenizer) with scores
==================  ==========================================  ===============================

llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece has the highest
score; a Hugging Face BPE merges the pair with the lowest rank in its merge list. The score of a
piece is therefore written as ``-(rank of the first merge that forms it)``, which gives llama.cpp
the same merge order; characters, bytes and specials (never a merge's result) score 0, and a
longer piece no merge forms scores below every merge.

Ids the model has but the tokenizer does not (an embedding padded to a multiple of 64) get
placeholder tokens ``[PAD<id>]`` of type UNUSED, as llama.cpp's own converter writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ExportError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regex of a byte-level BPE tokenizer -> llama.cpp's name for the pre-tokenizer that
# implements it (llama-vocab.cpp). A plain ByteLevel pre-tokenizer uses GPT-2's regex.
PRE_TOKENIZERS = {
    "gpt2": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
# pre-tokenizers for which llama.cpp takes a whole pre-token that is in the vocabulary as one token
# before merging (tokenizer.json's BPE ``ignore_merges``); the others always merge
IGNORE_MERGES = {"llama-bpe"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GgufVocab:
    """The tokenizer keys of a GGUF file (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    model: str
    """``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece)."""
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]] = None
    merges: Optional[list[str]] = None
    pre: Optional[str] = None
    add_space_prefix: Optional[bool] = None
    special_ids: dict[str, int] = field(default_factory=dict)
    """``bos``/``eos``/``unk``/``pad`` -> id."""
    add_bos: bool = False
    add_eos: bool = False
    chat_template: Optional[str] = None

    def add_to(self, writer) -> None:
        """Write the keys with a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    @property
    def eos_text(self) -> Optional[str]:
        eos = self.special_ids.get("eos")
        return None if eos is None else self.tokens[eos]


def gguf_vocab(tokenizer: Any, n_vocab: int) -> GgufVocab:
    """The GGUF vocabulary of a Hugging Face fast `tokenizer`, padded to the model's `n_vocab` ids.

    Raises `ExportError` for a tokenizer family llama.cpp cannot reproduce (WordPiece, Unigram,
    a byte-level split regex it has no pre-tokenizer for) or more tokens than embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
                          "GGUF export reads its tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer.json model type {model.get('type')!r} is not supported: GGUF export "
                          "handles byte-level BPE and SentencePiece-style BPE (byte_fallback) tokenizers")
    added = {item["id"]: item for item in spec.get("added_tokens") or []}
    pieces = {**{i: p for p, i in model["vocab"].items()}, **{i: a["content"] for i, a in added.items()}}
    if max(pieces) >= n_vocab:
        raise ExportError(f"the tokenizer has id {max(pieces)} but the model's embedding has only {n_vocab} rows")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if model.get("byte_fallback"):
        vocab = _sentencepiece(spec, pieces, added, merges, n_vocab, tokenizer.unk_token_id)
    else:
        vocab = _byte_level(spec, pieces, added, merges, n_vocab)
    vocab.special_ids = {kind: token_id for kind in ("bos", "eos", "unk", "pad")
                         if (token_id := getattr(tokenizer, f"{kind}_token_id", None)) is not None}
    vocab.add_bos, vocab.add_eos = _added_specials(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def _byte_level(spec, pieces, added, merges, n_vocab) -> GgufVocab:
    tokens, types = _tokens_and_types(pieces, added, n_vocab, lambda i, piece: NORMAL)
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    if ignore_merges != (pre in IGNORE_MERGES):
        raise ExportError(f"tokenizer.json model.ignore_merges = {ignore_merges} does not match llama.cpp's {pre!r} "
                          f"pre-tokenizer, which {'takes' if pre in IGNORE_MERGES else 'never takes'} a whole "
                          "pre-token from the vocabulary before merging")
    return GgufVocab(model="gpt2", tokens=tokens, types=types, pre=pre,
                     merges=[" ".join(_escape_space(part) for part in pair) for pair in merges])


def _sentencepiece(spec, pieces, added, merges, n_vocab, unk_id) -> GgufVocab:
    def kind(token_id: int, piece: str) -> int:
        if token_id == unk_id:
            return UNKNOWN
        return BYTE if _BYTE_PIECE.fullmatch(piece) else NORMAL

    tokens, types = _tokens_and_types(pieces, added, n_vocab, kind)
    ranks: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        ranks.setdefault(left + right, rank)
    unreachable = -float(len(merges))  # a longer piece no merge forms: llama.cpp should try it last
    scores = [-float(ranks[piece]) if piece in ranks else 0.0 if len(piece) == 1 or token_type != NORMAL
              else unreachable for piece, token_type in zip(tokens, types)]
    return GgufVocab(model="llama", tokens=tokens, types=types, scores=scores,
                     add_space_prefix=_space_prefix(spec))


def _tokens_and_types(pieces: dict[int, str], added: dict[int, dict], n_vocab: int, kind) -> tuple[list, list]:
    """Token texts and types for ids 0..n_vocab-1: added specials are CONTROL, other added tokens
    USER_DEFINED, gaps UNUSED placeholders, the rest ``kind(id, piece)``."""
    tokens, types = [], []
    for token_id in range(n_vocab):
        piece = pieces.get(token_id)
        if piece is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
        elif token_id in added:
            tokens.append(piece)
            types.append(CONTROL if added[token_id].get("special") else USER_DEFINED)
        else:
            tokens.append(piece)
            types.append(kind(token_id, piece))
    return tokens, types


def _pre_tokenizer(pre: Optional[dict]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's ``pre_tokenizer`` entry."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    split = [s for s in steps if s.get("type") == "Split"]
    level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(level) != 1 or len(steps) != len(split) + 1 or level[0].get("add_prefix_space"):
        raise ExportError(f"tokenizer.json pre_tokenizer {json.dumps(pre)} is not supported: expected ByteLevel "
                          "(add_prefix_space false), alone or after one Split regex")
    if split:
        key = (split[0].get("pattern") or {}).get("Regex")
    else:
        key = "gpt2" if level[0].get("use_regex", True) else None
    if key not in PRE_TOKENIZERS:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise ExportError(f"tokenizer.json pre_tokenizer split {key!r} has no llama.cpp pre-tokenizer in lorafit's "
                          f"table; supported: GPT-2's ByteLevel regex and the splits of {known}")
    return PRE_TOKENIZERS[key]


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts ``▁`` before the text (Metaspace with
    prepend_scheme first/always, or a Prepend normaliser)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    normalizer = spec.get("normalizer") or {}
    return any(n.get("type") == "Prepend" for n in normalizer.get("normalizers", [normalizer]))


def _escape_space(part: str) -> str:
    """GGUF merges are ``"left right"``, so a space inside a part is written as
    ``chr(ord(" ") + 256)`` (U+0120, byte-level BPE's own spelling of a space), as llama.cpp's
    converter does."""
    return part.replace(" ", chr(ord(" ") + 256))


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what `tokenizer` puts around a text with ``add_special_tokens=True``."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos]
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and plain[-1:] != [eos]
    return adds_bos, adds_eos
