"""Judges: offline stand-ins for the human labeler. ``judge(prompts, completions) -> scores`` (higher is better).

The judge labels preference pairs and measures the true gain on held-out prompts; PPO never sees it (it
optimises the *learned* reward model), so the gap between the two exposes reward hacking.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence

from nanogpt4.errors import UserError

Judge = Callable[[Sequence[str], Sequence[str]], list[float]]


def syntax_score(source: str) -> float:
    """1.0 if the source compiles; otherwise how far into it the first syntax error sits (fraction of its
    characters before the error), so a completion that breaks later scores higher and ties are rare.

    ``compile`` only parses: nothing in the text is executed.
    """
    if not source:
        return 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. are not the model's grade
            compile(source, "<completion>", "exec", dont_inherit=True)
        return 1.0
    except SyntaxError as e:
        if not e.lineno:
            return 0.0
        lines = source.splitlines(keepends=True)
        position = sum(len(line) for line in lines[: e.lineno - 1]) + max(0, (e.offset or 1) - 1)
        return min(position / len(source), 0.999)
    except (ValueError, RecursionError, MemoryError):  # NUL bytes, absurd nesting
        return 0.0


def python_syntax(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Prefers completions that make prompt + completion valid Python, then those that fail later."""
    return [syntax_score(p + c) for p, c in zip(prompts, completions, strict=True)]


_vader = None


def sentiment(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER compound sentiment of the completion, in [-1, 1]: prefers the more positive text."""
    global _vader
    if _vader is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError("the sentiment judge needs vaderSentiment: pip install vaderSentiment") from None
        _vader = SentimentIntensityAnalyzer()
    return [_vader.polarity_scores(c)["compound"] for c in completions]


BUILTIN: dict[str, Judge] = {"python-syntax": python_syntax, "sentiment": sentiment}


def load_judge(name: str) -> Judge:
    """A built-in judge name or ``module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, attr = name.partition(":")
    if not attr:
        raise UserError(f"unknown judge '{name}'; use {', '.join(BUILTIN)} or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load judge '{name}': {e}") from None
    if not callable(fn):
        raise UserError(f"judge '{name}' is not callable")
    return fn


def label_pairs(judge: Judge | None, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                min_gap: float = 1e-6, scores: tuple[Sequence[float], Sequence[float]] | None = None,
                ) -> list[tuple[str, str, str, float]]:
    """(prompt, chosen, rejected, score gap) for every pair the judge separates; ties are dropped.
    ``scores`` passes the judge's scores of ``a`` and ``b`` when they are already known."""
    sa, sb = scores if scores is not None else (judge(prompts, a), judge(prompts, b))
    out = []
    for p, x, y, s, t in zip(prompts, a, b, sa, sb, strict=True):
        if abs(s - t) > min_gap and x != y:
            out.append((p, x, y, s - t) if s > t else (p, y, x, t - s))
    return out
