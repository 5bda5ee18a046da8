"""T5's SentencePiece tokenizer: prompts -> (ids, mask) ready for the T5 encoder.

Ids are those of T5's vocabulary (`cc_all.32000.100extra`; see NOTICE.md): pad = 0,
EOS = 1 appended to every prompt, as T5 was trained.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Sequence

import numpy as np
import sentencepiece
from absl import logging

PAD_ID = 0
EOS_ID = 1
# T5 reserves 100 sentinel ids (<extra_id_0..99>) after the 32,000 SentencePiece pieces.
NUM_EXTRA_IDS = 100


def default_model_path() -> str:
    """Path of the T5 SentencePiece model packaged with imagen_jax."""
    return str(importlib.resources.files("imagen_jax.text") / "t5_spiece.model")


class Tokenizer:
    """Batched T5 tokenisation with EOS, padding and truncation."""

    def __init__(self, model_path: str | os.PathLike | None = None):
        self.model_path = str(model_path) if model_path is not None else default_model_path()
        if not os.path.exists(self.model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
            raise ValueError(f"{self.model_path} is not a T5 vocabulary: pad={self._sp.pad_id()} "
                             f"eos={self._sp.eos_id()} (T5 uses pad={PAD_ID}, eos={EOS_ID})")

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus T5's 100 extra ids (32,100 for T5's vocabulary).

        T5 embedding tables are larger (32,128, padded for TPU efficiency); ids past
        vocab_size are never produced.
        """
        return self._sp.get_piece_size() + NUM_EXTRA_IDS

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [B, max_length], mask bool [B, max_length]) for a list of prompts.

        Each prompt becomes its pieces followed by EOS, right-padded with 0. A prompt
        longer than max_length keeps its first max_length - 1 pieces and then EOS, so the
        encoder always sees an end of sequence; truncations are logged as a warning.
        """
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of prompts, not a single string")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        pieces = self._sp.encode(list(texts), out_type=int)
        ids = np.full((len(pieces), max_length), PAD_ID, np.int32)
        mask = np.zeros((len(pieces), max_length), np.bool_)
        truncated = 0
        for row, seq in enumerate(pieces):
            if len(seq) + 1 > max_length:
                truncated += 1
                seq = seq[:max_length - 1]
            seq = list(seq) + [EOS_ID]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = True
        if truncated:
            logging.warning("Truncated %d of %d prompts to max_length=%d tokens (EOS kept).",
                            truncated, len(pieces), max_length)
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one id sequence, stopping at the first EOS and skipping padding."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID])
