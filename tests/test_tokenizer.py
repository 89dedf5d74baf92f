"""The locally trained GLM tokenizer renders chats exactly like GLM-4.1V and keeps the answer tags."""

from __future__ import annotations

from transformers import AutoTokenizer

from autoglm_distill.tokenizer import SPECIAL_TOKENS, STOP_TOKENS


def test_chat_template_matches_glm41v_layout(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "T"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\n<|begin_of_image|><|image|><|end_of_image|>T<|assistant|>\n"
    plain = [{"role": "user", "content": "T"}, {"role": "assistant", "content": "A"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == "[gMASK]<sop><|user|>\nT<|assistant|>\nA"


def test_special_tokens_are_single_ids_and_tags_survive_decoding(tokenizer):
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    answer = '<think>Tap it.</think><answer>do(action="Tap", element=[500,150])</answer>'
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in STOP_TOKENS)


def test_save_and_reload_keeps_vocab_and_template(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert loaded.chat_template == tokenizer.chat_template
    text = "Task: Open Wi-Fi settings"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
