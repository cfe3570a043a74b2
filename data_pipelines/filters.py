"""Document quality filters, in a registry: ``data.filters: {NAME: {param: value}}`` switches
filter NAME on (in the order given) with its parameters; every drop is counted per filter in the
manifest's ``sources.*.filtered``. The length filter (``data.min_chars``/``max_chars``) always runs first.

Add one: a dataclass of parameters with defaults, registered under a name; ``__call__(text)``
returns the (possibly edited) text, or ``None`` to drop the document::

    @FILTERS.register("no_digits")
    @dataclass
    class NoDigits:
        max_frac: float = 0.3
        def __call__(self, text): return None if sum(c.isdigit() for c in text) > self.max_frac * len(text) else text

The heuristics follow Gopher (Rae et al. 2021, App. A), C4 (Raffel et al. 2020, Sec. 2.2) and
FineWeb (Penedo et al. 2024); thresholds default to the papers'.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megadiff import MegadiffError
from megadiff.registry import Registry

FILTERS: Registry[Any] = Registry("quality filter")

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_BULLETS = ("•", "-", "*", "·", "‣", "◦")
_END_PUNCT = (".", "!", "?", '"', "'", "”", "’")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def build_filters(spec: Any, min_chars: int, max_chars: int) -> list[tuple[str, Callable[[str], Optional[str]]]]:
    """``[(name, filter)]``: the length filter, then ``spec``'s filters in order (unknown names and
    parameters raise MegadiffError naming the key)."""
    out: list[tuple[str, Callable[[str], Optional[str]]]] = [("length", Length(min_chars, max_chars))]
    for name, params in dict(spec or {}).items():
        cls = FILTERS.get(name) if name in FILTERS else None
        if cls is None:
            raise MegadiffError(f"unknown filter data.filters.{name}; allowed: {', '.join(FILTERS.names())}")
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(params) - known)
        if bad:
            raise MegadiffError(f"data.filters.{name}: unknown parameter(s) {', '.join(bad)}; "
                                f"allowed: {', '.join(sorted(known))}")
        out.append((name, cls(**params)))
    return out


def apply_filters(filters: list[tuple[str, Callable[[str], Optional[str]]]], text: str) -> tuple[Optional[str], str]:
    """Run ``filters`` in order -> (text or None, name of the filter that dropped it or "")."""
    for name, f in filters:
        out = f(text)
        if out is None:
            return None, name
        text = out
    return text, ""


@dataclass
class Length:
    min_chars: int = 1
    max_chars: int = 10_000_000

    def __call__(self, text: str) -> Optional[str]:
        return text if self.min_chars <= len(text) <= self.max_chars else None


def _frac(n: int, d: int) -> float:
    return n / d if d else 0.0


@FILTERS.register("gopher_quality")
@dataclass
class GopherQuality:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8  # words with at least one letter
    min_stop_words: int = 2

    def __call__(self, text: str) -> Optional[str]:
        words = text.split()
        n = len(words)
        if not self.min_words <= n <= self.max_words:
            return None
        if not self.min_mean_word_len <= sum(map(len, words)) / n <= self.max_mean_word_len:
            return None
        if _frac(text.count("#") + text.count("...") + text.count("…"), n) > self.max_symbol_word_ratio:
            return None
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if _frac(sum(ln.startswith(_BULLETS) for ln in lines), len(lines)) > self.max_bullet_lines:
            return None
        if _frac(sum(ln.endswith(("...", "…")) for ln in lines), len(lines)) > self.max_ellipsis_lines:
            return None
        if _frac(sum(any(c.isalpha() for c in w) for w in words), n) < self.min_alpha_words:
            return None
        if sum(w.lower() in _STOP_WORDS for w in words) < self.min_stop_words:
            return None
        return text


def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in such items)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    return _frac(dup, len(items)), _frac(dup_chars, sum(map(len, items)))


@FILTERS.register("gopher_repetition")
@dataclass
class GopherRepetition:
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    top_ngram_max: list = field(default_factory=lambda: [0.20, 0.18, 0.16])  # n = 2, 3, 4
    dup_ngram_max: list = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # n = 5..10

    def __call__(self, text: str) -> Optional[str]:
        lf, lc = _dup_fracs([ln for ln in text.split("\n") if ln.strip()])
        pf, pc = _dup_fracs([p for p in re.split(r"\n{2,}", text) if p.strip()])
        if lf > self.max_dup_line_frac or lc > self.max_dup_line_char_frac:
            return None
        if pf > self.max_dup_para_frac or pc > self.max_dup_para_char_frac:
            return None
        words = _WORD.findall(text.lower())
        chars = sum(map(len, words))
        for n, lim in enumerate(self.top_ngram_max, start=2):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            if grams:
                gram, count = grams.most_common(1)[0]
                if count > 1 and _frac(count * sum(map(len, gram)), chars) > lim:
                    return None
        for n, lim in enumerate(self.dup_ngram_max, start=5):
            if _dup_ngram_char_frac(words, n, chars) > lim:
                return None
        return text


def _dup_ngram_char_frac(words: list[str], n: int, chars: int) -> float:
    """Fraction of word characters covered by n-grams that occur more than once."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    return _frac(sum(len(w) for w, c in zip(words, covered) if c), chars)


@FILTERS.register("c4")
@dataclass
class C4:
    """Line filters (lines kept only if they end in terminal punctuation, have >= min_words_per_line
    words, and mention neither javascript nor a site policy), then page filters (>= min_sentences,
    no 'lorem ipsum', no '{' when drop_curly_bracket)."""

    min_words_per_line: int = 3
    min_sentences: int = 5
    drop_curly_bracket: bool = True

    def __call__(self, text: str) -> Optional[str]:
        low = text.lower()
        if "lorem ipsum" in low or (self.drop_curly_bracket and "{" in text):
            return None
        kept = []
        for line in text.split("\n"):
            s = line.strip()
            ls = s.lower()
            if not s.endswith(_END_PUNCT) or s.endswith("..."):
                continue
            if len(s.split()) < self.min_words_per_line or "javascript" in ls or any(p in ls for p in _C4_POLICY):
                continue
            kept.append(s)
        out = "\n".join(kept)
        if len(re.findall(r"[.!?]+(?:\s|$)", out)) < self.min_sentences:
            return None
        return out


@FILTERS.register("fineweb")
@dataclass
class FineWeb:
    min_line_punct_frac: float = 0.12  # lines ending in terminal punctuation
    max_short_line_frac: float = 0.67  # lines of <= short_line_chars characters
    short_line_chars: int = 30
    max_dup_line_char_frac: float = 0.01
    max_newline_per_word: float = 0.3

    def __call__(self, text: str) -> Optional[str]:
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return None
        if _frac(sum(ln.endswith(_END_PUNCT) for ln in lines), len(lines)) < self.min_line_punct_frac:
            return None
        if _frac(sum(len(ln) <= self.short_line_chars for ln in lines), len(lines)) > self.max_short_line_frac:
            return None
        if _dup_fracs(lines)[1] > self.max_dup_line_char_frac:
            return None
        if _frac(text.count("\n"), len(text.split())) > self.max_newline_per_word:
            return None
        return text
