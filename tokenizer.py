"""Tokenizers of model folders: sentencepiece's tokenizer.model."""
from pathlib import Path

from utils import UserError


class Tokenizer:
    """sentencepiece's tokenizer.model: encode with optional BOS/EOS, decode."""

    def __init__(self, path):
        import sentencepiece
        if not Path(path).is_file():
            raise UserError(f"{path}: not found; the model folder needs its sentencepiece tokenizer.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path}: not a sentencepiece model ({str(e).strip()[:120]})")
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])
