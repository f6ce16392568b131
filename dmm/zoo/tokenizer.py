"""A CLIP BPE tokenizer built offline from the zoo's vocabulary.

Real CLIP vocabularies cannot be downloaded here, so we write vocab.json and
merges.txt ourselves in CLIP's byte-level BPE format: every byte symbol (with
and without the end-of-word marker) plus one merge chain per known word. Known
words become single tokens; any other text still tokenizes, byte by byte.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP/GPT-2's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges the way CLIP does: lowest-ranked adjacent pair first."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(p, 1 << 30), i, p)
            for i, p in enumerate(zip(symbols[:-1], symbols[1:], strict=True))
        ]
        rank, _, best = min(pairs)
        if rank == 1 << 30:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte symbols plus merges that make every known word exactly one token.

    Each word is tokenized with the merges so far; while it is still split, a
    merge of its first two pieces is appended. Appended merges rank last, so
    they never change how an earlier word is tokenized.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words}):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return vocab, merges


def build_tokenizer(words: list[str], out_dir: Path, max_length: int) -> CLIPTokenizer:
    """Write a CLIPTokenizer for ``words`` to ``out_dir`` and return it loaded back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=EOS)
    tok.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir, local_files_only=True)
