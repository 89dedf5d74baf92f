"""Sparsity callback: every layer reaches the target, the teacher is untouched, the zeros are permanent, and the Core
ML export stores them sparse (smaller, still checked) while the manifest says ONNX/TFLite store them dense."""

from __future__ import annotations

import copy
import csv
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.loggers import CSVLogger
from torch.nn.utils import prune
from transformers import AutoModelForCausalLM

from autoglm_distill import training
from autoglm_distill.compress.sparsity import Sparsity, n_m_mask
from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule
from autoglm_distill.export import Bars, ExportSettings, coreml, export_student, exporter
from autoglm_distill.export.storage import DENSE_FORMAT
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, freeze, linear_weights, weight_sparsity
from autoglm_distill.module import DistillModule

from .conftest import TINY_TEXT, compose_config

STEPS = 16  # the default schedule [0.25, 0.5, 0.75] prunes after steps 4, 8 and 12; 4 more steps recover
SETTINGS = ExportSettings(
    max_context=192,  # the synthetic golden prompts are ~160 tokens
    prefill_buckets=(64,),  # graphs prefill_64, prefill_192, decode, decode_64
    max_new_tokens=8,
    golden_prompts=1,
    latency_runs=1,
    # a near-random tiny student: see tests/test_export.py
    bars=Bars(int8_min_top1_agreement=0.3, int4_min_top1_agreement=0.0),
)


def tiny_module(tokenizer) -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(
        student=build_model("glm4", {**TINY_TEXT, "num_hidden_layers": 2}, tokenizer),
        teacher=freeze(build_model("glm4", {**TINY_TEXT, "hidden_size": 48}, tokenizer)),
        loss=DistillationLoss(alpha=0.5),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
    )


def fit(tokenizer, data_dir, out: Path, trainer_args=(), ckpt_path=None, **sparsity):
    """A short distillation of a two-layer student with the callback; returns the module, the trainer and the
    teacher's weights from before the fit."""
    module = tiny_module(tokenizer)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    args = {
        "max_steps": STEPS,
        "logger": CSVLogger(out, name="log"),
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": out,
        "limit_val_batches": 1,
        "val_check_interval": STEPS,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        **dict(trainer_args),
    }
    trainer = pl.Trainer(callbacks=[Sparsity(**sparsity), *args.pop("callbacks", [])], **args)
    datamodule = PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=4)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer, teacher_before


def layer_zeros(student) -> list[float]:
    return [zero_fraction(layer.weight) for layer in linear_weights(student).values()]


@pytest.fixture(scope="module")
def unstructured(tokenizer, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("unstructured")
    return (*fit(tokenizer, data_dir, out, target=0.5), out)


def zero_fraction(tensor: torch.Tensor) -> float:
    return float((tensor == 0).float().mean())


def test_every_student_layer_reaches_the_target_and_the_teacher_is_untouched(unstructured):
    module, trainer, teacher_before, _ = unstructured
    layers = linear_weights(module.student)
    assert len(layers) == 2 * 6 + 1  # q, k, v, o, gate_up, down per layer + lm_head
    for name, layer in layers.items():
        n = layer.weight.numel()
        assert abs(zero_fraction(layer.weight) - 0.5) <= 1 / n, name  # local: each layer, within rounding
    assert zero_fraction(module.student.get_input_embeddings().weight) < 0.01  # embeddings are not pruned
    assert all(zero_fraction(p) == 0 for n, p in module.student.named_parameters() if "norm" in n)
    for key, value in module.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key])
    assert not any(zero_fraction(m.weight) > 0.01 for m in linear_weights(module.teacher).values())
    assert trainer.global_step == STEPS


def test_pruning_is_permanent_and_the_saved_student_loads(unstructured, tmp_path):
    module, *_ = unstructured
    student = module.student
    state = student.state_dict()
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]
    for layer in linear_weights(student).values():
        assert isinstance(layer.weight, torch.nn.Parameter) and not prune.is_pruned(layer)
    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert weight_sparsity(loaded) == {"zero_fraction": pytest.approx(0.5, abs=1e-3), "pattern": "unstructured"}


def test_sparsity_is_logged_per_layer_and_in_total(unstructured):
    module, trainer, _, out = unstructured
    metrics = trainer.callback_metrics
    layers = linear_weights(module.student)
    assert {f"sparsity/{name}" for name in layers} <= set(metrics)
    assert float(metrics["sparsity/total"]) == pytest.approx(0.5, abs=1e-3)
    rows = list(csv.DictReader(next(out.glob("log/*/metrics.csv")).read_text().splitlines()))
    total = {int(r["step"]): float(r["sparsity/total"]) for r in rows if r.get("sparsity/total")}
    # the logger's step counts from 0: the applications after steps 4, 8, 12 are logged at 3, 7, 11
    assert [round(total[s], 2) for s in (3, 7, 11)] == [0.17, 0.33, 0.5]


