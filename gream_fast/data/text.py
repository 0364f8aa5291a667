"""Text cleaning for item fields (METHOD.md section 1)."""
import html
import re

MAX_FIELD_CHARS = 2000  # a field this long is boilerplate or a scrape error: dropped, not cut

_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_DROP = re.compile(r'["\r\n\t]+')
_SPACES = re.compile(r" {2,}")


def clean_text(value) -> str:
    """Unescape HTML, strip tags, drop double quotes and line breaks, end with exactly one
    period; a field of MAX_FIELD_CHARS or more becomes empty. Lists are joined with spaces;
    None and empty text give ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    text = html.unescape(str(value))
    text = _TAG.sub(" ", text)
    text = _DROP.sub(" ", text)
    text = _SPACES.sub(" ", text).strip().rstrip(".").rstrip()
    if not text:
        return ""
    text += "."
    return "" if len(text) >= MAX_FIELD_CHARS else text


def clean_label(value) -> str:
    """A short label (category, genre, brand): unescaped, single-spaced, no trailing period."""
    if value is None:
        return ""
    text = _SPACES.sub(" ", _DROP.sub(" ", _TAG.sub(" ", html.unescape(str(value))))).strip()
    return "" if len(text) >= MAX_FIELD_CHARS else text
