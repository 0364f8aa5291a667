"""Chat formatting for SFT: rows of messages -> token ids with the loss on the response only,
left truncation of the user's history, batch collation, and packing into fixed-length rows.

A row is `{"task": ..., "messages": [{"role": "system", ...}?, {"role": "user", ...},
{"role": "assistant", ...}]}`; the last message is the response that is trained on.
"""
import itertools
import re

import numba
import numpy as np
import torch

from gream_fast.errors import InvalidInputError

IGNORE_INDEX = -100  # label of tokens without loss (torch's cross_entropy default)

# ChatML, the Qwen format, for tokenizers without a chat template of their own. No default system
# prompt: rows carry their own. Raw strings, so Jinja (not Python) reads the \n escapes.
CHATML_TEMPLATE = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# A history entry is a SID written as consecutive special tokens (<|a_1|><|b_2|><|c_3|>); the
# history is a run of entries joined by ", " (METHOD.md section 3).
SID_ENTRY = r"(?:<\|[^|<>]*\|>)+"
HISTORY_SEP = ", "


class ChatEncoder:
    """Turns SFT rows into `{"input_ids", "labels"}` with `tokenizer`'s chat template (ChatML when
    it has none). Rows longer than `max_length` lose the oldest part of their last user message
    (`truncate="left"`) or raise (`truncate="error"`); `num_truncated` counts the rows cut."""

    def __init__(self, tokenizer, max_length: int = 2048, chat_template: str | None = None,
                 truncate: str = "left", *, history_sep: str = HISTORY_SEP,
                 history_entry: str = SID_ENTRY):
        if truncate not in ("left", "error"):
            raise InvalidInputError(f"truncate: expected 'left' or 'error', got {truncate!r}")
        if max_length < 1:
            raise InvalidInputError(f"max_length: expected >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.chat_template = (chat_template or getattr(tokenizer, "chat_template", None)
                              or CHATML_TEMPLATE)
        _require_single_tokens(tokenizer, [t for t in CHATML_TOKENS if t in self.chat_template])
        self._entry = re.compile(history_entry)
        self._history = re.compile(f"{history_entry}(?:{re.escape(history_sep)}{history_entry})+")
        # Any padding id works: padded positions are masked out and labelled IGNORE_INDEX.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                            if i is not None), 0)
        self._added, self._vocab_size = set(), -1
        self.eot_id = self._end_of_turn_id()
        self.num_truncated = 0

    # -- public API ---------------------------------------------------------------------------
    def encode(self, row: dict, index: int = 0) -> dict:
        """One row -> {"input_ids": list[int], "labels": list[int]}; `index` names it in errors."""
        return self.encode_many([row], start=index)[0]

    def encode_many(self, rows, start: int = 0, names=None) -> list[dict]:
        """Rows -> examples, tokenized in batches. Errors name row i by names[i] (e.g. its
        file:line), by default "row {start + i}"."""
        self._refresh_added()
        names = names or [f"row {i}" for i in range(start, start + len(rows))]
        convs = [_messages(row, name) for name, row in zip(names, rows)]
        texts = [self._render(msgs, name) for name, (msgs, _) in zip(names, convs)]
        pairs = self._tokenize_pairs([p for p, _ in texts], [r for _, r in texts], names)
        out = []
        for name, (msgs, user), (_, response_text), (prompt, response) in zip(
                names, convs, texts, pairs):
            if len(prompt) + len(response) > self.max_length:
                prompt_text = self._truncated_prompt(msgs, user, len(prompt), len(response), name)
                prompt, response = self._tokenize_pairs([prompt_text], [response_text], [name])[0]
                self.num_truncated += 1
            out.append({"input_ids": prompt + response, "labels": self._labels(prompt, response)})
        return out

    def collate(self, examples, pad_to_multiple_of: int | None = None) -> dict:
        """`collate` with this tokenizer's padding id."""
        return collate(examples, self.pad_id, pad_to_multiple_of)

    def pack(self, examples, seq_len: int) -> dict:
        """`pack` with this tokenizer's padding id."""
        return pack(examples, seq_len, self.pad_id)

    # -- rendering and tokenization -----------------------------------------------------------
    def _render(self, messages, name) -> tuple[str, str]:
        """Prompt text (up to the generation prompt) and response text of one conversation."""
        kw = dict(tokenize=False, chat_template=self.chat_template)
        prompt = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, **kw)
        full = self.tokenizer.apply_chat_template(messages, **kw)
        if not full.startswith(prompt):
            raise InvalidInputError(
                f"{name}: the chat template renders the conversation so that it does not "
                "start with the rendered prompt (add_generation_prompt=True); cannot tell the "
                "response apart")
        return prompt, full[len(prompt):]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # The template writes BOS and the like itself where the model wants them.
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: skip the wrapper's offsets, ~2x faster
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenize_pairs(self, prompts, responses, names) -> list[tuple[list[int], list[int]]]:
        """Prompt and response ids, tokenized apart yet equal to the tokens of prompt + response.

        Tokenizers cut added (special) tokens out of the text before BPE, so a merge across the
        boundary can only happen in the prompt's tail after its last added token ("assistant\\n"
        in ChatML). The response is tokenized together with that short tail, and the tail's ids
        must come out unchanged: then no merge crossed the boundary."""
        prompt_ids = self._tokenize(prompts)
        tails = [self._tail(text, ids) for text, ids in zip(prompts, prompt_ids)]
        joined = self._tokenize([tail + r for (tail, _), r in zip(tails, responses)])
        out = []
        rows = zip(prompt_ids, tails, joined, responses)
        for name, (ids, (_, k), both, response) in zip(names, rows):
            if both[:k] != ids[len(ids) - k:]:
                raise InvalidInputError(
                    f"{name}: a BPE merge crosses the prompt/response boundary (response text "
                    f"starts {response[:20]!r}); strip leading whitespace from the response, or "
                    "use a chat template whose generation prompt ends at a token boundary")
            out.append((ids, both[k:]))
        return out

    def _refresh_added(self):
        # Ids the tokenizer cuts out of the text before BPE; re-read when tokens were added since
        # (SID tokens), as reading them costs ~2 ms.
        if len(self.tokenizer) != self._vocab_size:
            self._added = set(self.tokenizer.added_tokens_decoder)
            self._vocab_size = len(self.tokenizer)

    def _tail(self, text: str, ids: list[int]) -> tuple[str, int]:
        """The prompt's text after its last added token, and how many of its ids that text holds."""
        k = next((k for k in range(len(ids)) if ids[-1 - k] in self._added), len(ids))
        if k == len(ids):
            return text, k
        token = self.tokenizer.convert_ids_to_tokens(ids[-1 - k])
        at = text.rfind(token)
        if at < 0:  # the text spells the token differently (a normalizer): use the whole prompt
            return text, len(ids)
        return text[at + len(token):], k

    def _labels(self, prompt: list[int], response: list[int]) -> list[int]:
        # The loss covers the response through its end-of-turn token: the model must learn to
        # emit <|im_end|>, the token generation stops on. What the template writes after it
        # (ChatML's "\n") is framing the model never has to produce.
        end = len(response)
        if self.eot_id in response:
            end -= response[::-1].index(self.eot_id)
        tail = [IGNORE_INDEX] * (len(response) - end)
        return [IGNORE_INDEX] * len(prompt) + response[:end] + tail

    def _end_of_turn_id(self) -> int | None:
        """The first added token the template writes after an assistant message's content."""
        self._refresh_added()
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "PROBE"}]
        _, response = self._render(probe, "probe")
        after = self._tokenize([response[response.rindex("PROBE") + len("PROBE"):]])[0]
        return next((i for i in after if i in self._added), None)

    # -- truncation ---------------------------------------------------------------------------
    def _truncated_prompt(self, messages, user, prompt_len, response_len, name) -> str:
        """The prompt text with the user message cut from the left until the row fits: whole
        history entries first (oldest first, the newest is kept), then tokens. The response and
        the template's framing are never cut."""
        if self.truncate == "error":
            raise InvalidInputError(
                f"{name}: {prompt_len} prompt + {response_len} response tokens exceed "
                f"max_length={self.max_length}")
        budget = self.max_length - response_len

        def render(content):
            msgs = list(messages)
            msgs[user] = {**messages[user], "content": content}
            return self._render(msgs, name)[0]

        def fits(content):
            return len(self._tokenize([render(content)])[0]) <= budget

        if not fits(""):
            framing = len(self._tokenize([render("")])[0])
            raise InvalidInputError(
                f"{name}: does not fit max_length={self.max_length} even with an empty user "
                f"message: {framing} prompt tokens of template and other messages + "
                f"{response_len} response tokens")
        content = messages[user]["content"]
        run = max(self._history.finditer(content), key=lambda m: m.end() - m.start(), default=None)
        if run is not None:
            starts = [m.start() for m in self._entry.finditer(content, run.start(), run.end())]
            # content with the k + 1 oldest entries (and their separators) removed
            drop = lambda k: content[:run.start()] + content[starts[k + 1]:]  # noqa: E731
            k = _first_true(len(starts) - 1, lambda k: fits(drop(k)))
            if k is not None:
                return render(drop(k))
            content = drop(len(starts) - 2)
        enc = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
        cuts = [a for a, _ in enc["offset_mapping"][1:]] + [len(content)]
        j = _first_true(len(cuts), lambda j: fits(content[cuts[j]:]))
        return render(content[cuts[j]:])  # the last cut leaves "", which fits


