"""Caption tokenisers with a fixed context length, built on HF ``tokenizers`` (Rust, batched).

Two flavours share one text pipeline and one file format:

- ``clip``: CLIP's byte-level BPE read from its merges file ``bpe_simple_vocab_16e6.txt.gz``, with the
  vocabulary built exactly as CLIP builds it (ids match open_clip / OpenAI CLIP)::

      ids 0..255       the 256 byte symbols (CLIP's byte-to-unicode table, in table order)
      ids 256..511     the same symbols + "</w>" (end of word)
      ids 512..        one token per merge, "a" + "b", in merge order (48,894 merges in the real file)
      last two         "<|startoftext|>", "<|endoftext|>"   (49406, 49407; vocab_size 49408)

  Padding uses id 0 (the byte symbol "!"), as open_clip does: the padding is whatever follows the
  first end-of-text token.
- ``bpe``: a byte-level BPE trained on a dataset's own captions (:func:`train_bpe`). Same layout
  with four special tokens first, so every byte sequence stays encodable (no ``<unk>`` in practice)::

      0 "<pad>", 1 "<|startoftext|>", 2 "<|endoftext|>", 3 "<unk>", 4..259 bytes, 260..515 bytes + "</w>",
      516.. merges

Text pipeline (open_clip's; ids equal to open_clip's on web captions, tests/test_tokenizer.py): ftfy,
html-unescape twice (Python side), NFC, collapse whitespace, strip, lowercase -> split with CLIP's regex
(contractions, letter runs, single digits, other non-space runs) -> bytes to unicode symbols -> BPE with "</w>" on the
last symbol of each word. Encoding = [sot] + tokens + [eot]; longer texts are cut to
``context_length`` with eot kept as the last token; shorter ones are right-padded with ``pad_id``.

File format (:meth:`Tokenizer.save`): one UTF-8 JSON object holding our metadata next to the HF
tokenizer's own serialisation::

    {"format": "unclip-tokenizer", "format_version": 1, "kind": "clip" | "bpe", "context_length": 77,
     "sot_id": ..., "eot_id": ..., "pad_id": ..., "vocab_size": ..., "hf_tokenizer": {<tokenizer.json>}}

Truncation and padding are not stored in ``hf_tokenizer``; they are set from ``context_length`` on load.
"""

from __future__ import annotations

import enum
import gzip
import html
import importlib.util
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ftfy
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

# Loader workers are processes already: a Rust thread pool per worker only oversubscribes the cores,
# and using the pool before the DataLoader forks makes every worker warn and fall back anyway.
# setdefault keeps an explicit user choice.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
EOW = "</w>"  # end-of-word suffix on the last symbol of each pre-token
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # CLIP reads file lines 1..48894 (line 0 is the "#version" header)
CONFIG_OPTION = "data.tokenizer.path"
FORMAT = "unclip-tokenizer"
FORMAT_VERSION = 1
# CLIP's pre-tokeniser: contractions, letter runs, single digits, runs of other non-space characters.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BPE_SPECIALS = (PAD, SOT, EOT, UNK)  # ids 0..3 of a trained BPE
SPACE_SYMBOL = chr(256 + 32)  # "Ġ": byte 0x20 in the byte table (the 33rd non-printable byte)


class TokenizerKind(str, enum.Enum):
    CLIP = "clip"
    BPE = "bpe"

    @classmethod
    def parse(cls, kind: str | TokenizerKind) -> TokenizerKind:
        try:
            return cls(kind)
        except ValueError:
            valid = ", ".join(repr(k.value) for k in cls)
            raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {valid}") from None


def bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte table: entry i is the printable symbol standing for one byte.

    Printable Latin-1 bytes map to themselves and come first (in byte order); the other 68 bytes
    (controls, space, ...) follow, mapped to chr(256 + n). The *position* in this list is the token id
    of the symbol in CLIP's vocabulary.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def clean_text(text: str) -> str:
    """The part of CLIP's text cleaning that the Rust normaliser cannot do, in open_clip's order: ftfy
    (mojibake, curly quotes, full-width forms, ligatures; ~13 µs a caption), then html unescape twice."""
    if not isinstance(text, str):
        raise TypeError(f"captions must be str, got {type(text).__name__}: {text!r}")
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)) if "&" in text else text


# open_clip's tokenizer reads these literal strings in a caption as its start/end-of-text tokens.
_LITERAL_SPECIALS = re.compile(r"(<start_of_text>|<end_of_text>)", re.IGNORECASE)


