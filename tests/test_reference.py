"""Reference scores: adapter disabled equals the base model, a frozen copy does not move, a cache looks up by index."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mmalign.reference import AdapterDisabled, CachedScores, FrozenCopy


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x).sum(-1)


def score(model, batch):
    return model(batch["x"])


def test_adapter_disabled_scores_the_base_model():
    torch.manual_seed(0)
    base = Net()
    expected = score(base, {"x": torch.ones(2, 4)})
    policy = get_peft_model(base, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    batch = {"x": torch.ones(2, 4)}
    assert not torch.allclose(score(policy, batch), expected)
    ref = AdapterDisabled().scores(score, policy, batch)
    torch.testing.assert_close(ref, expected)
    assert not ref.requires_grad
    assert not torch.allclose(score(policy, batch), expected), "the adapter is back on afterwards"
    with pytest.raises(ValueError, match="no LoRA adapter"):
        AdapterDisabled().scores(score, Net(), batch)


def test_frozen_copy_does_not_follow_training_and_casts():
    torch.manual_seed(0)
    policy = Net()
    ref = FrozenCopy(policy, dtype=torch.bfloat16)
    batch = {"x": torch.randn(3, 4)}
    before = ref.scores(score, policy, {"x": batch["x"].bfloat16()})
    with torch.no_grad():
        policy.proj.weight.add_(1.0)
    torch.testing.assert_close(ref.scores(score, policy, {"x": batch["x"].bfloat16()}), before)
    assert ref.model.proj.weight.dtype == torch.bfloat16 and not ref.model.proj.weight.requires_grad


def test_cached_scores_round_trip(tmp_path):
    torch.manual_seed(0)
    policy = Net()
    x = torch.randn(6, 4)
    batches = [{"x": x[i:i + 2], "index": torch.arange(i, i + 2)} for i in (4, 0, 2)]
    cache = CachedScores.build(FrozenCopy(policy), score, policy, batches, size=6)
    cache.save(str(tmp_path / "ref.safetensors"))
    loaded = CachedScores.load(str(tmp_path / "ref.safetensors"))
    torch.testing.assert_close(loaded.scores(score, policy, {"index": torch.tensor([5, 1])}),
                               score(policy, {"x": x[[5, 1]]}).detach())
    with pytest.raises(ValueError, match="covers 2 of 6"):
        CachedScores.build(FrozenCopy(policy), score, policy, batches[:1], size=6)
