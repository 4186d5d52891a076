"""Build the embedded tiny LLaVA (`assets/tiny-llava`): a tiny LlavaForConditionalGeneration pretrained briefly on the
synthetic visual QA world, so that it answers, but hallucinates on a share of held-out questions.

    python scripts/build_tiny_llava.py --output assets/tiny-llava

The hallucinations come from a language prior, as in real VLMs: in 90% of the training scenes every shape has its
usual colour (`world.PRIOR`: red squares, blue circles, green triangles), so the model learns to answer "what colour
is the square ?" with "red" half-looking; the held-out questions are about unbiased scenes. 32 px images in 16 px
patches (one image token per cell of the world's 2x2 grid), a 2-layer CLIP tower of width 64 and a 2-layer Llama of
width 64. Next-token cross-entropy on the answer tokens only (' red </s>') given the image and question; AdamW
(lr 3e-4, 50 warm-up steps), batch 64, 1500 steps, fresh scenes every step. About three minutes on two CPU cores;
prints the held-out accuracy with its 95% CI (0.73 [0.69, 0.77] on 500 questions for the shipped model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmalign.vision.evaluate import qa_accuracy
from mmalign.vision.tiny import tiny_llava
from mmalign.vision.world import prompt_text, qa_rows


def answer_batch(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Inputs with labels on each row's answer tokens only (-100 elsewhere)."""
    texts = [prompt_text(r["question"]) + f" {r['answer']} </s>" for r in rows]
    batch = processor(images=[r["image"] for r in rows], text=texts, add_special_tokens=False, padding=True,
                      return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    ends = batch["attention_mask"].sum(1)
    for i, end in enumerate(ends.tolist()):
        labels[i, end - 2:end] = batch["input_ids"][i, end - 2:end]
    return {**batch, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("assets/tiny-llava"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--prior", type=float, default=0.9,
                        help="share of training scenes in their shapes' usual colours")
    parser.add_argument("--patch-size", type=int, default=16, help="image patch size in pixels (32 px images)")
    parser.add_argument("--vision-hidden", type=int, default=64, help="width of the CLIP vision tower")
    parser.add_argument("--vision-layers", type=int, default=2, help="depth of the CLIP vision tower")
    parser.add_argument("--hidden", type=int, default=64, help="width of the Llama language model")
    parser.add_argument("--layers", type=int, default=2, help="depth of the Llama language model")
    args = parser.parse_args()

    model, processor = tiny_llava(seed=args.seed, patch_size=args.patch_size, vision_hidden=args.vision_hidden,
                                  vision_layers=args.vision_layers, hidden=args.hidden, layers=args.layers)
    held_out = qa_rows(500, seed=10_000, max_objects=args.max_objects)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    for step in range(args.steps):
        model.train()
        rows = qa_rows(args.batch_size, seed=args.seed * 1_000_003 + step, max_objects=args.max_objects,
                       prior=args.prior)
        loss = model(**answer_batch(processor, rows)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            accuracy = qa_accuracy(model, processor, held_out)
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy}")
    accuracy = qa_accuracy(model, processor, held_out)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    (args.output / "build.json").write_text(json.dumps({**{k: str(v) for k, v in vars(args).items()},
                                                         "held_out_accuracy": accuracy}, indent=1))
    print(f"saved {args.output}: held-out accuracy {accuracy}")


if __name__ == "__main__":
    main()
