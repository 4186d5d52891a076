"""RLG: w=0 is the base pipeline exactly, w=1 the tuned one exactly (its learning test, the reward moving
monotonically with w, is in test_learning.py beside the aligned model it guides)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from mmalign.diffusion.guidance import reinforcement_guidance
from mmalign.diffusion.models import add_lora, save_lora
from mmalign.diffusion.sample import generate

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def pipeline(path, lora=None):
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


@pytest.fixture(scope="module")
def random_lora(tiny_sd, tmp_path_factory):
    """A LoRA with non-zero random weights for the tiny pipeline, saved the diffusers way."""
    pipe = pipeline(tiny_sd)
    add_lora(pipe.unet, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("lora")
    save_lora(pipe, pipe.unet, out)
    return out


def test_weight_zero_is_the_base_and_one_is_the_tuned_model(tiny_sd, random_lora):
    base = generate(pipeline(tiny_sd), PROMPTS, seed=3, steps=4)
    tuned_pipe = pipeline(tiny_sd, random_lora)
    tuned = generate(tuned_pipe, PROMPTS, seed=3, steps=4)
    assert (tuned - base).abs().max() > 1e-2
    with reinforcement_guidance(tuned_pipe, 0.0):
        assert torch.equal(generate(tuned_pipe, PROMPTS, seed=3, steps=4), base)
    with reinforcement_guidance(tuned_pipe, 1.0):
        assert torch.equal(generate(tuned_pipe, PROMPTS, seed=3, steps=4), tuned)
    with reinforcement_guidance(tuned_pipe, 2.0):
        extrapolated = generate(tuned_pipe, PROMPTS, seed=3, steps=4)
    assert not torch.equal(extrapolated, tuned)
    assert torch.equal(generate(tuned_pipe, PROMPTS, seed=3, steps=4), tuned), "the pipeline is restored"


def test_separate_base_model_for_a_full_fine_tune(tiny_sd, tmp_path):
    tuned_pipe = pipeline(tiny_sd)
    with torch.no_grad():
        for param in tuned_pipe.unet.parameters():
            param.mul_(1.05)
    base_pipe = pipeline(tiny_sd)
    with reinforcement_guidance(tuned_pipe, 0.0, base=base_pipe.unet):
        torch.testing.assert_close(generate(tuned_pipe, PROMPTS, seed=3, steps=4),
                                   generate(base_pipe, PROMPTS, seed=3, steps=4), rtol=0, atol=0)


def test_no_adapter_and_no_base_is_an_error(tiny_sd):
    pipe = pipeline(tiny_sd)
    with pytest.raises(ValueError, match="no LoRA adapter"), reinforcement_guidance(pipe, 1.0):
        generate(pipe, PROMPTS[:1], seed=0, steps=2)
