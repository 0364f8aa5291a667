"""Curriculum = data order (METHOD.md section 4). `gream-fast tasks mix`.

The alignment rows and the CoT rows are shuffled with the seed; the alignment rows are split into three equal parts, and every part and
the CoT rows are cut into batches of 8. In parts 1 and 2, after alignment batch i of N the next
CoT batch is inserted with probability p_i = (i / N) * (R_left / N) * 1.5 (R_left: CoT batches
not yet placed), so reasoning grows in as alignment proceeds. CoT batches left after part 2 join
part 3, which is a full shuffle of its alignment rows and those leftovers.
SFT then reads the rows in this order, without shuffling.
"""
import random

BATCH = 8


def _batches(rows: list) -> list:
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def mix(align: list, reason: list, seed: int = 0) -> list:
    rng = random.Random(seed)
    align = list(align)
    rng.shuffle(align)
    reason = list(reason)
    rng.shuffle(reason)
    cot = _batches(reason)
    third = (len(align) + 2) // 3
    parts = [align[:third], align[third:2 * third], align[2 * third:]]
    out, next_cot = [], 0
    for part in parts[:2]:
        batches = _batches(part)
        n = len(batches)
        for i, batch in enumerate(batches):
            out.extend(batch)
            left = len(cot) - next_cot
            if left and rng.random() < (i / n) * (left / n) * 1.5:
                out.extend(cot[next_cot])
                next_cot += 1
    last = parts[2] + [r for b in cot[next_cot:] for r in b]
    rng.shuffle(last)
    return out + last


def read_rows(path) -> list:
    """Rows of a JSONL file as their raw lines (mixing only reorders them), each checked to be
    a JSON object with messages."""
    from gream_fast.errors import DataError
    from gream_fast.files import iter_jsonl

    rows = []
    for n, line, value in iter_jsonl(path):
        if not (isinstance(value, dict) and isinstance(value.get("messages"), list)):
            raise DataError(f"{path}:{n}: expected a JSON row with a 'messages' list")
        rows.append(line)
    return rows


def run(align_path, reason_path, out, seed: int = 0) -> int:
    from gream_fast.files import check_output, write_jsonl

    check_output(out, command="tasks mix", inputs=[align_path, reason_path], folder=False)
    rows = mix(read_rows(align_path), read_rows(reason_path), seed)
    write_jsonl(out, rows)
    return len(rows)
