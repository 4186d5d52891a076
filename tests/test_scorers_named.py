"""Named scorers on tiny random weights of their own architectures, each against its published formula by hand;
weighted reward specs by hand; bad specs refused naming the term."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmalign.diffusion import world
from mmalign.diffusion.rewards.combine import is_reward_spec, load_reward_spec, parse_reward_spec
from mmalign.diffusion.rewards.named import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    LinearMLP,
    load_named,
)
from mmalign.errors import ConfigError

ARCH = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"
PROMPTS = ["a red circle", "a blue square", "a red circle"]


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, PROMPTS[i % len(PROMPTS)])[1] for i in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random scorers saved the way each is published: a transformers CLIP folder with its processor, an open_clip
    checkpoint (HPS), a LAION aesthetic MLP file (.pth of plain tensors) and an ImageReward folder."""
    from mmalign.diffusion.tiny import save_tiny_scorers

    return save_tiny_scorers(tmp_path_factory.mktemp("named"))


def test_pickscore_and_clip_score_follow_their_published_formulas(folders):
    from transformers import CLIPModel, CLIPProcessor

    pil = scenes(3)
    model, processor = CLIPModel.from_pretrained(folders["clip"]), CLIPProcessor.from_pretrained(folders["clip"])
    with torch.no_grad():  # the PickScore README, verbatim in substance
        image = model.get_image_features(**processor(images=pil, return_tensors="pt")).pooler_output
        text = model.get_text_features(**processor(text=PROMPTS, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt")).pooler_output
        cos = F.cosine_similarity(image, text, dim=-1)
    pickscore = load_named("pickscore", str(folders["clip"]))
    torch.testing.assert_close(pickscore.score(pil, PROMPTS), model.logit_scale.exp() * cos, rtol=1e-3, atol=1e-3)
    clipscore = load_named("clipscore", str(folders["clip"]))
    assert (cos > 0).all()
    torch.testing.assert_close(clipscore.score(pil, PROMPTS), 100 * cos, rtol=1e-3, atol=2e-3)
    clipscore.model.text_projection.weight.data.neg_()  # every cosine turns negative: max(cos, 0) is 0 (torchmetrics)
    assert (clipscore.score(pil, PROMPTS) == 0).all()


def test_hps_is_the_cosine_of_its_open_clip_model(folders):
    checkpoint = folders["open_clip"] / "open_clip_model.safetensors"
    scorer = load_named("hpsv21", str(checkpoint), str(ARCH))
    peer, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folders['open_clip']}")
    pil = scenes(3)
    with torch.no_grad():
        image = F.normalize(peer.encode_image(torch.stack([preprocess(im) for im in pil])), dim=-1)
        text = F.normalize(peer.encode_text(open_clip.get_tokenizer(f"local-dir:{folders['open_clip']}")(PROMPTS)),
                           dim=-1)
    torch.testing.assert_close(scorer.score(pil, PROMPTS), torch.diagonal(image @ text.T), rtol=1e-5, atol=1e-5)
    assert scorer.files == [checkpoint]


def test_laion_aesthetic_is_a_linear_mlp_on_the_normalised_image_embedding(folders):
    scorer = load_named("aesthetic", str(folders["aesthetic"]), str(folders["open_clip"]))
    weights = torch.load(folders["aesthetic"], weights_only=True)
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(3)])
    with torch.no_grad():
        x = F.normalize(scorer.clip.encode_image(scorer.pixels(images)), dim=-1)
        for i in (0, 2, 4, 6, 7):  # Linear layers of the predictor; Dropout between, no activation
            x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
    torch.testing.assert_close(scorer.score(images), x.squeeze(-1))
    assert folders["aesthetic"] in scorer.files


