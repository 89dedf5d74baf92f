"""End to end: the real CLI on tiny Glm4v/GLM-4 models made here, with synthetic screenshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from autoglm_distill.data import SPLITS
from autoglm_distill.data.phone import DataError
from autoglm_distill.run import run
from autoglm_distill.validate import ConfigError

from .conftest import compose_config, read_summary, reuse_teacher, run_cli


def test_smoke_run_leaves_summary_student_and_offline_wandb_run(smoke_run):
    summary = read_summary(smoke_run)
    assert summary["status"] == "completed"
    assert set(summary["stages"]) == {"teacher_pretrain", "distill", "baseline"}
    assert summary["stages"]["distill"]["steps"] == 4
    for key in ("train/loss", "train/kd", "train/ce", "val/kd", "val/ce", "val/top1_agreement"):
        assert key in summary["stages"]["distill"], key
    assert set(summary["eval"]) == {"teacher", "student", "baseline"}
    for model in summary["eval"].values():
        assert {"action_type_acc", "tap_in_element", "tap_within_14pct", "step_success", "exact_match"} <= set(
            model["test"]
        )
    assert summary["data"]["images"] is True
    steps = {s: sum(len(json.loads(line)["steps"]) for line in open(smoke_run / "data" / f"{s}.jsonl")) for s in SPLITS}
    assert summary["data"]["examples"] == steps  # one example per episode step
    assert list((smoke_run / "wandb").glob("offline-run-*")), "no offline W&B run in the run dir"
    assert (smoke_run / "predictions" / "student_test.json").is_file()


def test_smoke_student_loads_with_from_pretrained(smoke_run):
    student = AutoModelForImageTextToText.from_pretrained(smoke_run / "student")
    tokenizer = AutoTokenizer.from_pretrained(smoke_run / "student")
    AutoImageProcessor.from_pretrained(smoke_run / "student")
    assert student.config.model_type == "glm4v"
    assert student.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert not list(smoke_run.glob("student.tmp-*")), "a temporary folder was left behind"


def quick_export(tmp_path: Path, fmt: str, int8_min_top1: float = 0.3) -> list[str]:
    """Overrides for a quick export step into ``tmp_path/export``: one format, a short context, and the int8 and int4
    top-1 bars relaxed for a random tiny student (near-tied logits)."""
    return [
        "export=default",
        f"export.formats=[{fmt}]",
        "export.max_context=256",
        "export.prefill_buckets=[64]",
        "export.max_new_tokens=8",
        f"export.bars.int8_min_top1_agreement={int8_min_top1}",
        "export.bars.int4_min_top1_agreement=0.0",
        f"export.dir={tmp_path / 'export'}",
    ]


def test_text_only_student_with_csv_logger(smoke_run, tmp_path):
    proc = run_cli(
        [
            "recipe=smoke",
            *reuse_teacher(smoke_run),
            "student=tiny_text",
            "logger=csv",
            "baseline=false",
            "distill=jsd",
            # The export step (the smoke recipe turns it off): one format keeps it quick.
            *quick_export(tmp_path, "tflite"),
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["data"]["images"] is False
    assert set(summary["eval"]) == {"teacher", "student"}
    assert (tmp_path / "csv").is_dir()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.model_type == "glm4"
    exported = summary["export"]["artifacts"]
    assert {(a["format"], a["precision"]) for a in exported} == {("tflite", p) for p in ("fp32", "int8", "int4")}
    assert all(a["passed"] for a in exported)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["source"] == str(tmp_path / "student")


@pytest.mark.slow
def test_smoke_run_exports_its_image_text_student(smoke_run, tmp_path):
    proc = run_cli(
        [
            "recipe=smoke",
            *reuse_teacher(smoke_run),
            "baseline=false",
            *quick_export(tmp_path, "onnx"),
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "glm4v" and manifest["model"]["image"]["tokens"] > 0
    graphs = {g for a in manifest["artifacts"] for g in a["graphs"]}
    expected = {"vision", "prefill_64", "prefill_256", "decode", "decode_64"}
    assert graphs == expected and all(a["parity"]["passed"] for a in manifest["artifacts"])
    # The export table and chart reach the W&B run too.
    media = tmp_path / "wandb"
    assert list(media.glob("offline-run-*/files/media/table/export/table_*.table.json"))
    assert list(media.glob("offline-run-*/files/media/images/export/report_*.png"))


def test_resume_from_last_checkpoint_continues_the_step_count(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    proc = run_cli(
        [
            "recipe=smoke",
            "ckpt_path=last",
            "trainer.max_steps=6",
            "baseline=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Reusing the teacher trained earlier" in proc.stdout + proc.stderr
    assert read_summary(run_dir)["stages"]["distill"]["steps"] == 6


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path='/nowhere/x.ckpt': no checkpoint"):
        run(compose_config(["recipe=smoke", "ckpt_path=/nowhere/x.ckpt"], tmp_path))
    assert not (tmp_path / "data").exists(), "work started before the checkpoint was checked"


def test_failed_run_still_writes_summary_and_finishes_wandb(tmp_path):
    cfg = compose_config(["recipe=smoke", "teacher=pretrained", f"teacher.path={tmp_path / 'no-teacher'}"], tmp_path)
    with pytest.raises(Exception, match="no config.json"):
        run(cfg)
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed"
    assert "teacher.path=" in summary["error"] and "no config.json" in summary["error"]
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert run_dirs and list(run_dirs[0].glob("*.wandb"))


def test_partial_data_generate_from_a_recipe_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"data.generate lacks(.|\n)*data.generate=null"):
        run(compose_config(["recipe=smoke", "data=jsonl", "data.path=/data/x"], tmp_path))


def test_a_data_folder_from_an_older_generator_names_the_fix_and_is_kept(tmp_path):
    old = tmp_path / "data"
    old.mkdir()
    (old / "synth_meta.json").write_text(json.dumps({"format_version": 1, "n_train": 2000}))
    (old / "train.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"(?s)'format_version': 1.*rm -r .*data\.path=<another folder>"):
        run(compose_config(["recipe=smoke", f"data.path={old}"], tmp_path))
    assert (old / "train.jsonl").read_text() == "{}\n"  # nothing deleted


@pytest.mark.slow
def test_multirun_sweeps_each_run_into_its_own_folder(tmp_path):
    """Also runs without any logger or callback (no checkpoints, plain progress bar)."""
    proc = run_cli(
        [
            "--multirun",
            "recipe=smoke",
            "distill.loss.temperature=1,4",
            "logger=none",
            "callbacks=none",
            "baseline=false",
            "eval.limit=2",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    temperatures = sorted(read_summary(tmp_path / str(i))["config"]["distill"]["loss"]["temperature"] for i in (0, 1))
    assert temperatures == [1.0, 4.0]
    # The Hydra callback wrote the sweep's report once both runs were done.
    report = json.loads((tmp_path / "sweep_report.json").read_text())
    assert report["swept"] == ["distill.loss.temperature"] and len(report["runs"]) == 2
    assert (tmp_path / "sweep_report.png").is_file()


@pytest.mark.slow
def test_built_wheel_carries_conf_and_recipes(tmp_path):
    """`pip install <wheel>` then `python -m autoglm_distill recipe=demo` finds its config inside the package."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("autoglm_distill-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "autoglm_distill/conf/config.yaml").is_file()
    assert (site / "autoglm_distill/recipes/demo.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "autoglm_distill", "recipe=demo", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The demo recipe, read from inside the wheel, resolved: its name and two values only it sets.
    job = yaml.safe_load(proc.stdout)
    assert job["run_name"] == "demo"
    assert job["teacher"]["scratch"]["arch"] == "glm4" and job["optimizer"]["lr"] == 3.0e-3
    probe = subprocess.run(
        [sys.executable, "-c", "import autoglm_distill.config as c; print(c.CONF_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == str(site / "autoglm_distill" / "conf")
