"""RLHF data: SFT and preference jsonl, a chat template on reserved tokens, offline prompt sets, batching."""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt4.data.tokenizer import END, ROLE_TOKENS, Tokenizer
from nanogpt4.errors import UserError
from nanogpt4.utils import iter_jsonl_objects


@dataclass
class Example:
    prompt: str
    response: str
    # a chat's earlier assistant turns inside ``prompt``, as (start, end) character spans: SFT trains on them too
    replies: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str
    gap: float | None = None  # the judge's score difference, when a judge labelled the pair


def format_chat(messages: list[dict], where: str = "messages") -> Example:
    """All turns but the last assistant turn become the prompt (ending in ``<|assistant|>``); the earlier
    assistant turns in it are marked (``Example.replies``), so that SFT learns every reply, as it would from
    the conversation cut after each."""
    if not messages or not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs role (system|user|assistant) and string content")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply")
    prompt, replies = "", []
    for m in messages[:-1]:
        prompt += ROLE_TOKENS[m["role"]]
        if m["role"] == "assistant":
            replies.append((len(prompt), len(prompt) + len(m["content"]) + len(END)))
        prompt += m["content"] + END
    return Example(prompt + ROLE_TOKENS["assistant"], messages[-1]["content"] + END, tuple(replies))


def _rows(path: str | Path):
    for lineno, row in iter_jsonl_objects(path):
        yield f"{path}:{lineno}", row


