"""Learning on the embedded world: BDHS pairs from the tiny LLaVA itself, then DPO (+ mDPO terms); held-out QA."""

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.mark.slow
def test_bdhs_then_dpo_learns_its_pairs_and_keeps_qa_accuracy(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmalign.vision import dpo, models
    from mmalign.vision.builders import bdhs
    from mmalign.vision.data import write_rows
    from mmalign.vision.evaluate import qa_accuracy
    from mmalign.vision.world import prompt_text, qa_rows

    model, processor = models.load(ASSETS / "tiny-llava")
    held_out = qa_rows(500, seed=10_000)
    before = qa_accuracy(model, processor, held_out)
    sources = [{"prompt": prompt_text(r["question"]), "chosen": f" {r['answer']} </s>", "images": [r["image"]]}
               for r in qa_rows(2048, seed=1)]
    rows, report = bdhs.build_rows(model.eval(), processor, sources, bdhs.Config(model="-", data="-", output=tmp_path,
                                                                                  max_new_tokens=2))
    assert report["pairs"] > 1500  # the image-blind model disagrees with the truth on most questions
    config = dpo.Config(model=str(ASSETS / "tiny-llava"), data=str(write_rows(rows, tmp_path / "bdhs.parquet")),
                        output=tmp_path / "run", full=True, max_steps=256, batch_size=16, learning_rate=3e-4, beta=0.5,
                        anchor_weight=1.0, visual_term="corrupted", report_to="none", checkpoint_every=0)
    history = dpo.run(config)
    late = {key: sum(h[key] for h in history[-64:]) / 64 for key in ("implicit_acc", "reward_margin", "visual_loss")}
    assert late["implicit_acc"] > 0.6 and late["reward_margin"] > 0  # truth over hallucination, on unseen pairs
    assert late["visual_loss"] < 0.5  # the chosen answer is likelier under the true image than a corrupted one
    after = qa_accuracy(AutoModelForImageTextToText.from_pretrained(config.output), processor, held_out)
    # held-out QA accuracy is kept, not clearly improved (measured: 0.58 -> 0.60, see BENCHMARKS.md)
    assert after["ci_high"] > before["mean"]
