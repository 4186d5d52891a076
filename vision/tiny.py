"""Tiny vision-language models built offline: a `LlavaForConditionalGeneration` (tiny CLIP vision tower, tiny
Llama) with a word-level tokenizer over the world's words and a real `LlavaProcessor`, and the same skeleton in the
other families' own classes (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Gemma 3), each with its real
processor.

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


def word_tokenizer(**roles: str):
    """A whitespace word-level PreTrainedTokenizerFast over the world's words plus <pad> <s> </s> <unk> <image>; each
    keyword names a special token a processor needs (e.g. video_token="<video>", image_token="<image_soft>"), added
    after the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = {"image_token": "<image>", **roles}
    added = [token for token in tokens.values() if token not in (*SPECIAL, *WORDS)]
    vocab = {word: i for i, word in enumerate((*SPECIAL, *WORDS, *added))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens=tokens, model_max_length=512,
                                   padding_side="right")


def tiny_processor(image_size: int = IMAGE_SIZE, patch_size: int = 8):
    """A LlavaProcessor: CLIP image processing at `image_size` px, (image_size/patch_size)^2 tokens per image."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=word_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)


def _text_config(tok, hidden: int, layers: int):
    """A tiny LlamaConfig over the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _vision_config(kind: str, image_size: int, patch_size: int, hidden: int, layers: int):
    """A tiny CLIP (kind 'clip', with a CLS token) or SigLIP (kind 'siglip') vision tower config."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    config = CLIPVisionConfig(projection_dim=hidden) if kind == "clip" else SiglipVisionConfig()
    config.update(dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4))
    return config


def tiny_llava(seed: int = 0, image_size: int = IMAGE_SIZE, patch_size: int = 8, vision_hidden: int = 32,
               hidden: int = 64, layers: int = 2, vision_layers: int | None = None):
    """(model, processor): a randomly initialised tiny LlavaForConditionalGeneration and its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    processor = tiny_processor(image_size, patch_size)
    tok = processor.tokenizer
    vision = _vision_config("clip", image_size, patch_size, vision_hidden, vision_layers or layers)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(tok, hidden, layers),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.pad_token_id = tok.pad_token_id
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


GRID_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                  [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
"""The any-resolution grids of the tiny LLaVA-NeXT and OneVision: 1x1, 1x2, 2x1 and 2x2 tiles of IMAGE_SIZE px."""


def tiny_llava_next(seed: int = 0, patch_size: int = 8, hidden: int = 64, layers: int = 2):
    """(model, processor): a random tiny LlavaNextForConditionalGeneration (CLIP tower, any-resolution tiles on
    GRID_PINPOINTS, image newline tokens) and its LlavaNextProcessor."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    torch.manual_seed(seed)
    tok = word_tokenizer()
    images = LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS,
                                     crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                   image_token="<image>", num_additional_image_tokens=1)
    config = LlavaNextConfig(vision_config=_vision_config("clip", IMAGE_SIZE, patch_size, hidden // 2, layers),
                             text_config=_text_config(tok, hidden, layers), image_grid_pinpoints=GRID_PINPOINTS,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
    return LlavaNextForConditionalGeneration(config).eval(), processor


def tiny_llava_onevision(seed: int = 0, patch_size: int = 8, hidden: int = 64, layers: int = 2):
    """(model, processor): a random tiny LlavaOnevisionForConditionalGeneration (SigLIP tower, any-resolution tiles on
    GRID_PINPOINTS) and its LlavaOnevisionProcessor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    torch.manual_seed(seed)
    tok = word_tokenizer(video_token="<video>")
    images = LlavaOnevisionImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                          image_grid_pinpoints=GRID_PINPOINTS)
    processor = LlavaOnevisionProcessor(image_processor=images, video_processor=LlavaOnevisionVideoProcessor(),
                                        tokenizer=tok, num_image_tokens=(IMAGE_SIZE // patch_size) ** 2,
                                        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                                        image_token="<image>", video_token="<video>")
    config = LlavaOnevisionConfig(vision_config=_vision_config("siglip", IMAGE_SIZE, patch_size, hidden // 2, layers),
                                  text_config=_text_config(tok, hidden, layers), image_grid_pinpoints=GRID_PINPOINTS,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config).eval(), processor


def _qwen_parts(patch_size: int, hidden: int, layers: int):
    """(tokenizer, image processor, video processor, text config, token ids) shared by the tiny Qwen2-VL family: images
    resized to multiples of 2 * patch_size px, 2x2 patches merged into one image token, M-RoPE over (t, h, w)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = word_tokenizer(video_token="<video>")
    images = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                   size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": (8 * patch_size) ** 2})
    videos = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    head_half = hidden // 4 // 2  # 4 attention heads; rotary frequencies per head, split over (t, h, w)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head_half - 2 * (head_half // 3), head_half // 3, head_half // 3]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
               vision_start_token_id=tok.bos_token_id)
    return tok, images, videos, text, ids


def tiny_qwen2_vl(seed: int = 0, patch_size: int = 8, hidden: int = 64, layers: int = 2):
    """(model, processor): a random tiny Qwen2VLForConditionalGeneration (dynamic-resolution images, M-RoPE) and its
    Qwen2VLProcessor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    torch.manual_seed(seed)
    tok, images, videos, text, ids = _qwen_parts(patch_size, hidden, layers)
    vision = dict(depth=layers, embed_dim=hidden // 2, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=images, video_processor=videos, tokenizer=tok,
                                 chat_template=CHAT_TEMPLATE)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def tiny_qwen2_5_vl(seed: int = 0, patch_size: int = 8, hidden: int = 64, layers: int = 2):
    """(model, processor): a random tiny Qwen2_5_VLForConditionalGeneration (window attention in the first vision
    layers, full attention in the last) and its Qwen2_5_VLProcessor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    torch.manual_seed(seed)
    tok, images, videos, text, ids = _qwen_parts(patch_size, hidden, layers)
    vision = dict(depth=layers, hidden_size=hidden // 2, out_hidden_size=hidden, intermediate_size=hidden, num_heads=4,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=4 * patch_size,
                  fullatt_block_indexes=[layers - 1])
    processor = Qwen2_5_VLProcessor(image_processor=images, video_processor=videos, tokenizer=tok,
                                    chat_template=CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


def tiny_gemma3(seed: int = 0, patch_size: int = 8, hidden: int = 64, layers: int = 2, image_tokens: int = 4):
    """(model, processor): a random tiny Gemma3ForConditionalGeneration (SigLIP tower pooled to `image_tokens` soft
    tokens per image, which attend to each other both ways) and its Gemma3Processor, whose <image> placeholder is
    the start-of-image token and expands to '<image> <image_soft>... <end_of_image>'."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    torch.manual_seed(seed)
    tok = word_tokenizer(boi_token="<image>", image_token="<image_soft>", eoi_token="<end_of_image>")
    images = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                image_seq_length=image_tokens)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4, max_position_embeddings=512,
                sliding_window=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    config = Gemma3Config(text_config=text, vision_config=_vision_config("siglip", IMAGE_SIZE, patch_size, hidden // 2,
                                                                         layers).to_dict(),
                          mm_tokens_per_image=image_tokens, boi_token_index=tok.convert_tokens_to_ids("<image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft>"))
    return Gemma3ForConditionalGeneration(config).eval(), processor
