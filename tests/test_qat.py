"""QAT: fake-quant layers exist only while QAT runs, convert removes them, int8 files hold the trained weights."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import onnx as onnx_lib
import pytest
import pytorch_lightning as pl
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from autoglm_distill.compress.qat import QATError, QuantizationAware, is_fake_quantized
from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule
from autoglm_distill.export import Bars, ExportSettings, export_student
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, freeze, qat_record
from autoglm_distill.module import DistillModule

from .conftest import TINY_TEXT

SETTINGS = ExportSettings(
    formats=("onnx", "tflite", "coreml"),
    max_context=256,
    prefill_buckets=(64,),
    max_new_tokens=8,
    golden_prompts=2,
    latency_runs=2,
    # random tiny students have near-tied logits (see test_export.py)
    bars=Bars(int8_min_top1_agreement=0.3, int4_min_top1_agreement=0.0),
)


class Watch(pl.Callback):
    """Records, after every step, whether the student had fake-quantized layers."""

    def __init__(self):
        self.fake = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fake[trainer.global_step] = sum(is_fake_quantized(m) for m in pl_module.student.modules())


@pytest.fixture(scope="module")
def qat_run(tokenizer, data_dir, tmp_path_factory):
    torch.manual_seed(0)
    module = DistillModule(
        student=build_model("glm4", {**TINY_TEXT, "num_hidden_layers": 2}, tokenizer),
        teacher=freeze(build_model("glm4", {**TINY_TEXT, "hidden_size": 48}, tokenizer)),
        loss=DistillationLoss(alpha=0.5),
        # A small step size keeps the tiny student's logits as varied as at init: a few steps at a large one collapse
        # it to one near-tied distribution that any int8 noise flips.
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )
    qat, watch = QuantizationAware(start_fraction=0.5), Watch()
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path_factory.mktemp("qat"),
        limit_val_batches=1,
        val_check_interval=6,
        num_sanity_val_steps=0,
        callbacks=[qat, watch],
    )
    trainer.fit(module, datamodule=PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=4))
    return module.student, qat, watch, trainer


def test_fake_quant_layers_exist_only_while_qat_runs_and_convert_removes_them(qat_run):
    student, qat, watch, trainer = qat_run
    linears = 2 * 6 + 1  # q k v o gate_up down per layer, and lm_head
    assert qat.started_at == 3
    assert [watch.fake[s] for s in range(1, 7)] == [0, 0, 0, linears, linears, linears]
    assert trainer.callback_metrics["qat/fake_quantized_layers"] == linears
    assert not any(is_fake_quantized(m) for m in student.modules())
    assert all(type(m) is torch.nn.Linear for n, m in student.named_modules() if n.endswith(("proj", "lm_head")))


def test_converted_weights_sit_on_the_int8_grid_and_config_json_records_qat(qat_run, tmp_path):
    student, qat, *_ = qat_run
    for module in student.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            steps = w / (w.abs().amax(dim=1, keepdim=True) / 127)
            assert (steps - steps.round()).abs().max() < 1e-3
    assert qat.record["weights_on_int8_grid"] and qat.record["steps"] == 3
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["autoglm_distill_qat"]["weights"].startswith("int8")
    assert qat_record(AutoModelForCausalLM.from_pretrained(tmp_path))["weights_on_int8_grid"]


@pytest.mark.slow
def test_qat_student_exports_passes_every_check_and_int8_onnx_holds_the_trained_weights(qat_run, tokenizer, tmp_path):
    student, *_ = qat_run
    manifest = export_student(student, tokenizer, tmp_path / "export", SETTINGS)
    assert all(a["parity"]["passed"] for a in manifest["artifacts"])
    assert manifest["model"]["qat"]["weights_on_int8_grid"]
    int8 = [a for a in manifest["artifacts"] if a["precision"] == "int8"]
    assert int8 and all(a["quantization"]["qat"]["trained_with"].startswith("torchao") for a in int8)
    # Dequantized int8 ONNX weights equal the fp32 file's (= the trained) weights: no PTQ rounding was added.
    errors = quantization_error_in_steps(tmp_path / "export", manifest)
    assert errors and max(errors) < 1e-3


@pytest.mark.slow
def test_a_float_student_gets_ptq_rounding_in_the_same_check(tokenizer, tmp_path):
    torch.manual_seed(0)
    student = build_model("glm4", {**TINY_TEXT, "num_hidden_layers": 2}, tokenizer)
    manifest = export_student(
        student, tokenizer, tmp_path / "export", ExportSettings(**{**SETTINGS.__dict__, "formats": ("onnx",)})
    )
    assert "qat" not in manifest["model"]
    assert max(quantization_error_in_steps(tmp_path / "export", manifest)) > 0.2


def quantization_error_in_steps(folder, manifest) -> list[float]:
    """Per quantized ONNX weight: max |dequantized int8 - fp32 weight| in units of its quantization step."""
    errors = []
    for a in manifest["artifacts"]:
        if a["format"] != "onnx" or a["precision"] != "int8":
            continue
        quant = {t.name: numpy_helper.to_array(t) for t in onnx_lib.load(str(folder / a["file"])).graph.initializer}
        fp32_file = a["file"].replace(".int8.", ".fp32.")
        fp32 = {t.name: numpy_helper.to_array(t) for t in onnx_lib.load(str(folder / fp32_file)).graph.initializer}
        for name, values in quant.items():
            if not name.endswith("_quantized") or name[: -len("_quantized")] not in fp32:
                continue
            base = name[: -len("_quantized")]
            scale, zero = quant[base + "_scale"], quant[base + "_zero_point"]
            if values.ndim != 2 or scale.size != values.shape[1]:
                continue  # the embedding table (per tensor): trained as float
            restored = (values.astype(np.float32) - zero.astype(np.float32)) * scale
            errors.append(float((np.abs(restored - fp32[base]) / scale).max()))
    return errors


def test_bad_settings_name_the_key():
    with pytest.raises(QATError, match="callbacks.qat.start_fraction"):
        QuantizationAware(start_fraction=1.0)
    with pytest.raises(QATError, match="callbacks.qat.weights"):
        QuantizationAware(weights="int2")


def test_int4_option_fake_quantizes_per_group_and_the_export_note_names_both_grids(tokenizer):
    from autoglm_distill.compress.qat import convert, prepare
    from autoglm_distill.export.exporter import _with_qat

    torch.manual_seed(0)
    student = build_model("glm4", TINY_TEXT, tokenizer)
    assert prepare(student, weights="int4", group_size=16) == 7
    fake = next(m for m in student.modules() if is_fake_quantized(m))
    assert fake.weight_fake_quantizer.config.dtype == torch.int4 and fake.weight_fake_quantizer.config.group_size == 16
    before = student.lm_head.weight.detach().clone()
    record = convert(student, weights="int4", group_size=16)
    assert record["weights"] == "int4 per group of 16" and not record["weights_on_int8_grid"]
    torch.testing.assert_close(student.lm_head.weight, before)  # not snapped to int8: the int4 scheme was trained
    note = _with_qat({"recipe": "x", "weights": "int8 per channel"}, record, "int8")["qat_note"]
    assert "trained for int4 per group of 16; written as int8 per channel" in note
