"""On-policy distillation (distill.on_policy): who writes each batch's answers, and what the loss is on them."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from autoglm_distill.data.phone import ChatEncoder, PhoneDataModule
from autoglm_distill.losses import DistillationLoss
from autoglm_distill.models import build_model, freeze
from autoglm_distill.module import DistillModule
from autoglm_distill.on_policy import MEDIA_TOKENS, OnPolicy, from_config, prompt_lengths, rollout, target_logprob
from autoglm_distill.validate import ConfigError, validate

from .conftest import TINY_TEXT, compose_config, logged, main_in_process, read_summary, reuse_teacher
from .test_models import GLM4V_TEXT, VISION


def settings(tokenizer, lmbda: float = 1.0, seq_kd: bool = False, temperature: float = 1.0) -> OnPolicy:
    media = tuple(tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS)))
    return OnPolicy(lmbda, seq_kd, temperature, 12, tokenizer.pad_token_id, tokenizer.eos_token_id, 0, media)


def make_module(tokenizer, on_policy: OnPolicy | None, kind: str = "reverse_kl", chunk_size="auto") -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(
        student=build_model("glm4", TINY_TEXT, tokenizer),
        teacher=freeze(build_model("glm4", {**TINY_TEXT, "hidden_size": 48}, tokenizer)),
        loss=DistillationLoss(kind=kind, temperature=1.0, alpha=0.5, chunk_size=chunk_size),
        optimizer=partial(torch.optim.AdamW, lr=1e-2),
        on_policy=on_policy,
    )


@pytest.fixture(scope="module")
def batch(tokenizer, data_dir) -> dict[str, torch.Tensor]:
    dm = PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def train(module: DistillModule, tokenizer, data_dir, tmp_path, steps: int = 3) -> dict[str, torch.Tensor]:
    dm = PhoneDataModule(data_dir, ChatEncoder(tokenizer, None, 1024), batch_size=4)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    pl.seed_everything(0)
    trainer.fit(module, datamodule=dm)
    return {k: v.clone() for k, v in module.student.state_dict().items()}, trainer.callback_metrics


def test_lmbda_zero_trains_exactly_as_off_policy_kd(tokenizer, data_dir, tmp_path):
    off, _ = train(make_module(tokenizer, None), tokenizer, data_dir, tmp_path)
    zero, metrics = train(make_module(tokenizer, settings(tokenizer, lmbda=0.0)), tokenizer, data_dir, tmp_path)
    for key, value in off.items():
        assert torch.equal(value, zero[key]), key
    assert "train/on_policy_share" not in metrics  # nothing sampled, nothing logged
    off_cfg = OmegaConf.create(
        {"lmbda": 0.0, "seq_kd": False, "temperature": 1.0, "max_new_tokens": 12, "start_step": 0}
    )
    assert from_config(off_cfg, tokenizer, seed=0) is None  # what run.py hands the module: the off-policy path
    on = from_config(OmegaConf.merge(off_cfg, {"lmbda": 0.5}), tokenizer, seed=0)
    assert on.suppressed_ids == settings(tokenizer).suppressed_ids and on.eos_token_id == tokenizer.eos_token_id


def hand_reverse_kl(module: DistillModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(student || teacher) per labelled token at T = 1, averaged, from both models' full logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        log_q = F.log_softmax(module.student(**inputs).logits[:, :-1].double(), -1)
        log_p = F.log_softmax(module.teacher(**inputs).logits[:, :-1].double(), -1)
    mask = batch["labels"][:, 1:] != -100
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)[mask]
    return per_token.mean()


@pytest.mark.parametrize("chunk_size", ["auto", None])
def test_lmbda_one_loss_is_the_reverse_kl_on_the_students_own_tokens(tokenizer, batch, chunk_size):
    module = make_module(tokenizer, settings(tokenizer), chunk_size=chunk_size)
    torch.manual_seed(7)
    sampled, lengths = rollout(module.student, batch, module.on_policy)
    torch.manual_seed(7)
    loss = module.training_step(batch, 0)  # samples the same answers again (same seed), then scores them

    # The answers are the student's: its prompts kept, new tokens labelled, each ending at eos or the token limit.
    prompts = prompt_lengths(batch)
    assert prompt_lengths(sampled) == prompts
    for i, n in enumerate(prompts):
        assert torch.equal(sampled["input_ids"][i, :n], batch["input_ids"][i, :n])
        answer = sampled["labels"][i][sampled["labels"][i] != -100]
        assert len(answer) == int(lengths[i]) and 1 <= len(answer) <= 12
        assert answer[-1] == tokenizer.eos_token_id or len(answer) == 12
        assert (answer[:-1] != tokenizer.eos_token_id).all()
    reference = batch["labels"][batch["labels"] != -100]
    assert not torch.equal(sampled["labels"][sampled["labels"] != -100], reference)
    # alpha=0.5 in the loss, but no hard labels exist on sampled tokens: the divergence alone, KL(Q || P).
    assert loss.item() == pytest.approx(hand_reverse_kl(module, sampled).item(), rel=1e-5)


def test_sampling_at_temperature_zero_is_the_greedy_answer(tokenizer, batch):
    module = make_module(tokenizer, settings(tokenizer, temperature=0.0))
    sampled, _ = rollout(module.student, batch, module.on_policy)
    again, _ = rollout(module.student, batch, module.on_policy)
    assert torch.equal(sampled["input_ids"], again["input_ids"])
    assert module.student.training  # put back in train mode after sampling


def test_seq_kd_trains_on_the_teachers_answers(tokenizer, batch):
    module = make_module(tokenizer, settings(tokenizer, lmbda=0.0, seq_kd=True, temperature=0.0), kind="forward_kl")
    sampled, _ = rollout(module.teacher, batch, module.on_policy)
    loss = module.training_step(batch, 0)
    # The configured loss (alpha=0.5: divergence and hard labels) on the teacher's greedy answers.
    inputs = {k: sampled[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = module.loss(
            module.student(**inputs).logits[:, :-1], sampled["labels"][:, 1:], module.teacher(**inputs).logits[:, :-1]
        )
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_teacher_logprob_of_samples_matches_full_logits(tokenizer, batch):
    module = make_module(tokenizer, settings(tokenizer))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = module.teacher(**inputs).logits[:, :-1]
        targets = module._teacher_targets(batch, inputs, chunked=True)
    full = target_logprob(logits, labels)
    assert target_logprob(targets, labels, chunk=5).item() == pytest.approx(full.item(), rel=1e-5)
    mask = labels != -100
    by_hand = F.log_softmax(logits[mask].double(), -1).gather(-1, labels[mask][:, None]).mean()
    assert full.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_sources_are_reproducible_and_near_lmbda(tokenizer):
    half = settings(tokenizer, lmbda=0.5)
    sources = [half.source(step) for step in range(2000)]
    assert sources == [half.source(step) for step in range(2000)]  # every rank and every resume agrees
    assert 0.45 < sources.count("student") / 2000 < 0.55
    assert set(sources) == {"student", "data"}
    assert {settings(tokenizer, lmbda=0.0, seq_kd=True).source(s) for s in range(50)} == {"teacher"}
    late = OnPolicy(1.0, False, 1.0, 8, 0, 1, start_step=30)
    assert [late.source(s) for s in (0, 29, 30, 31)] == ["data", "data", "student", "student"]


def test_on_policy_refuses_a_run_without_a_live_teacher(tokenizer):
    with pytest.raises(ValueError, match="cache cannot score"):
        DistillModule(
            student=build_model("glm4", TINY_TEXT, tokenizer),
            loss=DistillationLoss(alpha=0.5),
            optimizer=partial(torch.optim.AdamW, lr=1e-2),
            cache_temperature=1.0,
            on_policy=settings(tokenizer),
        )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lmbda": 1.5}, "lmbda=1.5: use a probability"),
        ({"temperature": -1.0}, "temperature=-1.0: use >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: use >= 1"),
        ({"start_step": -1}, "start_step=-1: use a step >= 0"),
    ],
)
def test_bad_settings_name_the_key(fields, message):
    values = {"lmbda": 0.5, "seq_kd": False, "temperature": 1.0, "max_new_tokens": 8, "start_step": 0} | fields
    with pytest.raises(ValueError, match=message):
        OnPolicy(**values, pad_token_id=0, eos_token_id=1)


def test_rows_without_an_answer_have_no_prompt_to_sample(tokenizer, batch):
    broken = {**batch, "labels": batch["labels"].clone()}
    broken["labels"][1] = -100
    with pytest.raises(ValueError, match="no answer tokens"):
        prompt_lengths(broken)


def test_collated_images_follow_the_prompt(tokenizer, image_processor, data_dir):
    """A Glm4v student samples from screenshot prompts: pixels and image-token types travel with the prompt."""
    encoder = ChatEncoder(tokenizer, image_processor, 1024)
    dm = PhoneDataModule(data_dir, encoder, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = build_model("glm4v", {"text_config": GLM4V_TEXT, "vision_config": VISION}, tokenizer)
    sampled, _ = rollout(model, batch, settings(tokenizer))
    assert torch.equal(sampled["pixel_values"], batch["pixel_values"])
    image = encoder.image_token_id
    assert torch.equal(sampled["mm_token_type_ids"].bool(), sampled["input_ids"] == image)
    assert (sampled["input_ids"] == image).sum() == (batch["input_ids"] == image).sum()
    # The untrained model samples almost uniformly, yet never an image or video placeholder (no features for it).
    media = tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))
    answers = sampled["labels"][sampled["labels"] != -100]
    assert len(answers) > 10 and not torch.isin(answers, torch.tensor(media)).any()
    model(**{k: v for k, v in sampled.items() if k != "labels"})  # the sampled batch is a valid model input


def test_on_policy_run_from_one_override_on_the_smoke_recipe(smoke_run, tmp_path, monkeypatch):
    """Screenshot prompts, the chunked loss and the live Glm4v teacher: the student samples every batch."""
    code = main_in_process(
        [
            "recipe=smoke",
            *reuse_teacher(smoke_run),
            "distill.on_policy.lmbda=1",
            "logger=csv",
            "baseline=false",
            "eval.teacher=false",
            f"hydra.run.dir={tmp_path}",
        ],
        monkeypatch,
    )
    assert code == 0
    assert [float(v) for v in logged(tmp_path, "train/on_policy_share").values()] == [1.0]
    lengths = [float(v) for v in logged(tmp_path, "train/student_sample_len").values()]
    assert len(lengths) == 4 and all(1 <= n <= 64 for n in lengths)
    assert all(float(v) < 0 for v in logged(tmp_path, "train/teacher_logp_of_student").values())
    assert not logged(tmp_path, "train/ce")  # no reference answer on a sampled batch, so no hard-label CE
    assert len(logged(tmp_path, "train/kd")) == 4
    assert read_summary(tmp_path)["stages"]["distill"]["steps"] == 4


def test_config_errors_name_the_fix(tmp_path):
    cfg = compose_config(["distill.teacher=cache", "distill.on_policy.lmbda=0.5"], tmp_path)
    with pytest.raises(ConfigError, match=r"a cache cannot score(.|\n)*distill.teacher=model"):
        validate(cfg)
    for trainer in ("fsdp", "deepspeed"):
        cfg = compose_config([f"trainer={trainer}", "distill.on_policy.seq_kd=true"], tmp_path)
        with pytest.raises(ConfigError, match=r"needs the whole model on each GPU(.|\n)*use trainer=ddp"):
            validate(cfg)
    cfg = compose_config(["distill.on_policy.lmbda=2", "distill.on_policy.max_new_tokens=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"distill.on_policy: .*lmbda=2: use a probability.*max_new_tokens=0"):
        validate(cfg)