def test_two_of_four_sparsity_holds_in_every_group(tokenizer, data_dir, tmp_path):
    eight_steps = {"max_steps": 8, "val_check_interval": 8}  # prunes after steps 2, 4 and 6
    module, trainer, teacher_before = fit(tokenizer, data_dir, tmp_path, eight_steps, target=0.5, pattern="2:4")
    for name, layer in linear_weights(module.student).items():
        groups = layer.weight.detach().reshape(-1, 4)
        assert int((groups == 0).sum(dim=1).min()) >= 2, name
        assert not prune.is_pruned(layer)
    for key, value in module.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key])
    assert weight_sparsity(module.student)["pattern"] == "2:4"
    assert float(trainer.callback_metrics["sparsity/total"]) == 0.5


def test_checkpoints_hold_plain_zeros_and_a_resumed_run_reaches_the_target(tokenizer, data_dir, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    every8 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    fit(tokenizer, data_dir, tmp_path / "a", {"callbacks": [every8], "enable_checkpointing": True, "max_steps": 8})
    ckpt = tmp_path / "ckpt" / "step=8.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") and not k.endswith(("_orig", "_mask")) for k in state)
    # max_steps 8: the schedule pruned after steps 2, 4, 6; every Linear weight is half zeros
    assert zero_fraction(state["student.lm_head.weight"]) == pytest.approx(0.5, abs=1e-3)

    # Resumed into a 16-step run at step 8: steps 4 and 8 are past, so it re-masks to 1/3 before its first step
    # (the checkpoint's 1/2 zeros regrow where training moves them) and reaches 1/2 after step 12.
    module, trainer, _ = fit(tokenizer, data_dir, tmp_path / "b", ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    assert all(abs(z - 0.5) < 0.01 for z in layer_zeros(module.student))
    assert not any(prune.is_pruned(m) for m in linear_weights(module.student).values())


def test_training_that_stops_early_is_pruned_to_the_target_at_the_end(tokenizer, data_dir, tmp_path):
    # one epoch (18 batches) ends the fit before the scheduled steps 25, 50 and 75 of max_steps=100
    module, trainer, _ = fit(
        tokenizer, data_dir, tmp_path, {"max_steps": 100, "max_epochs": 1, "val_check_interval": 8}
    )
    assert trainer.global_step == trainer.num_training_batches < 25
    assert all(abs(z - 0.5) < 0.01 for z in layer_zeros(module.student))
    assert not any(prune.is_pruned(m) for m in linear_weights(module.student).values())


def test_n_m_mask_on_a_hand_made_tensor():
    weight = torch.tensor([[1.0, -3.0, 2.0, 0.5, 4.0, -1.0, 0.1, 5.0]])
    assert n_m_mask(weight, 2, 4).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    assert n_m_mask(weight, 1, 4).tolist() == [[1, 1, 1, 0, 1, 1, 0, 1]]
    # masks nest: an entry pruned before goes first, even when it is not the smallest any more
    previous = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert n_m_mask(weight, 2, 4, previous).tolist() == [[1, 0, 1, 0, 1, 0, 0, 1]]
    with pytest.raises(ValueError, match="groups of 4"):
        n_m_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 1.5}, "callbacks.sparsity.target=1.5 must be a fraction in (0, 1), e.g. callbacks.sparsity.target"),
        ({"target": 0.0}, "callbacks.sparsity.target=0.0 must be"),
        ({"pattern": "2-4"}, "callbacks.sparsity.pattern='2-4' is not a pattern: use unstructured, or N:M"),
        ({"pattern": "4:4"}, "e.g. callbacks.sparsity.pattern=2:4"),
        ({"pattern": 124}, 'YAML reads an unquoted 2:4 as 124; quote it, "2:4"'),
        ({"pattern": "1:4"}, "set callbacks.sparsity.target=0.75"),
        ({"schedule": []}, "callbacks.sparsity.schedule=[] must be increasing"),
        ({"schedule": [0.5, 0.25]}, "e.g. callbacks.sparsity.schedule=[0.25,0.5,0.75]"),
        ({"schedule": [0.5, 1.5]}, "in (0, 1]"),
    ],
)
def test_bad_arguments_name_the_config_key_and_an_example(kwargs, message):
    with pytest.raises(ValueError) as err:
        Sparsity(**kwargs)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        Sparsity(target=2.0, pattern="dense", schedule=[])
    for key in ("target", "pattern", "schedule"):
        assert f"callbacks.sparsity.{key}=" in str(err.value)


def test_the_config_adds_the_callback_to_the_distill_stage_only(tmp_path):
    cfg = compose_config(["callbacks=[default,sparsity]", "callbacks.sparsity.pattern=2:4"], tmp_path)
    distill = training.stage_callbacks(cfg, "distill")
    assert {"model_checkpoint", "sparsity"} <= set(distill)
    callback = instantiate(distill["sparsity"])
    assert isinstance(callback, Sparsity) and (callback.zeros, callback.group) == (2, 4)
    assert "sparsity" not in training.stage_callbacks(cfg, "baseline")


