"""Compression through the real CLI: pruned-teacher init, pruning and QAT in one run, exported and verified."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForImageTextToText

from autoglm_distill import student as student_lib
from autoglm_distill import training
from autoglm_distill.validate import ConfigError, validate

from .conftest import TINY_TEXT, compose_config, run_cli
from .test_run import quick_export


@pytest.mark.slow
def test_smoke_run_with_pruned_teacher_init_pruning_and_qat_exports_a_smaller_verified_student(tmp_path):
    proc = run_cli(
        [
            "recipe=smoke",
            "baseline=false",
            "student.init=pruned_teacher",  # tiny's text shape: hidden 32, 2 heads, 1 kv head, 1 layer, MLP 64
            "callbacks=[default,prune_structured,qat]",
            "callbacks.prune_structured.schedule=[0.25]",
            "callbacks.qat.start_fraction=0.5",
            # The QAT student's weights sit on the int8 grid, so its int8 graphs must follow the fp32 ones (measured:
            # top-1 agreement 1.0, min cosine 0.99995); 0.9 leaves room for a near-tied position flipping elsewhere.
            *quick_export(tmp_path, "onnx", int8_min_top1=0.9),
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "Instantiating student by pruning the teacher" in log and "pruned the student to" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    student = summary["student"]
    assert student["init"] == "pruned_teacher"
    assert student["shape"] == {
        "hidden_size": 32,
        "intermediate_size": 32,  # 64 from the init, halved by the callback
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    assert student["qat"]["weights_on_int8_grid"] and student["qat"]["started_at_step"] == 2
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["text_config"]["intermediate_size"] == 32 and saved["vision_config"]["out_hidden_size"] == 32
    assert saved["autoglm_distill_qat"]["weights"].startswith("int8")
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "student").config.text_config.hidden_size == 32
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["model"]["qat"]["weights_on_int8_grid"]
    assert all(a["parity"]["passed"] for a in manifest["artifacts"])
    int8 = [a["parity"] for a in manifest["artifacts"] if a["precision"] == "int8"]
    assert int8 and all(p["min_cosine"] > 0.999 and p["top1_agreement"] >= 0.9 for p in int8)
    assert all(p["bar"] == "top-1 agreement >= 0.9" for p in int8)


def test_compression_config_mistakes_are_reported_with_the_fix(tmp_path):
    cfg = compose_config(
        [
            "student.init=pruned_teacher",
            "student.path=/models/s",
            "callbacks=[default,prune_structured,qat]",
            "callbacks.prune_structured.schedule=[0.2,0.8]",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "drop student.path" in str(err.value) and "prune before QAT starts" in str(err.value)
    cfg = compose_config(["callbacks=[default,sparsity,qat]"], tmp_path)
    with pytest.raises(ConfigError, match="sparsity does not combine"):
        validate(cfg)
    cfg = compose_config(["student.init=warm"], tmp_path)
    with pytest.raises(ConfigError, match="use random or pruned_teacher"):
        validate(cfg)


def test_pruned_teacher_init_refuses_a_student_shape_it_cannot_reach(tmp_path, tokenizer):
    from autoglm_distill.models import ModelLoadError, build_model

    teacher = build_model("glm4", TINY_TEXT, tokenizer)  # head_dim 16
    cfg = compose_config(["recipe=demo", "student.init=pruned_teacher"], tmp_path)  # demo student: head_dim 32
    with pytest.raises(ModelLoadError, match="set the student's to the teacher's"):
        student_lib.student_shape(cfg.student, teacher)


def test_compression_callbacks_go_to_the_distill_stage_only(tmp_path):
    cfg = compose_config(["callbacks=[default,prune_structured,qat]"], tmp_path)
    assert {"prune_structured", "qat"} <= set(training.stage_callbacks(cfg, "distill"))
    for stage in ("teacher_pretrain", "baseline"):
        chosen = training.stage_callbacks(cfg, stage)
        assert "model_checkpoint" in chosen and not {"prune_structured", "qat"} & set(chosen)
    assert all("stages" not in c for c in training.stage_callbacks(cfg, "distill").values())