def _messages(row, name) -> tuple[list[dict], int]:
    """A row's messages, checked, and the position of the last user message."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise InvalidInputError(f"{name}: expected 'messages', a list with at least a user "
                                "and an assistant message")
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise InvalidInputError(f"{name}: messages[{j}]: expected {{'role': str, "
                                    f"'content': str}}, got {m!r:.80}")
    if msgs[-1]["role"] != "assistant":
        raise InvalidInputError(f"{name}: the last message must be the assistant's response, "
                                f"got role {msgs[-1]['role']!r}")
    user = next((j for j in range(len(msgs) - 2, -1, -1) if msgs[j]["role"] == "user"), None)
    if user is None:
        raise InvalidInputError(f"{name}: no user message before the response")
    return msgs, user


def _require_single_tokens(tokenizer, tokens):
    """Each of `tokens` must encode to one id, or the template's framing would be split by BPE."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab
               or tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]]
    if missing:
        raise InvalidInputError(
            f"tokenizer has no special token {', '.join(map(repr, missing))} needed by the chat "
            "template: add it with tokenizer.add_special_tokens({'additional_special_tokens': "
            "[...]}), or pass chat_template=")


def _first_true(n: int, pred) -> int | None:
    """Smallest i in [0, n) with pred(i), for pred monotone (False... True...); None if none."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < n else None


# -- batches ----------------------------------------------------------------------------------
def collate(examples, pad_id: int = 0, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded batch: input_ids (pad_id), labels (IGNORE_INDEX), attention_mask; [B, T]
    int64, T the longest example rounded up to a multiple of `pad_to_multiple_of`."""
    if not examples:
        raise InvalidInputError("collate: expected at least one example")
    lengths = [_length(e, i) for i, e in enumerate(examples)]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _length(example, index) -> int:
    n = len(example["input_ids"])
    if len(example["labels"]) != n:
        raise InvalidInputError(
            f"example {index}: {n} input_ids but {len(example['labels'])} labels")
    return n