def load_sft(path: str | Path) -> list[Example]:
    """``{"prompt", "response"}`` or ``{"messages": [...]}`` per line."""
    out = []
    for where, row in _rows(path):
        if "messages" in row:
            out.append(format_chat(row["messages"], where))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            out.append(Example(row["prompt"], row["response"]))
        else:
            raise UserError(f"{where}: expected {{\"prompt\", \"response\"}} strings or {{\"messages\": [...]}}")
    if not out:
        raise UserError(f"'{path}' holds no examples")
    return out


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_to_preference(chosen: str, rejected: str, where: str) -> Preference:
    """An Anthropic HH-RLHF row (two full transcripts sharing all but the last assistant turn) in our chat
    template: the shared turns become the prompt, the two final assistant turns the responses."""
    def turns(text: str) -> list[dict]:
        parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
        if len(parts) < 3 or parts[0].strip():
            raise UserError(f"{where}: not in the HH-RLHF layout ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
        role = {"Human": "user", "Assistant": "assistant"}
        return [{"role": role[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]

    c, r = turns(chosen), turns(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[:-1] != r[:-1]:
        raise UserError(f"{where}: chosen and rejected must share every turn but a final assistant reply")
    ex_c, ex_r = format_chat(c, where), format_chat(r, where)
    return Preference(ex_c.prompt, ex_c.response, ex_r.response)


def preference_from_row(row: dict, where: str) -> Preference:
    if all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
        gap = row.get("judge_gap")
        return Preference(row["prompt"], row["chosen"], row["rejected"],
                          float(gap) if isinstance(gap, int | float) and not isinstance(gap, bool) else None)
    if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        return hh_to_preference(row["chosen"], row["rejected"], where)
    raise UserError(f"{where}: expected string fields prompt, chosen and rejected (or HH-RLHF's chosen/rejected "
                    f"transcripts)")


def load_preferences(path: str | Path, max_rows: int | None = None, warn=None) -> list[Preference]:
    """Preference pairs from a jsonl file, or ``hf:NAME[:CONFIG]`` (e.g. ``hf:Anthropic/hh-rlhf``, streamed;
    a local dataset directory works offline). Pairs whose chosen and rejected are the same text are skipped (and
    ``warn`` told how many, stderr by default): they state no preference, give DPO and the reward model a
    constant loss, and count as a miss in the held-out accuracy (HH-RLHF has such rows)."""
    out = []
    same = 0
    spec = str(path)
    if spec.startswith("hf:"):
        from nanogpt4.data.sources import hf_rows

        rows = ((f"{spec} row {i}", row) for i, row in enumerate(hf_rows(spec[3:], "preference data")))
    else:
        rows = _rows(path)
    for where, row in rows:
        pair = preference_from_row(row, where)
        if pair.chosen == pair.rejected:
            same += 1
            continue
        out.append(pair)
        if max_rows is not None and len(out) >= max_rows:
            break
    said = f"{same} pair(s) whose chosen and rejected responses are the same text"
    if not out:
        raise UserError(f"'{path}' holds no preference pairs" + (f" (only {said})" if same else ""))
    if same:
        (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: '{path}': skipped {said}: they state no "
                                                        f"preference (kept {len(out)})")
    return out


def load_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """(rollout prompts, held-out prompts) from a jsonl: a row's ``prompt``, the prompt of its ``messages`` or
    of an HH-RLHF pair, so a preference or SFT file serves as it is. Repeated prompts count once; every 10th
    of them is held out for evaluation."""
    prompts: dict[str, None] = {}
    for where, row in _rows(path):
        if isinstance(row.get("prompt"), str):
            prompts[row["prompt"]] = None
        elif "messages" in row:
            prompts[format_chat(row["messages"], where).prompt] = None
        elif isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            prompts[preference_from_row(row, where).prompt] = None
        else:
            raise UserError(f"{where}: expected a string field prompt (or messages, or HH-RLHF's chosen/rejected)")
    found = list(prompts)
    if len(found) < 2:
        raise UserError(f"'{path}' holds {len(found)} distinct prompt(s); PPO needs at least 2 (one is held out)")
    return [p for i, p in enumerate(found) if i % 10], found[::10]


def code_completion_examples(docs: list[str], n: int, seed: int, prompt_lines: tuple[int, int] = (3, 8),
                             response_lines: tuple[int, int] = (1, 3), require_valid: bool = True) -> list[Example]:
    """Real code tasks from a corpus: the first lines of a function as the prompt, the next lines as response.

    Windows are dedented to the ``def`` line; with ``require_valid`` only windows whose true continuation makes
    valid Python are kept, so a perfect completion exists for every prompt.
    """
    from nanogpt4.rlhf.judges import syntax_score

    rng = random.Random(seed)
    starts = []
    for di, doc in enumerate(docs):
        lines = doc.splitlines(keepends=True)
        starts += [(di, i) for i, line in enumerate(lines) if line.lstrip().startswith("def ")]
    if not starts:
        raise UserError("the corpus has no function definitions ('def' lines) for the python-syntax judge's code "
                        "prompts; for other text give rlhf.judge=sentiment or a module:function judge, whose "
                        "prompts are the text's own lines")
    out = []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        di, i = rng.choice(starts)
        lines = docs[di].splitlines(keepends=True)
        k, r = rng.randint(*prompt_lines), rng.randint(*response_lines)
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        window = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip(" ") for ln in lines[i:i + k + r]]
        prompt, response = "".join(window[:k]), "".join(window[k:])
        if not prompt.strip() or not response.strip():
            continue
        if require_valid and syntax_score(prompt + response) < 1.0:
            continue
        out.append(Example(prompt, response))
    return out


def example_tokens(tok: Tokenizer, ex: Example) -> tuple[list[int], list[int], list[int]]:
    """The prompt's tokens (an empty one: the document start, nanogpt4's EOT or an imported model's <s>), their
    labels (-100 but on ``ex.replies``) and the response's tokens, the end token included. A chat's replies are
    encoded apart from the turns around them: with nanogpt4's BPE the same tokens (its role and end markers are
    special tokens, which split the text)."""
    ids, labels, at = [], [], 0
    for start, end in (*ex.replies, (len(ex.prompt), len(ex.prompt))):
        for text, learned in ((ex.prompt[at:start], False), (ex.prompt[start:end], True)):
            t = tok.encode(text) if text else []
            ids += t
            labels += t if learned else [-100] * len(t)
        at = end
    if not ids:
        ids, labels = [tok.doc_start_id], [-100]
    return ids, labels, tok.encode(ex.response) + [tok.eot_id]


def encode_example(tok: Tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the response learned, the prompt masked (-100) but for a chat's earlier replies.
    Over-long prompts keep their last tokens, over-long responses their first (``cut_examples`` counts them)."""
    p, p_labels, r = example_tokens(tok, ex)
    r = r[: max_len - 1]
    if len(p) + len(r) > max_len:
        p, p_labels = p[len(p) + len(r) - max_len:], p_labels[len(p) + len(r) - max_len:]
    return p + r, p_labels + r


def cut_examples(tok: Tokenizer, examples: Iterable[Example], max_len: int) -> int:
    """How many of ``examples`` ``encode_example`` cuts to fit ``max_len`` tokens."""
    return sum(len(p) + len(r) > max_len for p, _, r in (example_tokens(tok, ex) for ex in examples))


def warn_cut(tok: Tokenizer, examples: list[Example], max_len: int, what: str, warn) -> None:
    """Say (through ``warn``) how many examples of a user's file do not fit the context, not cut them silently."""
    n = cut_examples(tok, examples, max_len)
    if n:
        warn(f"warning: {n} of {len(examples)} {what} do not fit the model's context (model.max_seq_len): their "
             f"prompts keep their last tokens and their responses their first, a cut response without its end "
             f"token; shorten them or train a model with a longer context")


def warn_long_prompts(tok: Tokenizer, prompts: list[str], room: int, warn) -> None:
    """PPO's prompts keep their last ``room`` tokens (the context less the response's): say how many are cut."""
    n = sum(len(tok.encode(p)) > room for p in prompts)
    if n:
        warn(f"warning: {n} of {len(prompts)} prompts are longer than the {room} tokens the context leaves before "
             f"a response (model.max_seq_len - rlhf.max_new_tokens): they keep their last {room} tokens")


def pad_right(seqs: list[list[int]], value: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def pad_left(seqs: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[value] * (width - len(s)) + s for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask
