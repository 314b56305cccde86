"""The tokenizer: Hugging Face's tokenizer.json, run by the `tokenizers` library."""
import os

from refq.errors import RefqError


class Tokenizer:
    def __init__(self, folder):
        from tokenizers import Tokenizer as _HF
        path = self.path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise RefqError(f"{path}: no such file (the model folder needs a tokenizer.json)")
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type
            raise RefqError(f"{path}: not a valid tokenizer.json "
                            f"({str(e).splitlines()[0][:200]})") from None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text):
        """Token ids of text, with no special tokens added (no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token):
        return self._tok.token_to_id(token)

    def check_ids(self, ids, vocab_size, what):
        """Refuse token ids the model has no embedding row for (a tokenizer.json that
        does not match config.json's vocab_size), naming `what` was encoded."""
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise RefqError(f"{what}: token id {max(bad)} from {self.path} is beyond the "
                            f"model's vocab_size {vocab_size} (tokenizer and model do not match)")
        return ids
