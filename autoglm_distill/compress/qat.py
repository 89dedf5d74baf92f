"""Quantization-aware training on torchao's QAT, switched on for the last part of the distill stage.

``prepare`` swaps every ``nn.Linear`` of the student for torchao's ``FakeQuantizedLinear`` (same weight tensors, so
the optimizer keeps training them): int8 weights per output channel (or int4 per group) and int8 dynamic per-token
activations are simulated in the forward pass. At the end ``convert`` swaps them back to ``nn.Linear`` and, for int8,
puts every weight on the symmetric per-channel int8 grid the exporters use (scale = max|w| / 127). The exporters'
int8 quantization then finds exactly those values again: the phone runs the weights that were trained. The student's
``config.json`` records the scheme (``QAT_CONFIG_KEY``) so the export step knows it has a QAT student.

(torchao's own int8 grid is max|w| / 127.5 over [-128, 127]; moving to the exporters' grid changes a weight by at
most 0.4% of its row's largest value, far below one quantization step of noise the training has learned to absorb.)
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import nn

from autoglm_distill.models import QAT_CONFIG_KEY

log = logging.getLogger(__name__)

WEIGHT_SCHEMES = ("int8", "int4")


class QATError(ValueError):
    """A QAT setting that cannot work; the message names the config key to change."""


def _fake_quantize_configs(weights: str, group_size: int, activations: bool):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if weights == "int8":
        weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    else:
        weight = IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if activations else None
    return activation, weight


def prepare(model: nn.Module, weights: str = "int8", group_size: int = 32, activations: bool = True) -> int:
    """Swap ``model``'s Linear layers for fake-quantized ones in place; returns how many were swapped."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activation, weight = _fake_quantize_configs(weights, group_size, activations)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"))
    return sum(is_fake_quantized(m) for m in model.modules())


def is_fake_quantized(module: nn.Module) -> bool:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return isinstance(module, FakeQuantizedLinear)


@torch.no_grad()
def snap_to_int8_grid(model: nn.Module) -> int:
    """Round every Linear weight to symmetric per-output-channel int8 (scale = max|w| / 127); returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            w.copy_((w / scale).round().clamp(-127, 127) * scale)
            count += 1
    return count


def convert(model: nn.Module, weights: str = "int8", group_size: int = 32, activations: bool = True) -> dict:
    """Swap the fake-quantized layers back to ``nn.Linear``, snap int8 weights to the export grid and record the
    scheme in ``model.config`` (saved to config.json); returns that record."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
    if any(is_fake_quantized(m) for m in model.modules()):
        raise QATError("torchao's convert step left fake-quantized layers behind; the student cannot be exported.")
    record = {
        "weights": f"{weights} symmetric per output channel"
        if weights == "int8"
        else f"int4 per group of {group_size}",
        "activations": "int8 dynamic per token (asymmetric)" if activations else "float",
        "layers": "every nn.Linear of the student",
        "trained_with": "torchao QAT (FakeQuantizedLinear)",
        "weights_on_int8_grid": False,
    }
    if weights == "int8":
        record["linear_layers_snapped"] = snap_to_int8_grid(model)
        record["weights_on_int8_grid"] = True
    if hasattr(model, "config"):
        setattr(model.config, QAT_CONFIG_KEY, record)
    return record


class QuantizationAware(pl.Callback):
    """Fake-quantizes the student from ``start_fraction`` of ``trainer.max_steps`` on, converts it at the end.

    Args:
        start_fraction: where in training QAT starts (0: from the first step; 0.7: the last 30%).
        weights: ``int8`` (per output channel, what the exporters write) or ``int4`` (per group; the exporters still
            write int8, which the manifest says).
        group_size: int4 group size.
        activations: also fake-quantize Linear inputs as int8 per token (dynamic), as int8 runtimes do.
    """

    def __init__(
        self, start_fraction: float = 0.7, weights: str = "int8", group_size: int = 32, activations: bool = True
    ):
        if not 0 <= start_fraction < 1:
            raise QATError(
                f"callbacks.qat.start_fraction={start_fraction}: give where QAT starts as a fraction of training in "
                "[0, 1), e.g. 0.7 for the last 30%."
            )
        if weights not in WEIGHT_SCHEMES:
            raise QATError(f"callbacks.qat.weights={weights!r}: use one of {', '.join(WEIGHT_SCHEMES)}.")
        self.start_fraction, self.weights, self.group_size, self.activations = (
            start_fraction,
            weights,
            group_size,
            activations,
        )
        self.started_at: int | None = None
        self.record: dict | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.started_at is not None or trainer.global_step < round(self.start_fraction * trainer.max_steps):
            return
        swapped = prepare(pl_module.student, self.weights, self.group_size, self.activations)
        self.started_at = trainer.global_step
        log.info(
            "Step %d: QAT on, %d Linear layers fake-quantized (%s weights)", self.started_at, swapped, self.weights
        )
        pl_module.log("qat/fake_quantized_layers", float(swapped))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started_at is None:
            log.warning("QAT never started (training ended before start_fraction); the student stays float.")
            return
        self.record = convert(pl_module.student, self.weights, self.group_size, self.activations)
        self.record["started_at_step"] = self.started_at
        self.record["steps"] = trainer.global_step - self.started_at
        log.info("QAT converted: %s", self.record)