@pytest.fixture(scope="module")
def exported(unstructured, tokenizer, tmp_path_factory):
    student = unstructured[0].student.eval()
    out = tmp_path_factory.mktemp("export") / "sparse"
    return student, out, export_student(student, tokenizer, out, SETTINGS, source="tests")


@pytest.mark.slow
def test_a_sparse_student_exports_and_passes_every_check(exported):
    _, out, manifest = exported
    assert manifest["model"]["weight_sparsity"] == {
        "zero_fraction": pytest.approx(0.5, abs=1e-3),
        "pattern": "unstructured",
    }
    assert len(manifest["artifacts"]) == 21  # onnx 4 graphs x 3 precisions; tflite, litertlm, coreml 1 file x 3 each
    for artifact in manifest["artifacts"]:
        assert artifact["parity"]["passed"], artifact
        storage = artifact["weight_storage"]
        assert storage["zero_fraction"] == pytest.approx(0.5, abs=1e-3) and storage["pattern"] == "unstructured"
        if artifact["format"] == "coreml":
            # 2 x 6 Linear weights + lm_head, stored sparse once and read by every function; a prefill function
            # uses 8 of them (no logits: the last layer's k and v projections are all it needs of that layer)
            assert storage["sparse"] and storage["sparse_weights"] == 13 and storage["detail"].startswith("sparse:")
            for graph in artifact["graphs"]:
                check = artifact["parity"][graph]
                used = 8 if graph.startswith("prefill") else 13
                assert check["weights_sparse"] == used and check["weights_checked"] > used
                assert (check["weights_int8"] > 0) == (artifact["precision"] != "fp16")
                assert (check["weights_int4"] > 0) == (artifact["precision"] == "int4")
        else:
            assert not storage["sparse"] and storage["detail"] == DENSE_FORMAT


@pytest.mark.slow
def test_the_dense_claim_for_onnx_and_tflite_is_true(exported):
    import onnx
    from ai_edge_litert.tools import flatbuffer_utils

    _, out, manifest = exported
    for artifact in manifest["artifacts"]:
        path = out / artifact["file"]
        if artifact["format"] == "onnx":
            assert not onnx.load(str(path)).graph.sparse_initializer
        elif artifact["format"] == "tflite":
            tensors = [t for g in flatbuffer_utils.read_model(str(path)).subgraphs for t in g.tensors]
            assert tensors and all(t.sparsity is None for t in tensors)


@pytest.mark.slow
def test_core_ml_sparse_packages_are_smaller_than_dense_ones_of_the_same_student(exported, tmp_path):
    student, out, manifest = exported
    facts = {**manifest["model"], "weight_sparsity": {**manifest["model"]["weight_sparsity"], "pattern": None}}
    specs = coreml.specs(student, facts)
    for precision in coreml.PRECISIONS:  # the same weights, written with sparsity off
        for record in coreml.write(specs, tmp_path, precision, facts):
            assert record["weight_storage"]["sparse"] is False
            assert all(coreml.check_structure(record, specs, precision, g)["passed"] for g in record["graphs"])
    for artifact in (a for a in manifest["artifacts"] if a["format"] == "coreml"):
        sparse, dense = out / artifact["file"], tmp_path / Path(artifact["file"]).name
        assert artifact["bytes"] == exporter._bytes(sparse), artifact["file"]
        # The weights: 1 mask bit + half the values of each Linear weight; the embedding, the rotary tables and the
        # causal mask stay as they are. (On a student this tiny the graph description, which the mask-and-values
        # ops make longer, outweighs the weights stored once, so whole packages are compared on wider students.)
        blob = [next(path.rglob("weight.bin")).stat().st_size for path in (sparse, dense)]
        # (at 4 bits a weight's mask bit is a quarter of what its stored value would have taken: less is saved)
        assert blob[0] < (0.95 if artifact["precision"] == "int4" else 0.85) * blob[1], (artifact["file"], blob)


@pytest.mark.slow
@pytest.mark.parametrize("precision", coreml.PRECISIONS)
def test_the_sparse_structural_check_catches_a_wrong_weight(exported, precision):
    student, out, manifest = exported
    perturbed = copy.deepcopy(student)
    with torch.no_grad():
        weight = perturbed.model.layers[0].mlp.down_proj.weight
        weight[weight == 0] = 0.05  # the zeros the package stores as mask bits
    specs = coreml.specs(perturbed, manifest["model"])
    artifact = next(a for a in manifest["artifacts"] if (a["format"], a["precision"]) == ("coreml", precision))
    check = coreml.check_structure({"file": out / artifact["file"]}, specs, precision, "decode")
    assert check["weights_sparse"] == 13 and check["weights_checked"] > 0
    assert not check["passed"] and check["worst_weight_error_in_tolerances"] > 1.0
    weights = coreml.package_weights(out / artifact["file"], "decode")
    (head,) = [name for name in weights if "lm_head_weight" in name and name.endswith("_sparsified")]
    values, _ = weights[head]
    assert np.mean(values == 0) == pytest.approx(0.5, abs=1e-3)  # decoded dense, zeros filled in
