"""A GLM-style tokenizer and Glm4v processor built locally from a text corpus.

The real AutoGLM tokenizer (151,552 tokens) comes with the teacher from the hub. When no hub is
reachable (tests, the CPU demo), we train a small byte-level BPE on the training data instead and give
it the same chat format as GLM-4.1V: ``[gMASK]<sop><|system|>\\n...<|user|>\\n...<|assistant|>\\n``,
images as ``<|begin_of_image|><|image|><|end_of_image|>`` and the same special tokens, so every code
path that handles the real tokenizer handles this one too.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# GLM-4.1V's control tokens. They never appear in decoded text.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
]
# Structural tags of the agent's answer: single tokens, but kept in decoded text for the action parser.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
# Generation stops at any of these, as in GLM-4.1V's generation_config.
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{%- elif m.role == 'user' %}<|user|>{{ '\\n' }}"
    "{%- if m.content is string %}{{ m.content }}"
    "{%- else %}{%- for item in m.content %}"
    "{%- if item.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif m.role == 'assistant' %}<|assistant|>\n{{ m.content }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{{ '\\n' }}{%- endif %}"
)


def train_glm_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with GLM-4.1V's special tokens and chat template.

    Args:
        texts: the corpus (e.g. every message of the training split).
        vocab_size: target vocabulary size, special tokens included.

    Returns:
        A fast tokenizer whose ``chat_template`` renders messages the way GLM-4.1V does.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # Registered with special=False so decode(skip_special_tokens=True) keeps <think>/<answer>.
    fast.add_tokens(TAG_TOKENS, special_tokens=False)
    return fast


def build_image_processor(image_size: tuple[int, int]):
    """A GLM-4.1V image processor (PIL backend) whose pixel budget fits screenshots of ``image_size``.

    GLM-4.1V treats a still image as two identical frames, hence the factor 2 in the budget. With it, a
    ``(w, h)`` screenshot whose sides are multiples of 28 is never rescaled and yields
    ``(w / 28) * (h / 28)`` image tokens.
    """
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    width, height = image_size
    return Glm4vImageProcessorPil(size={"shortest_edge": 28 * 28 * 2, "longest_edge": 2 * width * height})