def test_imagereward_is_the_standardised_mlp_of_the_cross_attending_cls_state(folders):
    from torchvision.transforms import v2

    scorer = load_named("imagereward", str(folders["imagereward"]))
    pil = scenes(3)
    transform = v2.Compose([v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(32),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids[0, :5].tolist() == [2, 5, 6, 9, 3]  # [CLS] a red circle [SEP], padded to 35
    with torch.no_grad():
        states = scorer.vision_model(pixel_values=torch.stack([transform(im) for im in pil])).last_hidden_state
        cls = scorer.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                  encoder_hidden_states=states).last_hidden_state[:, 0]
        x = cls
        for i in (0, 2, 4, 6, 7):
            layer = scorer.mlp.layers[i]
            x = x @ layer.weight.T + layer.bias
    expected = (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert (IMAGEREWARD_MEAN, IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    torch.testing.assert_close(scorer.score(pil, PROMPTS), expected, rtol=1e-5, atol=1e-6)
    other = scorer.score(pil[1:] + pil[:1], PROMPTS)  # the same prompts on other images: the cross-attention reads them
    assert (other - expected).abs().max() > 1e-5  # small: the MLP keeps its original init, std 1/(width + 1)


ORIGINAL_NAMES = [("vision_model.embeddings.class_embedding", "blip.visual_encoder.cls_token"),
                  ("vision_model.embeddings.position_embedding", "blip.visual_encoder.pos_embed"),
                  ("vision_model.embeddings.patch_embedding.", "blip.visual_encoder.patch_embed.proj."),
                  ("vision_model.post_layernorm.", "blip.visual_encoder.norm."),
                  ("vision_model.encoder.layers.", "blip.visual_encoder.blocks."),
                  (".self_attn.projection.", ".attn.proj."), (".self_attn.", ".attn."),
                  (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), ("text_encoder.", "blip.text_encoder.")]


def test_imagereward_reads_the_published_checkpoint_layout(folders, tmp_path, monkeypatch):
    """ImageReward.pt holds BLIP's own names (timm ViT, med.py BERT) plus tensors ImageReward does not use."""
    from mmalign.diffusion.rewards import named

    reward = load_named("imagereward", str(folders["imagereward"]))
    original = {}
    for key, value in reward.state_dict().items():
        for ours, theirs in ORIGINAL_NAMES:
            key = key.replace(ours, theirs)
        original[key] = value
    original["blip.vision_proj.weight"] = torch.zeros(4, 32)  # BLIP's contrastive head: left out
    original["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    torch.save(original, tmp_path / "ImageReward.pt")
    text = reward.text_encoder.config
    (tmp_path / "med_config.json").write_text(json.dumps({  # a BertConfig, as published
        "architectures": ["BertModel"], "vocab_size": text.vocab_size, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 40,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 32}))
    monkeypatch.setattr(named, "IMAGEREWARD_VISION", reward.vision_model.config.to_dict())
    published = load_named("imagereward", str(tmp_path / "ImageReward.pt"), str(folders["imagereward"]))
    assert published.vision_model.config.hidden_size == 32 and published.files == [tmp_path / "ImageReward.pt"]
    pil = scenes(3)
    torch.testing.assert_close(published.score(pil, PROMPTS), reward.score(pil, PROMPTS))
    original["blip.visual_encoder.norm.weight"] = torch.ones(8)
    torch.save(original, tmp_path / "ImageReward.pt")
    with pytest.raises(ConfigError, match=r"holds neither ImageReward.pt with med_config.json nor .*size mismatch"):
        load_named("imagereward", str(tmp_path / "ImageReward.pt"), str(folders["imagereward"]))


def test_a_weighted_spec_is_the_weighted_sum_of_raw_scores(folders):
    checkpoint = folders["open_clip"] / "open_clip_model.safetensors"
    spec = f"hpsv21={checkpoint}@{ARCH}:0.5, aesthetic={folders['aesthetic']}@{folders['open_clip']}:-2"
    assert is_reward_spec(spec) and not is_reward_spec("mmalign.diffusion.world:reward")
    reward = load_reward_spec(spec)
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(3)])
    hps = load_named("hpsv21", str(checkpoint), str(ARCH)).score(images, PROMPTS)
    aesthetic = load_named("aesthetic", str(folders["aesthetic"]), str(folders["open_clip"])).score(images)
    torch.testing.assert_close(reward.score(images, PROMPTS, batch_size=2), 0.5 * hps - 2 * aesthetic)
    terms = reward.term_scores(images, PROMPTS)
    torch.testing.assert_close(reward.combine(terms), 0.5 * hps - 2 * aesthetic)
    assert set(reward.files) == {checkpoint, folders["aesthetic"], folders["open_clip"] / "open_clip_model.safetensors"}
    assert [t.weight for t in parse_reward_spec("pickscore,clipscore:2.5")] == [1.0, 2.5]
    assert parse_reward_spec("openclip=local-dir:/models/rm")[0].source == "local-dir:/models/rm"


def test_a_spec_is_taken_wherever_a_reward_is(folders):
    from mmalign.diffusion.evaluate import load_reward
    from mmalign.diffusion.rewards import ScorerOptions
    from mmalign.diffusion.rewards.combine import WeightedReward

    spec = f"openclip={folders['open_clip']}:2,aesthetic={folders['aesthetic']}@{folders['open_clip']}:0.5"
    images = torch.stack([world.pil_to_tensor(im) for im in scenes(3)])
    clip = load_named("openclip", str(folders["open_clip"])).score(images, PROMPTS)
    aesthetic = load_named("aesthetic", str(folders["aesthetic"]), str(folders["open_clip"])).score(images)
    expected = 2 * clip + 0.5 * aesthetic
    scorer = ScorerOptions(scorer=spec).load_scorer()  # reward score, relabel, pairs
    assert isinstance(scorer, WeightedReward) and scorer.image_size == 32
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected)
    torch.testing.assert_close(load_reward(spec)(images, PROMPTS), expected)  # AC-Flow's --reward
    with pytest.raises(ConfigError, match="is a reward spec; --pretrained, --kind and --head-hidden apply"):
        ScorerOptions(scorer=spec, kind="aesthetic").load_scorer()


def test_bad_specs_are_refused_naming_the_term(folders):
    with pytest.raises(ConfigError, match=r"term 'pickscore:abc': weight 'abc' is not a finite number"):
        parse_reward_spec("pickscore:abc", "--scorer")
    with pytest.raises(ConfigError, match=r"--reward 'pickscore,hpsv3:1': term 'hpsv3:1': unknown scorer 'hpsv3'"):
        parse_reward_spec("pickscore,hpsv3:1")
    with pytest.raises(ConfigError, match="scorer aesthetic needs a source"):
        load_named("aesthetic", None)
    with pytest.raises(ConfigError, match="imagereward THUDM/ImageReward: no such folder here, and the hub repository "
                                          "cannot be had"):  # the published default, offline here
        load_named("imagereward", None)
    with pytest.raises(ConfigError, match=rf"imagereward={folders['clip']}: .* holds neither ImageReward.pt"):
        load_named("imagereward", str(folders["clip"]))
    with pytest.raises(ConfigError, match="CLIP model folder .* has no config.json"):
        load_named("pickscore", str(folders["imagereward"].parent / "open_clip"))
    with pytest.raises(ConfigError, match="not a LAION aesthetic MLP for a 32-wide"):
        torch.save(LinearMLP(16).state_dict(), folders["aesthetic"].parent / "narrow.pth")
        load_named("aesthetic", str(folders["aesthetic"].parent / "narrow.pth"), str(folders["open_clip"]))
