"""Tiny LLaVA-architecture models built offline: a `LlavaForConditionalGeneration` (tiny CLIP vision tower,
tiny Llama) with a word-level tokenizer over the world's words and a real `LlavaProcessor`.

Nothing is downloaded; the embedded model in `assets/tiny-llava` is this skeleton pretrained by
`scripts/build_tiny_llava.py`.
"""

from __future__ import annotations

import torch

from .world import IMAGE_SIZE, WORDS

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %} {% endif %}{{ message['role'] }} :"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} assistant :{% endif %}"
)
"""Renders [user: <image> question] + [assistant: answer] as '<s>user : <image> question assistant : answer </s>'."""


def word_tokenizer():
    """A whitespace word-level PreTrainedTokenizerFast over the world's words plus <pad> <s> </s> <unk> <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate((*SPECIAL, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=512, padding_side="right")


def tiny_processor(image_size: int = IMAGE_SIZE, patch_size: int = 8):
    """A LlavaProcessor: CLIP image processing at `image_size` px, (image_size/patch_size)^2 tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=word_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)


def tiny_llava(seed: int = 0, image_size: int = IMAGE_SIZE, patch_size: int = 8, vision_hidden: int = 32,
               hidden: int = 64, layers: int = 2, vision_layers: int | None = None):
    """(model, processor): a randomly initialised tiny LlavaForConditionalGeneration and its processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    processor = tiny_processor(image_size, patch_size)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers or layers,
                              num_attention_heads=4, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor
