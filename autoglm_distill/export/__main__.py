"""Export an existing student: ``python -m autoglm_distill.export student=<folder> [export.* overrides]``.

The folder is what a run saves as ``<run dir>/student`` (or any HF GLM-4 / GLM-4.1V model with its tokenizer and, for
GLM-4.1V, image processor). Golden prompts for the parity checks come from ``data_path=<folder>/val.jsonl`` when given
(required for a GLM-4.1V student: the screenshots fix the image size), rendered as the run that saved the student
rendered its episodes (its ``.hydra/config.yaml``: system prompt, history, element list), else from built-in
synthetic phone chats.
Output: ``export/<run name>_<time>/`` by default (``export.dir=`` overrides).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from transformers import AutoImageProcessor, AutoTokenizer

from autoglm_distill import config as config_lib
from autoglm_distill.data.episodes import EpisodeFormat
from autoglm_distill.data.phone import ChatEncoder
from autoglm_distill.data.prepare import episode_format
from autoglm_distill.export.exporter import data_goldens, export_student, settings_from_config
from autoglm_distill.models import is_image_text, load_pretrained

log = logging.getLogger(__name__)


def run_episode_format(student: Path) -> EpisodeFormat | None:
    """How the run that saved ``student`` rendered episodes (``<run dir>/.hydra/config.yaml``, the folder above), so
    the golden prompts read as the student's training prompts did; None for a folder no run saved."""
    config = student.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    run = OmegaConf.load(config)
    return episode_format(run) if "data" in run else None


def export_folder(cfg: DictConfig) -> dict:
    """Load ``cfg.student`` (model + tokenizer) and export it with ``cfg.export``; returns the manifest."""
    student = Path(cfg.student_folder)
    if not (student / "config.json").is_file():
        raise FileNotFoundError(
            f"student={student} is not a model folder (no config.json). Pass the folder a run saved, e.g. "
            "student=outputs/demo/<time>/student"
        )
    settings = settings_from_config(cfg.export)
    model = load_pretrained(str(student), "auto", "float32", False, role="student")
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    image_processor = AutoImageProcessor.from_pretrained(str(student)) if is_image_text(model) else None
    golden = None
    if cfg.data_path:
        encoder = ChatEncoder(tokenizer, image_processor, max_length=1 << 30)
        fmt = run_episode_format(student)
        log.info("golden prompts: %s", "as the run rendered them" if fmt else "the default episode format")
        golden = data_goldens(Path(cfg.data_path), encoder, fmt=fmt)
    return export_student(
        model,
        tokenizer,
        cfg.export.dir,
        settings,
        golden=golden,
        source=str(student.resolve()),
        image_processor=image_processor,
    )


def _student_argument(argv: list[str]) -> list[str]:
    """``student=<folder>`` -> ``student_folder=<folder>``: ``student`` is also the name of a config group in
    conf/, which Hydra would otherwise try to override."""
    return [f"student_folder={a.split('=', 1)[1]}" if a.startswith("student=") else a for a in argv]


config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="export_student", version_base="1.3")
def main(cfg: DictConfig) -> None:
    manifest = export_folder(cfg)
    log.info("Wrote %d artifacts to %s; see report.md there", len(manifest["artifacts"]), cfg.export.dir)


if __name__ == "__main__":
    sys.argv[1:] = _student_argument(sys.argv[1:])
    main()
