"""Held-out QA accuracy of a vision-language model on the embedded world (1 - accuracy = hallucination rate)."""

from __future__ import annotations

import torch

from mmalign.stats import mean_ci

from .world import prompt_text


@torch.no_grad()
def greedy_answers(model, processor, rows: list[dict], batch_size: int = 64) -> list[str]:
    """The first word each row's answer would start with under greedy decoding: argmax of the next-token logits after
    the prompt '<image> question : Q answer :' (the world's answers are one word)."""
    tok, answers = processor.tokenizer, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = processor(images=[r["image"] for r in chunk], text=[prompt_text(r["question"]) for r in chunk],
                           add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        device = next(model.parameters()).device
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1).logits[:, -1]
        answers += tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return answers


def qa_accuracy(model, processor, rows: list[dict], batch_size: int = 64) -> dict[str, float]:
    """Share of rows answered right, as mean and 95% CI over rows (`mmalign.stats.mean_ci`)."""
    answers = greedy_answers(model, processor, rows, batch_size)
    return mean_ci([float(a == r["answer"]) for a, r in zip(answers, rows)])
