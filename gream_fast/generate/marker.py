"""MarkerAutomaton: has a marker string (the answer marker "<answer>") appeared in the text of
the tokens generated so far? One table lookup per token, batched, on any device.

BPE tokenizes a marker differently in running text (" <answer>" -> " <", "answer", ">") than
alone, and one token may hold the end of a partial match and the start of the next ("><"), so
comparing token ids misses markers and decoding each row's tail every step costs a tokenizer
call per row. Instead the KMP automaton of the marker is lifted from characters to tokens once:
state s < M (M = len(marker)) means "the longest suffix of the text so far that is a prefix of
the marker has s characters"; M means "the marker has appeared" and is absorbing. table[s, v] is
the state after reading token v's text from state s, so feeding ids one at a time accepts
exactly when the concatenated token texts contain the marker.

Building the table: a token's result from state s is that of the text marker[:s] + text(v)
(KMP state s remembers exactly marker[:s]). From any state, a first character c that does not
occur in marker[1:] can only extend a match of length 0 (to 1 if c == marker[0]), so such a
token ends where it ends from state 0: one column computed once. Only tokens that start with a
character of marker[1:] (or are empty) need all M states; for "<answer>" and a 150k vocabulary
that is a small share, and each state is a few C-level string operations.

Texts are the tokens decoded one by one (special tokens kept, no clean-up of spaces). That
equals decoding the whole sequence as far as the marker is concerned when every marker character
is whole in the token texts: always for an ASCII marker with a byte-level BPE (Qwen, Llama 3),
where a token holding part of a multi-byte character decodes to U+FFFD but never eats an ASCII
byte. Tokens whose decoding depends on their neighbours (SentencePiece's leading space) may
differ on spaces: prefer markers without leading or trailing spaces.
"""
import numpy as np
import torch

from gream_fast.errors import InvalidInputError


def _run(marker: str, text: str) -> int:
    """KMP state after reading `text` from state 0 (len(marker) once the marker appeared)."""
    m = len(marker)
    if marker in text:
        return m
    for n in range(min(len(text), m - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def transition_table(marker: str, texts) -> np.ndarray:
    """int32 [len(marker) + 1, len(texts)]: the state after token v's text from each state."""
    if not isinstance(marker, str) or not marker:
        raise InvalidInputError(f"marker: expected a non-empty string, got {marker!r}")
    m, later = len(marker), set(marker[1:])
    table = np.empty((m + 1, len(texts)), dtype=np.int32)
    table[m] = m  # accepted is absorbing
    prefixes = [marker[:s] for s in range(m)]
    tail = set(marker[:-1])  # a text ending outside these ends in state 0 (or accepted)
    for v, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{v}]: expected a string, got {type(text).__name__}")
        if text and text[0] not in later:  # the same from every state
            table[:m, v] = _run(marker, text) if (text[-1] in tail or marker[-1] in text) else 0
        else:
            table[:m, v] = [_run(marker, p + text) for p in prefixes]
    return table


class MarkerAutomaton:
    """Token-level automaton of one marker string. States are int32 tensors of any shape:
    INITIAL (0) before any token, `accept` (= len(marker)) once the marker has appeared (and
    forever after). Token ids outside [0, vocab_size) read as empty text (the state is kept):
    a model's padded vocabulary may be wider than its tokenizer's."""

    INITIAL = 0

    def __init__(self, marker: str, table):
        table = torch.as_tensor(table)
        m = len(marker) if isinstance(marker, str) else -1
        if m < 1 or table.dim() != 2 or table.shape[0] != m + 1 or table.dtype != torch.int32:
            raise InvalidInputError(
                f"MarkerAutomaton: expected a non-empty marker and an int32 table of shape "
                f"[len(marker) + 1, vocab], got marker {marker!r} and a {table.dtype} table of "
                f"shape {list(table.shape)}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) > m):
            raise InvalidInputError(f"MarkerAutomaton: table states must lie in 0..{m}")
        self.marker, self.table = marker, table

    @classmethod
    def from_texts(cls, marker: str, texts, device="cpu") -> "MarkerAutomaton":
        """From each token's text (index = token id)."""
        return cls(marker, torch.from_numpy(transition_table(marker, list(texts)))).to(device)

    @classmethod
    def from_ids(cls, ids, vocab_size: int, device="cpu") -> "MarkerAutomaton":
        """Of a marker given as token ids (no tokenizer): accepted when these ids appear in a
        row, exactly. Each distinct id stands for one private-use character, every other token
        for a character outside the marker."""
        ids = [int(i) for i in ids]
        if not ids or min(ids) < 0:
            raise InvalidInputError(f"marker ids: expected non-negative token ids, got {ids}")
        chars = {v: chr(0xE000 + r) for r, v in enumerate(dict.fromkeys(ids))}
        texts = [chars.get(v, "\0") for v in range(max(int(vocab_size), max(ids) + 1))]
        return cls.from_texts("".join(chars[i] for i in ids), texts, device)

    @classmethod
    def from_tokenizer(cls, tokenizer, marker: str = "<answer>", device="cpu") -> "MarkerAutomaton":
        """From a Hugging Face tokenizer: every id in 0..len(tokenizer)-1 decoded on its own."""
        ids = [[i] for i in range(len(tokenizer))]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        return cls.from_texts(marker, texts, device)

    @property
    def accept(self) -> int:
        return len(self.marker)

    @property
    def vocab_size(self) -> int:
        return self.table.shape[1]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def to(self, device) -> "MarkerAutomaton":
        self.table = self.table.to(device)
        return self

    def initial(self, shape=(), device=None) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int32, device=device or self.device)

    def step(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The states after one token each (same shape; a gather, no host sync)."""
        tokens = tokens.to(self.device)
        inside = (tokens >= 0) & (tokens < self.vocab_size)
        nxt = self.table[states.long(), torch.where(inside, tokens, 0).long()]
        return torch.where(inside, nxt, states.to(torch.int32))

    def accepted(self, states: torch.Tensor) -> torch.Tensor:
        return states == self.accept

    def run(self, tokens) -> torch.Tensor:
        """States after each token of a [T] (or [R, T]) sequence: [T] ([R, T]). For tests and
        for catching up on a whole prefix."""
        tokens = torch.as_tensor(tokens, device=self.device)
        out = torch.empty(tokens.shape, dtype=torch.int32, device=self.device)
        s = self.initial(tokens.shape[:-1])
        for t in range(tokens.shape[-1]):
            s = out[..., t] = self.step(s, tokens[..., t])
        return out
