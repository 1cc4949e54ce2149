"""Judges: offline stand-ins for the human labeler. ``judge(prompts, completions) -> scores`` (higher is better).

The judge labels preference pairs and measures the true gain on held-out prompts; PPO never sees it (it
optimises the *learned* reward model), so the gap between the two exposes reward hacking.
"""

from __future__ import annotations

import codeop
import functools
import importlib
import math
import warnings
from collections.abc import Callable, Sequence

from nanogpt4.errors import UserError

Judge = Callable[[Sequence[str], Sequence[str]], list[float]]


def _syntax_error(source: str, unfinished_ok: bool = False) -> Exception | None:
    """Why ``source`` does not parse (its first SyntaxError; a ValueError for NUL bytes, a RecursionError or
    MemoryError for absurd nesting), else None. ``compile`` only parses: nothing in the text is executed.

    ``unfinished_ok``: also None where CPython's parser says only that the input is unfinished (an open block,
    bracket or string), through ``codeop``, the interactive prompt's test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. are not the model's grade
            if unfinished_ok:
                codeop.compile_command(source, "<completion>", "exec")
            else:
                compile(source, "<completion>", "exec", dont_inherit=True)
        return None
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
        return e


def syntax_score(source: str) -> float:
    """1.0 if the source compiles; otherwise how far into it the first syntax error sits (fraction of its
    characters before the error), so a completion that breaks later scores higher and ties are rare."""
    if not source:
        return 0.0
    error = _syntax_error(source)
    if error is None:
        return 1.0
    if not isinstance(error, SyntaxError) or not error.lineno:  # unparseable as a whole: no position
        return 0.0
    lines = source.splitlines(keepends=True)
    position = sum(len(line) for line in lines[: error.lineno - 1]) + max(0, (error.offset or 1) - 1)
    return min(position / len(source), 0.999)


def valid_python_lines(text: str, unfinished_ok: bool = False) -> tuple[int, int]:
    """(n, total): the most whole lines from the start of ``text`` that parse as Python, and its number of
    lines. A sample cut off by its token limit ends mid-statement, so this asks how far it is Python, not
    whether all of it is. Text that starts indented (a prompt from inside a block) is parsed as an ``if`` body.

    ``unfinished_ok``: lines that are a valid start of a program count too (``def f(x):`` with no body yet, a
    docstring not yet closed), as the parser would accept more input after them; parsing whole, a sample cut
    inside its first function counts no line at all."""
    lines = text.splitlines(keepends=True)
    opener = "if 1:\n" if text.lstrip("\r\n")[:1] in (" ", "\t") else ""
    for n in range(len(lines), 0, -1):
        if _syntax_error(opener + "".join(lines[:n]), unfinished_ok) is None:
            return n, len(lines)
    return 0, len(lines)


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
    return checked_judge(fn, name)


def checked_judge(fn: Judge, name: str) -> Judge:
    """``fn`` with its scores checked: one finite number per completion. A judge returning fewer scores was read
    as the first ones (one score for 16 prompts gave a judge_sft of 1.0), NaN reached summary.json as NaN, and
    strings stopped the stage with numpy's traceback."""

    @functools.wraps(fn)
    def judge(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        scores = fn(prompts, completions)
        fix = "it must return one finite number per completion"
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError) as e:
            raise UserError(f"judge '{name}' returned {type(scores).__name__} {_short(scores)}: {fix} ({e})") from None
        if len(values) != len(completions):
            raise UserError(f"judge '{name}' returned {len(values)} scores for {len(completions)} completions: {fix}")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(f"judge '{name}' gave {values[bad]} to the completion {_short(completions[bad])}: {fix}")
        return values

    return judge


def _short(value: object, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n - 3] + "..."


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