def pack(examples, seq_len: int, pad_id: int = 0) -> dict:
    """Examples packed into rows of `seq_len` tokens, greedily in order (see `pack_arrays`);
    the arrays as torch tensors, `max_seqlen` as an int."""
    lengths = np.fromiter((_length(e, i) for i, e in enumerate(examples)), np.int64, len(examples))
    offsets = np.zeros(len(examples) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = lambda key: np.fromiter(  # noqa: E731
        itertools.chain.from_iterable(e[key] for e in examples), np.int64, int(offsets[-1]))
    packed = pack_arrays(flat("input_ids"), flat("labels"), offsets, seq_len, pad_id)
    return {k: v if k == "max_seqlen" else torch.from_numpy(v) for k, v in packed.items()}


def pack_arrays(tokens, labels, offsets, seq_len: int, pad_id: int = 0) -> dict:
    """Packs examples given as flat arrays (example i is tokens[offsets[i]:offsets[i + 1]]).

    Greedy in order (next fit): an example goes into the current row when it fits, else it starts
    a new row. Nothing is reordered, so rows keep the curriculum order SFT reads them in
    (METHOD.md section 4); first-fit-decreasing would pad less but shuffle the curriculum.
    Returns numpy arrays:
      input_ids, labels, position_ids, seq_ids: [S, seq_len] int64. Positions restart at 0 for
        each example; seq_ids holds the example's index, -1 on padding (labels IGNORE_INDEX).
      cu_seqlens: int32 boundaries of the segments in the flattened [S * seq_len] tokens, as
        flash-attn's varlen functions take them; the padding at a row's end is a segment of its
        own (positions 0, 1, ...), so the boundaries cover every token.
      max_seqlen: the longest segment, an int.
    Attention stays within an example with these boundaries (varlen attention) or with the mask
    `seq_ids[:, :, None] == seq_ids[:, None, :]` and causal (see `block_causal_mask`)."""
    tokens, labels = np.asarray(tokens, np.int64), np.asarray(labels, np.int64)
    offsets = np.asarray(offsets, np.int64)
    if seq_len < 1:
        raise InvalidInputError(f"seq_len: expected >= 1, got {seq_len}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != tokens.size \
            or labels.shape != tokens.shape:
        raise InvalidInputError(
            f"pack: expected offsets from 0 to len(tokens)={tokens.size} and labels shaped like "
            f"tokens, got offsets[0]={offsets[:1]}, offsets[-1]={offsets[-1:]}, labels "
            f"{list(labels.shape)}")
    lengths = np.diff(offsets)
    bad = np.flatnonzero((lengths < 1) | (lengths > seq_len))
    if bad.size:
        raise InvalidInputError(f"pack: example {bad[0]} has {lengths[bad[0]]} tokens; expected "
                                f"1..seq_len={seq_len} (long examples are not cut here)")
    ids, lab, pos, seq, cu = _pack_kernel(tokens, labels, offsets, seq_len, pad_id)
    if cu[-1] >= 2**31:
        raise InvalidInputError(f"pack: {cu[-1]} packed tokens; cu_seqlens is int32, pack fewer")
    max_seqlen = int(np.diff(cu).max()) if cu.size > 1 else 0
    cu = cu.astype(np.int32)
    return {"input_ids": ids, "labels": lab, "position_ids": pos, "seq_ids": seq,
            "cu_seqlens": cu, "max_seqlen": max_seqlen}


@numba.njit(cache=True)
def _pack_kernel(tokens, labels, offsets, seq_len, pad_id):
    n = offsets.shape[0] - 1
    # pass 1: row and starting column of each example, greedily in order
    row = np.empty(n, np.int64)
    col = np.empty(n, np.int64)
    r, used = 0, 0
    for i in range(n):
        length = offsets[i + 1] - offsets[i]
        if used + length > seq_len:
            r, used = r + 1, 0
        row[i], col[i] = r, used
        used += length
    rows = r + 1 if n > 0 else 0
    # pass 2: copy tokens, number positions, close each row with its padding segment; every
    # element is written once (the arrays are large and filling them first would double that)
    ids = np.empty((rows, seq_len), np.int64)
    lab = np.empty((rows, seq_len), np.int64)
    pos = np.empty((rows, seq_len), np.int64)
    seq = np.empty((rows, seq_len), np.int64)
    cu = np.zeros(n + rows + 1, np.int64)
    k = 0
    for i in range(n):
        r, c, start = row[i], col[i], offsets[i]
        length = offsets[i + 1] - start
        for t in range(length):
            ids[r, c + t] = tokens[start + t]
            lab[r, c + t] = labels[start + t]
            pos[r, c + t] = t
            seq[r, c + t] = i
        end = c + length
        k += 1
        cu[k] = r * seq_len + end
        if (i == n - 1 or row[i + 1] != r) and end < seq_len:
            for t in range(seq_len - end):
                ids[r, end + t] = pad_id
                lab[r, end + t] = -100
                pos[r, end + t] = t
                seq[r, end + t] = -1
            k += 1
            cu[k] = (r + 1) * seq_len
    return ids, lab, pos, seq, cu[:k + 1]


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[S, 1, T, T] bool mask for SDPA over packed rows: causal, and within one example (padding,
    seq_id -1, attends to padding only, so no row of the mask is empty)."""
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(seq_ids.shape[1], seq_ids.shape[1], dtype=torch.bool,
                        device=seq_ids.device).tril()
    return (same & causal)[:, None]
