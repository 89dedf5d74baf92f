"""Teacher/student loading: real from_pretrained on local folders, clear errors on every miss."""

from __future__ import annotations

import logging

import pytest
import torch

from autoglm_distill.models import (
    ModelLoadError,
    build_model,
    check_compatible,
    freeze,
    is_image_text,
    load_pretrained,
)

from .conftest import TINY_TEXT as TEXT

VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
GLM4V_TEXT = {
    **{k: v for k, v in TEXT.items() if k != "head_dim"},
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
}


@pytest.mark.parametrize(("arch", "kind"), [("glm4", "causal_lm"), ("glm4v", "image_text")])
def test_from_pretrained_round_trip_on_a_local_folder(arch, kind, tokenizer, tmp_path):
    config = TEXT if arch == "glm4" else {"text_config": GLM4V_TEXT, "vision_config": VISION}
    model = build_model(arch, config, tokenizer).eval()
    model.save_pretrained(tmp_path)
    loaded = freeze(load_pretrained(str(tmp_path), kind, dtype="float32"))
    assert is_image_text(loaded) == (arch == "glm4v")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, len(tokenizer), (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_missing_local_folder_says_what_teacher_path_needs(tmp_path):
    with pytest.raises(ModelLoadError, match=r"teacher\.path=.*no config\.json.*save_pretrained"):
        load_pretrained(str(tmp_path / "missing"), "image_text")


def test_unreachable_hub_id_says_how_to_use_a_local_copy():
    with pytest.raises(ModelLoadError) as err:
        load_pretrained("zai-org/AutoGLM-Phone-9B", "image_text")
    message = str(err.value)
    assert "Could not load the teacher from 'zai-org/AutoGLM-Phone-9B'" in message
    assert "teacher.path=/models/AutoGLM-Phone-9B" in message


def test_wrong_kind_for_a_folder_is_named(tokenizer, tmp_path):
    build_model("glm4", TEXT, tokenizer).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="teacher.kind=image_text"):
        load_pretrained(str(tmp_path), "image_text")


def test_vocab_mismatch_fails_before_training_with_both_sizes(tokenizer):
    teacher = build_model("glm4", TEXT, tokenizer)
    from transformers import Glm4Config, Glm4ForCausalLM

    student = Glm4ForCausalLM(Glm4Config(vocab_size=len(tokenizer) + 64, pad_token_id=0, **TEXT))
    with pytest.raises(ModelLoadError) as err:
        check_compatible(teacher, student, len(tokenizer))
    assert f"teacher has {len(tokenizer)} logits, student has {len(tokenizer) + 64}" in str(err.value)


def test_trust_remote_code_is_off_by_default_and_logged_when_on(tokenizer, tmp_path, caplog):
    build_model("glm4", TEXT, tokenizer).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        load_pretrained(str(tmp_path), "causal_lm")
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_pretrained(str(tmp_path), "causal_lm", trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text
