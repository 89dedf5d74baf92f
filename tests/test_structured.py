"""Structured pruning: scores come from activations, tensors and config.json really shrink, nothing else changes."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from autoglm_distill.compress.structured import (
    PruningError,
    Shape,
    importance,
    plan,
    prune,
    prune_to,
)
from autoglm_distill.compress.structured_callback import StructuredPruning
from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule, model_inputs
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, count_parameters, freeze
from autoglm_distill.module import DistillModule

WIDE = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def text_model(tokenizer, **overrides):
    torch.manual_seed(0)
    return build_model("glm4", {**WIDE, **overrides}, tokenizer).eval()


def batches(tokenizer, data_dir, n=2, image_processor=None):
    dm = PhoneDataModule(data_dir, ChatEncoder(tokenizer, image_processor, 1024), batch_size=4)
    dm.setup()
    return list(itertools.islice(dm.train_dataloader(), n))


def logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def test_pruning_to_the_same_shape_is_the_identity(tokenizer, data_dir):
    model = text_model(tokenizer)
    data = batches(tokenizer, data_dir)
    same = prune_to(model, Shape.of(model), data)
    torch.testing.assert_close(logits(same, data[0]), logits(model, data[0]), atol=1e-5, rtol=1e-5)


def test_dead_mlp_channels_and_heads_are_pruned_first_and_removing_them_changes_nothing(tokenizer, data_dir):
    model = text_model(tokenizer)
    inter, head_dim = WIDE["intermediate_size"], WIDE["head_dim"]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_up_proj.weight[[5 + i, 5 + i + inter]] = 0  # this channel never activates
            layer.self_attn.o_proj.weight[:, head_dim : 3 * head_dim] = 0  # heads 1 and 2 (one per kv group) unused
    data = batches(tokenizer, data_dir)
    scores = importance(model, data)
    for i in range(3):
        assert scores.mlp[i].argmin() == 5 + i and scores.mlp[i][5 + i] == 0
    source = Shape.of(model)
    target = Shape(**{**source.__dict__, "intermediate_size": inter - 1, "num_attention_heads": 2})
    p = plan(scores, source, target)
    assert all(p.heads[i].tolist() == [0, 3] for i in range(3))
    smaller = prune(model, p)
    assert smaller.model.layers[1].mlp.down_proj.weight.shape == (48, inter - 1)
    assert smaller.model.layers[1].self_attn.q_proj.weight.shape == (2 * head_dim, 48)
    torch.testing.assert_close(logits(smaller, data[0]), logits(model, data[0]), atol=1e-5, rtol=1e-5)


def test_tensors_and_config_shrink_and_the_result_loads_with_from_pretrained(tokenizer, data_dir, tmp_path):
    model = text_model(tokenizer)
    target = Shape(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    smaller = prune_to(model, target, batches(tokenizer, data_dir))
    assert Shape.of(smaller) == target
    assert count_parameters(smaller) < 0.6 * count_parameters(model)
    layer = smaller.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * 16, 32)
    assert layer.self_attn.k_proj.weight.shape == (16, 32)
    assert layer.mlp.gate_up_proj.weight.shape == (80, 32)
    assert smaller.lm_head.weight.shape == (len(tokenizer), 32)
    smaller.save_pretrained(tmp_path / "s")
    model.save_pretrained(tmp_path / "m")
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(tmp_path / "s") < 0.6 * size(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert Shape.of(loaded) == target
    batch = batches(tokenizer, data_dir, 1)[0]
    torch.testing.assert_close(logits(loaded, batch), logits(smaller, batch))


def test_layers_with_least_block_influence_are_dropped(tokenizer, data_dir):
    model = text_model(tokenizer)
    with torch.no_grad():  # layer 1 becomes the identity: its attention and MLP add nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    data = batches(tokenizer, data_dir)
    scores = importance(model, data)
    assert scores.layers.argmin() == 1
    target = Shape(**{**Shape.of(model).__dict__, "num_hidden_layers": 2})
    p = plan(scores, Shape.of(model), target)
    assert p.layers == [0, 2]
    torch.testing.assert_close(logits(prune(model, p), data[0]), logits(model, data[0]), atol=1e-5, rtol=1e-5)


def test_glm4v_language_model_and_vision_output_shrink(tokenizer, data_dir, image_processor, tmp_path):
    torch.manual_seed(0)
    text = {k: v for k, v in WIDE.items() if k != "head_dim"}  # GLM-4.1V: head_dim = hidden / heads = 12
    config = {
        "text_config": {
            **text,
            "num_hidden_layers": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 2]},
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "image_size": 224,
        },
    }
    model = build_model("glm4v", config, tokenizer).eval()
    data = batches(tokenizer, data_dir, 2, image_processor)
    same = prune_to(model, Shape.of(model), data)
    torch.testing.assert_close(logits(same, data[0]), logits(model, data[0]), atol=1e-5, rtol=1e-5)
    with pytest.raises(PruningError, match="hidden_size = num_attention_heads x 12"):
        prune_to(model, Shape(32, 48, 1, 2, 2), data)
    target = Shape(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    smaller = prune_to(model, target, data)
    assert smaller.config.vision_config.out_hidden_size == 24
    assert smaller.model.visual.merger.proj.weight.shape == (24, 24)
    assert logits(smaller, data[0]).shape[-1] == len(tokenizer)
    smaller.save_pretrained(tmp_path / "v")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "v")
    torch.testing.assert_close(logits(loaded, data[0]), logits(smaller, data[0]))


def test_unreachable_targets_name_the_value_to_change(tokenizer, data_dir):
    model = text_model(tokenizer)
    scores = importance(model, batches(tokenizer, data_dir, 1))
    source = Shape.of(model)
    with pytest.raises(PruningError, match="hidden_size=64 is larger"):
        plan(scores, source, Shape(**{**source.__dict__, "hidden_size": 64}))
    with pytest.raises(PruningError, match="keep more key/value heads"):
        plan(scores, source, Shape(**{**source.__dict__, "num_attention_heads": 3, "num_key_value_heads": 1}))
    with pytest.raises(PruningError, match="Unknown pruning target"):
        source.scaled({"head_dim": 0.5})
    with pytest.raises(PruningError, match="schedule"):
        StructuredPruning({"intermediate_size": 0.5}, schedule=[1.5])


def test_callback_prunes_mid_training_keeps_optimizer_state_and_training_goes_on(tokenizer, data_dir, tmp_path):
    torch.manual_seed(0)
    module = DistillModule(
        student=build_model("glm4", WIDE, tokenizer),
        teacher=freeze(build_model("glm4", {**WIDE, "hidden_size": 64}, tokenizer)),
        loss=DistillationLoss(alpha=0.5),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
    )
    teacher_params = count_parameters(module.teacher)
    start_params = count_parameters(module.student)
    callback = StructuredPruning({"intermediate_size": 0.5, "num_attention_heads": 0.5, "hidden_size": 32}, [0.25, 0.5])
    dm = PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=4)
    trainer = pl.Trainer(
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        val_check_interval=4,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=dm)
    assert [h["step"] for h in callback.history] == [2, 4]
    assert callback.history[0]["intermediate_size"] == 72 and callback.history[1]["intermediate_size"] == 48
    student = module.student
    assert Shape.of(student) == Shape(32, 48, 3, 2, 2)
    assert count_parameters(student) < start_params and count_parameters(module.teacher) == teacher_params
    optimizer = trainer.optimizers[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in student.parameters()}
    for p in params:  # the moments were sliced with the weights and training went on with them
        assert optimizer.state[p]["exp_avg"].shape == p.shape
        assert int(optimizer.state[p]["step"]) == 8
    assert trainer.callback_metrics["prune/hidden_size"] == 32
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_resuming_a_pruned_checkpoint_into_the_unpruned_student_names_the_fix(tokenizer):
    def module(**overrides):
        torch.manual_seed(0)
        return DistillModule(
            student=build_model("glm4", {**WIDE, **overrides}, tokenizer),
            loss=DistillationLoss(alpha=0.0),
            optimizer=partial(torch.optim.AdamW, lr=1e-2),
        )

    pruned = module(intermediate_size=48)
    checkpoint = {"state_dict": {f"student.{k}": v for k, v in pruned.student.state_dict().items()}}
    with pytest.raises(RuntimeError, match="resuming across structured pruning is not supported"):
        module().on_load_checkpoint(checkpoint)


@pytest.mark.slow
def test_a_pruned_student_exports_smaller_files_that_pass_every_check(tokenizer, data_dir, tmp_path):
    from autoglm_distill.export import Bars, ExportSettings, export_student

    settings = ExportSettings(
        formats=("onnx",),
        max_context=256,
        prefill_buckets=(64,),
        max_new_tokens=8,
        golden_prompts=2,
        latency_runs=2,
        # random tiny students have near-tied logits (see test_export.py)
        bars=Bars(int8_min_top1_agreement=0.3, int4_min_top1_agreement=0.0),
    )
    model = text_model(tokenizer, hidden_size=96, intermediate_size=256)
    target = Shape(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    smaller = prune_to(model, target, batches(tokenizer, data_dir))
    sizes = {}
    for name, student in (("full", model), ("pruned", smaller)):
        manifest = export_student(student, tokenizer, tmp_path / name, settings)
        assert all(a["parity"]["passed"] for a in manifest["artifacts"])
        sizes[name] = {s["precision"]: s["bytes"] for s in manifest["sizes"]}
    for precision in ("fp32", "int8"):
        assert sizes["pruned"][precision] < 0.6 * sizes["full"][precision], sizes