def _set_text_pipeline(tok: HFTokenizer) -> None:
    """CLIP's normalisation and pre-tokenisation (everything before BPE), on ``tok`` in place."""
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            # use_regex=False: the text is already split; GPT-2's regex must not split it again.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build_hf(
    vocab: list[str], merges: list[tuple[str, str]], specials: Sequence[str], *, sot: str, eot: str
) -> HFTokenizer:
    """An HF tokenizer with CLIP's text pipeline over ``vocab`` (token id = list position) and ``merges``."""
    ids = {tok: i for i, tok in enumerate(vocab)}
    if len(ids) != len(vocab):
        raise ValueError(f"vocabulary has {len(vocab) - len(ids)} duplicate tokens; check the merges file")
    model = models.BPE(
        ids,
        merges,
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
        unk_token=UNK if UNK in ids else None,
        fuse_unk=False,
    )
    tok = HFTokenizer(model)
    _set_text_pipeline(tok)
    # "</w>" -> the byte symbol for " ", then bytes -> UTF-8 (per-token byte decoding would break
    # characters whose bytes span two tokens).
    tok.decoder = decoders.Sequence([decoders.Replace(EOW, SPACE_SYMBOL), decoders.ByteLevel()])
    tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, ids[sot]), (eot, ids[eot])]
    )
    return tok


class Tokenizer:
    """Text -> (N, context_length) token ids, with sot/eot, truncation (eot kept last) and padding.

    Build with :func:`clip_tokenizer`, :func:`train_bpe`, :func:`build_tokenizer` or :meth:`load`.
    Picklable (DataLoader workers get a copy).
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        kind: str | TokenizerKind,
        context_length: int,
        sot_id: int,
        eot_id: int,
        pad_id: int,
    ):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self._hf = hf  # no truncation/padding: those live in the per-length engines
        self.kind = TokenizerKind.parse(kind)
        self.context_length = int(context_length)
        self.sot_id, self.eot_id, self.pad_id = int(sot_id), int(eot_id), int(pad_id)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._engines: dict[int, HFTokenizer] = {}

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind.value!r}, vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"sot_id={self.sot_id}, eot_id={self.eot_id}, pad_id={self.pad_id})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_engines": {}}  # engines are rebuilt lazily; keeps pickles small

    def _engine(self, context_length: int) -> HFTokenizer:
        """A copy of the HF tokenizer that truncates and pads to ``context_length``."""
        engine = self._engines.get(context_length)
        if engine is None:
            if context_length < 2:
                raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
            engine = HFTokenizer.from_str(self._hf.to_str())
            engine.encode_special_tokens = True  # not serialised: typed "<|endoftext|>" stays text
            # With a post-processor, HF truncates the text to context_length - 2 and then adds sot/eot.
            engine.enable_truncation(max_length=context_length, strategy="longest_first", direction="right")
            engine.enable_padding(
                direction="right",
                pad_id=self.pad_id,
                pad_token=self._hf.id_to_token(self.pad_id),
                length=context_length,
            )
            self._engines[context_length] = engine
        return engine

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Encode one text or a batch: LongTensor (N, context_length), pad_id after eot."""
        length = self.context_length if context_length is None else int(context_length)
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return torch.empty((0, length), dtype=torch.long)
        cleaned = [clean_text(t) for t in texts]
        encodings = self._engine(length).encode_batch(cleaned)
        ids = [e.ids for e in encodings]
        if self.kind is TokenizerKind.CLIP:
            for i, text in enumerate(cleaned):
                if _LITERAL_SPECIALS.search(text):
                    ids[i] = self._with_literal_specials(text, length)
        return torch.tensor(ids, dtype=torch.long)  # (N, L)

    def _with_literal_specials(self, text: str, length: int) -> list[int]:
        """open_clip's ids for a caption that spells out ``<start_of_text>`` / ``<end_of_text>``: those
        become the sot / eot ids where they stand; too long: cut, the last id made eot; then padded."""
        engine = self._engine(length)
        ids = [self.sot_id]
        for piece in _LITERAL_SPECIALS.split(text):
            if piece.lower() == "<start_of_text>":
                ids.append(self.sot_id)
            elif piece.lower() == "<end_of_text>":
                ids.append(self.eot_id)
            elif piece.strip():
                encoded = engine.encode(piece, add_special_tokens=False)
                ids += [t for t, keep in zip(encoded.ids, encoded.attention_mask, strict=True) if keep]
        ids.append(self.eot_id)
        if len(ids) > length:
            ids = ids[:length]
            ids[-1] = self.eot_id
        return ids + [self.pad_id] * (length - len(ids))

    def encode(self, text: str) -> list[int]:
        """Ids of one text with sot/eot, truncated to context_length, without padding (up to the last eot:
        a caption may spell out more, see ``_with_literal_specials``)."""
        ids = self([text])[0].tolist()
        return ids[: len(ids) - ids[::-1].index(self.eot_id)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence: stops at the first eot, drops sot/eot/pad and other special tokens.

        Without an eot, a trailing run of pad ids is taken as padding (for CLIP, pad id 0 is "!").
        Words come back lowercased and separated by single spaces, punctuation as its own word
        ("hello world !"), as CLIP decodes.
        """
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        else:
            while ids and ids[-1] == self.pad_id:
                ids.pop()
        ids = [i for i in ids if i not in (self.sot_id, self.eot_id)]
        return self._hf.decode(ids, skip_special_tokens=True).strip()

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def with_context_length(self, context_length: int) -> Tokenizer:
        """The same vocabulary with another default context length."""
        return Tokenizer(
            self._hf,
            kind=self.kind,
            context_length=context_length,
            sot_id=self.sot_id,
            eot_id=self.eot_id,
            pad_id=self.pad_id,
        )

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether ``other`` maps every text to the same ids (its context length aside): one kind, one
        vocabulary and merges, the same special ids."""
        ids = ("kind", "sot_id", "eot_id", "pad_id", "vocab_size")
        if any(getattr(self, k) != getattr(other, k) for k in ids):
            return False
        return json.loads(self._hf.to_str())["model"] == json.loads(other._hf.to_str())["model"]

    def save(self, path: str | Path) -> None:
        """Write one JSON file (see module docstring), atomically: a temp file, then os.replace."""
        path = Path(path)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind.value,
            "context_length": self.context_length,
            "sot_id": self.sot_id,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "hf_tokenizer": json.loads(self._hf.to_str()),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temp name per writer: several ranks may save the same (deterministic) file at once.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
            raise ValueError(
                f"{path}: not valid JSON ({e}); expected a tokenizer.json written by Tokenizer.save"
            ) from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a tokenizer file written by Tokenizer.save (no 'format': '{FORMAT}')"
            )
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format_version {payload.get('format_version')!r}")
        hf = HFTokenizer.from_str(json.dumps(payload["hf_tokenizer"]))
        hf.no_truncation()
        hf.no_padding()
        return cls(
            hf,
            kind=payload["kind"],
            context_length=payload["context_length"],
            sot_id=payload["sot_id"],
            eot_id=payload["eot_id"],
            pad_id=payload["pad_id"],
        )


