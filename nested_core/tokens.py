"""Finding the bound word among a prompt's tokens: the one token finder.

A prompt is tokenised into chunks of 77 ids (BOS, up to 75 content ids,
EOS/padding); the text encoding concatenates them, so position p of chunk c
is index 77·c + p of the conditioning's token axis. Words are matched as id
sequences, which is exact where matching decoded text is not ("persons" is
not "person"; weights and parentheses do not change ids).
"""
from __future__ import annotations

from typing import Sequence

CHUNK_LEN = 77


def find_token_positions(
    chunks: Sequence[Sequence[int | None]], word_ids: Sequence[int], *, word: str, occurrence: int = 0
) -> list[int]:
    """Flat context indices of `word` (its single token id) in the prompt's chunks.

    occurrence = 0 binds every occurrence, n ≥ 1 only the n-th. Non-integer entries
    (embeddings) never match.
    """
    if len(word_ids) != 1:
        raise ValueError(
            f"'{word}' is {len(word_ids)} CLIP tokens {list(word_ids)}; nested attention binds one token. "
            f"Bind a single-token word (e.g. 'person', 'man', 'woman', 'dog', 'cat') and put that word in the prompt"
        )
    if occurrence < 0:
        raise ValueError(f"occurrence must be 0 (every occurrence) or n ≥ 1 (the n-th); got {occurrence}")
    target = word_ids[0]
    hits = [c * CHUNK_LEN + p for c, chunk in enumerate(chunks) for p, tok in enumerate(chunk) if tok == target]
    if not hits:
        raise ValueError(f"the word '{word}' is not in the prompt; add it where the subject should appear, or bind another word")
    if occurrence == 0:
        return hits
    if occurrence > len(hits):
        raise ValueError(f"the prompt has '{word}' {len(hits)} time(s); occurrence {occurrence} does not exist")
    return [hits[occurrence - 1]]


def repeated_positions(positions: Sequence[int], context_len: int, total_len: int) -> list[int]:
    """Every copy of each position when a length-L context is repeated to the batch's LCM length."""
    if total_len % context_len:
        raise ValueError(f"a context of {context_len} tokens cannot be repeated to {total_len}")
    return [p + m * context_len for m in range(total_len // context_len) for p in positions]
