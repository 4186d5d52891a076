"""Held-out QA accuracy of a vision-language model on the embedded world (1 - accuracy = hallucination rate)."""

from __future__ import annotations

import torch

from mmalign.stats import mean_ci

from .data import CHOSEN, REJECTED
from .world import COLOURS, COUNTS, SHAPES, prompt_text

PROMPT = prompt_text("{question}")
"""The embedded model's prompt, with the question left to fill in."""
CHOICES = (tuple(COLOURS), (*SHAPES, "nothing"), COUNTS)
"""The answer words of each question kind: a 'choice' answer is the most likely word of the right kind."""


@torch.no_grad()
def greedy_answers(model, processor, rows: list[dict], batch_size: int = 64, choice: bool = False,
                   template: str = PROMPT) -> list[str]:
    """The first word each row's answer would start with under greedy decoding: argmax of the next-token logits after
    the prompt `template` (default '<image> question : Q answer :'; the world's answers are one word); with `choice`,
    the argmax over the words of the true answer's kind only (multiple choice)."""
    tok, answers = processor.tokenizer, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [template.format(question=r["question"]) for r in chunk]
        inputs = processor(images=[r["image"] for r in chunk], text=prompts, add_special_tokens=False, padding=True,
                           padding_side="left", return_tensors="pt")
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
        if choice:
            allowed = torch.full_like(logits, float("-inf"))
            for i, row in enumerate(chunk):
                words = next(kind for kind in CHOICES if row["answer"] in kind)
                allowed[i, tok.convert_tokens_to_ids(list(words))] = 0.0
            logits = logits + allowed
        answers += tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return answers


def correct(model, processor, rows: list[dict], batch_size: int = 64, choice: bool = False,
            template: str = PROMPT) -> list[float]:
    """Per row, 1.0 where the greedy answer (open, or multiple choice with `choice`) is the truth, else 0.0."""
    answers = greedy_answers(model, processor, rows, batch_size, choice, template)
    return [float(same_word(a, r["answer"])) for a, r in zip(answers, rows)]


def same_word(token: str, answer: str) -> bool:
    """Whether a token is the one-word answer, case aside and without a tokenizer's word-start mark (▁ or Ġ)."""
    return token.lstrip("▁Ġ ").lower() == answer.strip().lower()


def qa_accuracy(model, processor, rows: list[dict], batch_size: int = 64, choice: bool = False) -> dict[str, float]:
    """Share of rows answered right (open, or multiple choice with `choice`), as mean and 95% CI over rows."""
    return mean_ci(correct(model, processor, rows, batch_size, choice))


@torch.no_grad()
def preference_accuracy(model, pairs, batch_size: int = 64) -> dict[str, float]:
    """Share of held-out pairs (a `VisionPairs`) whose chosen answer the model scores above the rejected one,
    s(y_w | v, x) > s(y_l | v, x), as mean and 95% CI; 1 - it is the rate of preferring the hallucination."""
    from accelerate.utils import send_to_device

    from .data import collate_pairs
    from .scoring import sequence_scores

    model.eval()
    pad = pairs.processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    wins = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))], pad)
        scores = sequence_scores(model, send_to_device(batch, device))
        wins += (scores[:, CHOSEN] > scores[:, REJECTED]).float().tolist()
    return mean_ci(wins)