# ---------------------------------------------------------------------------------------------- CLIP


def _package_dir(name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin not in (None, "namespace"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def find_clip_vocab(path: str | Path | None = None) -> Path:
    """Locate CLIP's merges file: ``path`` (file or directory), else open_clip's or clip's package dir."""
    how = (
        f"Pass its path as clip_tokenizer(path=...) / config option {CONFIG_OPTION}=/path/to/{CLIP_VOCAB_FILE}. "
        f"The file ships inside the open_clip_torch wheel: `pip download open_clip_torch --no-deps` and "
        f"unzip open_clip/{CLIP_VOCAB_FILE} (no need to install open_clip)."
    )
    if path is not None:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / CLIP_VOCAB_FILE
        if not candidate.is_file():
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found at {candidate} (from {CONFIG_OPTION}). {how}"
            )
        return candidate
    looked = []
    for package in ("open_clip", "clip"):
        directory = _package_dir(package)
        if directory is None:
            looked.append(f"package {package!r} (not installed)")
            continue
        candidate = directory / CLIP_VOCAB_FILE
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {CLIP_VOCAB_FILE} not found; looked in: {'; '.join(looked)}. {how}"
    )


def read_clip_merges(path: str | Path, max_merges: int = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
    """Merges from a CLIP merges file (gzip or plain text): line 0 is a "#version" header, then "a b" lines."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    if "#version" not in lines[0]:
        raise ValueError(
            f"{path}: first line should be the '#version' header of a BPE merges file, got {lines[0][:80]!r}"
        )
    merges = []
    for lineno, line in enumerate(lines[1 : max_merges + 1], start=1):
        parts = line.split()
        if not parts:
            continue  # trailing newline
        if len(parts) != 2:
            raise ValueError(
                f"{path}:{lineno + 1}: a merge is two symbols separated by a space, got {line!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def clip_tokenizer(path: str | Path | None = None, context_length: int = 77) -> Tokenizer:
    """CLIP's tokenizer from its merges file (see :func:`find_clip_vocab` for where it is looked for)."""
    vocab_path = find_clip_vocab(path)
    merges = read_clip_merges(vocab_path)
    symbols = bytes_to_unicode()
    vocab = symbols + [s + EOW for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    hf = _build_hf(vocab, merges, [SOT, EOT], sot=SOT, eot=EOT)
    log.debug("CLIP tokenizer from %s: %d merges, vocab %d", vocab_path, len(merges), len(vocab))
    return Tokenizer(
        hf,
        kind=TokenizerKind.CLIP,
        context_length=context_length,
        sot_id=len(vocab) - 2,
        eot_id=len(vocab) - 1,
        pad_id=0,
    )


# ----------------------------------------------------------------------------------------- trained BPE

_BPE_BASE = len(BPE_SPECIALS) + 2 * 256  # specials + byte symbols + byte symbols with "</w>"


def _merges_of(hf: HFTokenizer) -> list[tuple[str, str]]:
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def train_bpe(
    captions: Iterable[str], *, vocab_size: int = 1024, context_length: int = 32, min_frequency: int = 1
) -> Tokenizer:
    """Train a byte-level BPE on captions (same text pipeline as CLIP); deterministic in the captions.

    ``vocab_size`` is an upper bound: 516 base tokens (4 specials, 256 bytes, 256 bytes + "</w>") plus
    at most ``vocab_size - 516`` merges; training stops earlier when no pair occurs ``min_frequency``
    times (a corpus of ~40 distinct words needs only a few hundred merges).
    """
    if vocab_size < _BPE_BASE:
        raise ValueError(
            f"vocab_size must be >= {_BPE_BASE} (4 specials + 512 byte symbols), got {vocab_size}"
        )
    symbols = bytes_to_unicode()
    eow_symbols = [s + EOW for s in symbols]
    # The byte+"</w>" symbols are given to the trainer as (pseudo-)special tokens so that every one
    # of them exists and has a fixed id whatever the captions: the trainer otherwise numbers them in
    # hash-map order, and its tie-breaks between equally frequent pairs compare ids.
    scratch = HFTokenizer(models.BPE(end_of_word_suffix=EOW, continuing_subword_prefix=""))
    _set_text_pipeline(scratch)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[*BPE_SPECIALS, *eow_symbols],
        initial_alphabet=symbols,
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
        show_progress=False,
    )
    scratch.train_from_iterator((clean_text(c) for c in captions), trainer=trainer)
    merges = _merges_of(scratch)[: vocab_size - _BPE_BASE]
    vocab = [*BPE_SPECIALS, *symbols, *eow_symbols, *(a + b for a, b in merges)]
    hf = _build_hf(vocab, merges, BPE_SPECIALS, sot=SOT, eot=EOT)
    return Tokenizer(hf, kind=TokenizerKind.BPE, context_length=context_length, sot_id=1, eot_id=2, pad_id=0)


# --------------------------------------------------------------------------------------------- factory


def build_tokenizer(
    kind: str | TokenizerKind,
    *,
    path: str | Path | None = None,
    context_length: int,
    vocab_size: int | None = None,
    captions: Iterable[str] | None = None,
) -> Tokenizer:
    """The tokenizer named by config ``data.tokenizer``.

    - ``clip``: CLIP's vocabulary; ``path`` is the merges file (or its directory); None searches the
      installed open_clip / clip packages. ``vocab_size`` and ``captions`` are ignored.
    - ``bpe``: loads ``path`` when it exists (its context length replaced by ``context_length``); else
      trains on ``captions`` with ``vocab_size`` (default 1024) and, when ``path`` is given, saves there
      so later runs and other ranks load the same vocabulary.
    """
    kind = TokenizerKind.parse(kind)
    if kind is TokenizerKind.CLIP:
        tok = clip_tokenizer(path, context_length=context_length)
        log.info("tokenizer: %r", tok)
        return tok
    if path is not None and Path(path).is_file():
        tok = Tokenizer.load(path)
        if tok.kind is not TokenizerKind.BPE:
            raise ValueError(f"{path} holds a {tok.kind.value!r} tokenizer, but kind 'bpe' was asked for")
        if tok.context_length != context_length:
            tok = tok.with_context_length(context_length)
        log.info("tokenizer: %r (loaded from %s)", tok, path)
        return tok
    if captions is None:
        where = f"{path} does not exist" if path is not None else f"{CONFIG_OPTION} is not set"
        raise ValueError(
            f"bpe tokenizer: {where} and no captions were given to train one. Set {CONFIG_OPTION} to a "
            "tokenizer file written by Tokenizer.save, or pass the training captions."
        )
    tok = train_bpe(
        captions, vocab_size=1024 if vocab_size is None else vocab_size, context_length=context_length
    )
    if path is not None:
        # Every rank may get here at once: training is deterministic and save() is atomic, so the
        # ranks write identical files and a reader never sees a partial one.
        tok.save(path)
    log.info("tokenizer: %r (trained%s)", tok, f", saved to {path}" if path is not None else "")
    return tok
