"""Every option of every config group and every recipe composes and instantiates; bad choices fail clearly."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from autoglm_distill import config as config_lib
from autoglm_distill import training
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, count_parameters
from autoglm_distill.validate import ConfigError, validate

from .conftest import compose_config, main_in_process

GROUPS = ("teacher", "student", "data", "distill", "trainer", "callbacks", "logger", "paths", "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_lib.CONF_DIR / group).glob("*.yaml"))


def recipes() -> list[str]:
    return sorted(p.stem for p in config_lib.RECIPES_DIR.glob("*.yaml"))


def test_layout_has_every_group_and_the_required_recipes():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"
    assert {"smoke", "demo", "phone_small"} <= set(recipes())


@pytest.mark.parametrize("recipe", recipes())
def test_recipe_composes_and_resolves(recipe, tmp_path):
    # (the sweep folder is set here because compose() does not resolve Hydra's own defaults for it; the CLI does)
    cfg = compose_config([f"recipe={recipe}", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    OmegaConf.resolve(cfg)
    validate(cfg)
    assert cfg.run_name == recipe
    assert isinstance(instantiate(cfg.distill.loss), DistillationLoss)


@pytest.mark.parametrize("name", options("distill"))
def test_distill_option_instantiates_its_loss(name, tmp_path):
    cfg = compose_config([f"distill={name}"], tmp_path)
    loss = instantiate(cfg.distill.loss)
    assert loss.kind == name


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_option_instantiates(name, tmp_path):
    cfg = compose_config([f"trainer={name}", "trainer.accelerator=cpu"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_option_instantiates(name, tmp_path):
    cfg = compose_config([f"callbacks={name}"], tmp_path)
    for cb in training.stage_callbacks(cfg, "distill").values():  # as training.py does: `stages` is not passed on
        assert isinstance(instantiate(cb), pl.Callback)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_option_instantiates(name, tmp_path):
    cfg = compose_config([f"logger={name}"], tmp_path)
    for lg in (cfg.logger or {}).values():
        logger = instantiate(lg)
        assert isinstance(logger, pl.loggers.Logger)
        assert str(tmp_path) in str(logger.save_dir)


@pytest.mark.parametrize("name", options("data"))
def test_data_option_composes(name, tmp_path):
    overrides = [f"data={name}"] + (["data.path=/some/folder"] if name == "jsonl" else [])
    cfg = compose_config(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.data.on_bad_example in ("fail", "skip")


@pytest.mark.parametrize("group", ["student", "teacher"])
def test_model_presets_build(group, tokenizer, tmp_path):
    """Every preset builds (on the meta device: phone_small is ~0.3B parameters) with the tokenizer's vocab."""
    for name in options(group):
        cfg = compose_config([f"{group}={name}", f"{group}.path=/models/x"], tmp_path)[group]
        spec = cfg.get("scratch") or cfg
        if spec.get("config") is None:  # from_pretrained-only options: loading is covered by test_models
            continue
        with torch.device("meta"):
            model = build_model(spec.arch, OmegaConf.to_container(spec.config), tokenizer)
        assert model.get_output_embeddings().weight.shape[0] == len(tokenizer), name
        assert count_parameters(model) > 0


def test_phone_small_is_a_few_hundred_million_parameters_at_autoglm_vocab(tmp_path):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    spec = OmegaConf.to_container(compose_config(["student=phone_small"], tmp_path).student.config)
    text = dict(spec.pop("text_config"), vocab_size=151552)
    vision = dict(spec.pop("vision_config"), out_hidden_size=text["hidden_size"])
    with torch.device("meta"):
        model = Glm4vForConditionalGeneration(Glm4vConfig(text_config=text, vision_config=vision, **spec))
    assert 150e6 < count_parameters(model) < 600e6


def test_validate_reports_every_problem_at_once(tmp_path):
    cfg = compose_config(
        [
            "distill.loss.alpha=1.5",
            "distill.loss.temperature=0",
            "data.on_bad_example=ignore",
            "eval.splits=[dev]",
            "callbacks=[default,qat]",
            "callbacks.qat.start_fraction=1.5",
            "export.formats=[onnx,apk]",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    lines = str(err.value).splitlines()[1:]
    expected = {
        "distill.loss: ": ["alpha must be in [0, 1], got 1.5", "temperature must be > 0, got 0"],
        "callbacks.qat: ": ["callbacks.qat.start_fraction=1.5"],
        "export: ": ["unknown export format(s) ['apk']"],
        "data.on_bad_example=": ["use fail or skip"],
        "eval.splits has ['dev']": ["choose from train, val, test"],
    }
    for key, parts in expected.items():
        line = next((line for line in lines if line.startswith(f"  - {key}")), None)
        assert line is not None, f"no problem reported for {key}: {lines}"
        for part in parts:
            assert part in line, (part, line)
    assert len(lines) == len(expected)


def test_hard_label_stages_keep_the_configured_loss_settings(tmp_path):
    """The baseline and the scratch teacher train with the configured loss (chunk_size included), alpha 0."""
    cfg = compose_config(["distill=jsd", "distill.loss.chunk_size=7", "distill.loss.temperature=3"], tmp_path)
    hard = training.hard_label_loss(cfg)
    assert (hard.alpha, hard.chunk_size, hard.kind, hard.temperature) == (0.0, 7, "jsd", 3.0)


def test_wrong_group_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["student=huge"], tmp_path)
    assert "student/huge" in str(err.value)


def test_cli_wrong_recipe_fails_with_the_list_of_recipes(tmp_path, monkeypatch, capsys):
    assert main_in_process(["recipe=phone_smal", f"hydra.run.dir={tmp_path}"], monkeypatch) != 0
    stderr = capsys.readouterr().err
    assert "Could not find 'recipe/phone_smal'" in stderr
    for name in recipes():
        assert name in stderr


def test_cli_wrong_override_key_fails_and_names_it(tmp_path, monkeypatch, capsys):
    args = ["recipe=smoke", "distill.loss.temprature=3", f"hydra.run.dir={tmp_path}"]
    assert main_in_process(args, monkeypatch) != 0
    assert "temprature" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
