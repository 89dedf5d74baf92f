"""The teacher's own answers as training data (sequence-level KD): ``python -m autoglm_distill.label_with_teacher``.

For users with screenshots and tasks but no AutoGLM transcripts: the teacher answers every prompt of
``label.splits`` (greedy, its ``<think>`` included) and a data folder comes out that a run trains on::

    python -m autoglm_distill.label_with_teacher recipe=demo teacher=pretrained teacher.path=outputs/demo/<time>/teacher
    python -m autoglm_distill recipe=demo teacher=pretrained teacher.path=... data.path=data/teacher_labelled/demo \
        data.generate=null

Input lines (``data.path/<split>.jsonl``): chats that end with the user's message (prompts, no answer), chats with an
answer, or episodes (each step is a prompt in the episode's reference history, rendered with ``data.*`` as a run
would). Where a line has a reference action, ``label.reject=true`` keeps only the teacher's answers whose parsed
action is right by the benchmark's step check (`actions.step_correct`); a prompt without one keeps an answer that
parses. Rejected answers are kept too, in ``rejected.jsonl``.

The output folder ``label.out``::

    train.jsonl         the teacher-labelled chats of each labelled split (one line per prompt)
    rejected.jsonl      the answers left out, with the reference they missed
    val.jsonl, test.jsonl  copied from data.path when not labelled: evaluation stays against the references
    images/             hard links to data.path's screenshots (copies across file systems)
    label_meta.json     counts per split, the teacher, the settings

Answers are appended to ``<label.out>.labels/<split>.jsonl`` as they come, so an interrupted run resumes where it
stopped (a rerun labels only what is missing); the folder ``label.out`` appears whole, at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import datasets
import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from autoglm_distill import config as config_lib
from autoglm_distill.actions import step_correct, try_parse
from autoglm_distill.data import SPLITS
from autoglm_distill.data.phone import ChatEncoder, DataError, read_split
from autoglm_distill.data.prepare import episode_format, prepare_data
from autoglm_distill.evaluate import generate_answers
from autoglm_distill.models import count_parameters, load_teacher
from autoglm_distill.utils import rank_zero_logger, save_dir_atomic, write_json_atomic

log = rank_zero_logger(__name__)
META_FILE = "label_meta.json"


class LabelError(ValueError):
    """A labelling run that cannot start or resume as configured; the message names the fix."""


def read_prompts(path: Path, root: Path, cfg: DictConfig) -> list[dict]:
    """The prompts of one split: ``key`` (the line's id, else its ``file:line``), ``messages`` (the chat before the
    answer), ``reference`` (the reference answer or None) and ``bbox``. A bad line stops the run, naming it."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: label.splits names the splits of data.path={root} to label.")
    records, bad = read_split(path, root, episode_format(cfg), prompts=True)
    if bad:
        shown = "\n".join(f"  {b}" for b in bad[:20])
        raise DataError(f"{len(bad)} bad line(s) in {path}:\n{shown}\nFix them, or remove them, and rerun.")
    prompts, seen = [], set()
    for record in records:
        key = record["id"] or record["source"]
        if key in seen:
            raise DataError(f"{record['source']}: id {key!r} appears twice in {path}; ids must be unique to resume.")
        seen.add(key)
        messages = record["messages"]
        answered = messages[-1]["role"] == "assistant"
        prompts.append(
            {
                "key": key,
                "messages": messages[:-1] if answered else messages,
                "reference": messages[-1]["content"] if answered else None,
                "bbox": record["bbox"],
            }
        )
    return prompts


def read_log(path: Path) -> dict[str, dict]:
    """The answers already written to a split's log, by key. A line cut short by an interruption (only the last one
    can be) is removed from the file, and that prompt is labelled again."""
    if not path.is_file():
        return {}
    done, good_bytes = {}, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[entry["key"]] = entry
            good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        log.warning("%s ends in a line cut short (an interrupted run): labelling that prompt again", path)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def judge(answer: str, prompt: dict) -> str:
    """``accepted`` when the answer's action is right (against the reference when there is one, else when it
    parses), ``wrong_action`` or ``unparseable``."""
    action = try_parse(answer)
    if action is None:
        return "unparseable"
    if prompt["reference"] is None:
        return "accepted"
    reference = try_parse(prompt["reference"])
    if reference is None:  # the reference itself does not parse: nothing to compare against
        return "accepted"
    return "accepted" if step_correct(action, reference, prompt["bbox"]) else "wrong_action"


def label_split(teacher, encoder: ChatEncoder, root: Path, prompts: list[dict], log_path: Path, cfg, progress) -> None:
    """Teacher answers for every prompt not yet in ``log_path``, appended (and fsynced) one batch at a time."""
    done = read_log(log_path)
    todo = [p for p in prompts if p["key"] not in done]
    task = progress.add_task(f"teacher labels {log_path.stem}", total=len(prompts), completed=len(prompts) - len(todo))
    if len(todo) < len(prompts):
        log.info(
            "%s: %d of %d prompts already labelled, resuming", log_path.stem, len(prompts) - len(todo), len(prompts)
        )
    batch_size = int(cfg.label.batch_size)
    with open(log_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            # generate_answers reads the prompt as everything before the last message: an empty answer stands there
            rows = datasets.Dataset.from_dict(
                {"messages": [json.dumps([*p["messages"], {"role": "assistant", "content": ""}]) for p in batch]}
            )
            answers = generate_answers(
                teacher, encoder, rows, root, len(batch), int(cfg.label.max_new_tokens), desc="teacher"
            )
            for prompt, answer in zip(batch, answers, strict=True):
                entry = {"key": prompt["key"], "answer": answer.strip(), "verdict": judge(answer, prompt)}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            progress.advance(task, len(batch))


def chat_line(prompt: dict, entry: dict) -> dict:
    """An output line: the prompt, the teacher's answer last, the target box and what was checked."""
    line = {
        "id": prompt["key"],
        "messages": [*prompt["messages"], {"role": "assistant", "content": entry["answer"]}],
        "teacher_label": {"verdict": entry["verdict"], "reference": prompt["reference"]},
    }
    if prompt["bbox"] is not None:
        line["target"] = {"bbox": prompt["bbox"]}
    return line


def link_images(src: Path, dst: Path) -> None:
    """``dst`` gets ``src``'s files as hard links (no extra disk), or copies where links cannot cross devices."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def settings_of(cfg: DictConfig, root: Path) -> dict:
    """What decides the answers in a log: a resumed run must match it."""
    return {
        "teacher": str(cfg.teacher.path),
        "data": str(root),
        "format": {k: OmegaConf.select(cfg, f"data.{k}") for k in ("history_steps", "elements_in_text", "max_length")},
        "max_new_tokens": int(cfg.label.max_new_tokens),
    }


def label_with_teacher(cfg: DictConfig) -> dict:
    """Label ``cfg.label.splits`` of the run's data with ``cfg.teacher`` into ``cfg.label.out``; returns the meta."""
    settings = cfg.label
    out = Path(settings.out)
    if out.exists():
        raise LabelError(
            f"{out} already exists (a finished labelling run): train on it with data.path={out} data.generate=null, "
            "or label into another folder with label.out=<folder> (delete that one to relabel)."
        )
    if cfg.teacher.path is None:
        raise LabelError(
            "python -m autoglm_distill.label_with_teacher needs a trained teacher, and teacher.path is null (a "
            "teacher trained inside a run): set teacher=pretrained teacher.path=<its folder>, e.g. "
            "outputs/demo/<time>/teacher."
        )
    unknown = [s for s in settings.splits if s not in SPLITS]
    if unknown or not settings.splits:
        raise LabelError(f"label.splits={list(settings.splits)}: name one or more of {list(SPLITS)}.")
    root = prepare_data(cfg)
    prompts = {split: read_prompts(root / f"{split}.jsonl", root, cfg) for split in settings.splits}

    logs = Path(f"{out}.labels")
    logs.mkdir(parents=True, exist_ok=True)
    wanted = settings_of(cfg, root)
    settings_file = logs / "settings.json"
    if settings_file.is_file() and (found := json.loads(settings_file.read_text())) != wanted:
        raise LabelError(
            f"{logs} holds answers from a run with other settings ({found}, now {wanted}): rerun with those, or "
            f"delete {logs} to label from the start."
        )
    write_json_atomic(settings_file, wanted)

    teacher, tokenizer, image_processor = load_teacher(cfg.teacher, cfg.teacher.path)
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    encoder = ChatEncoder(tokenizer, image_processor, int(cfg.data.max_length))
    started = time.perf_counter()
    with Progress() as progress:
        for split, split_prompts in prompts.items():
            label_split(teacher, encoder, root, split_prompts, logs / f"{split}.jsonl", cfg, progress)

    meta = {
        "teacher": {"path": str(cfg.teacher.path), "params": count_parameters(teacher)},
        "data": str(root),
        "reject": bool(settings.reject),
        "settings": wanted,
        "splits": {},
        "seconds": round(time.perf_counter() - started, 1),
    }

    def write(folder: Path) -> None:
        rejected = []
        for split in SPLITS:
            if split not in prompts:
                if (root / f"{split}.jsonl").is_file():
                    shutil.copy2(root / f"{split}.jsonl", folder / f"{split}.jsonl")
                continue
            answers = read_log(logs / f"{split}.jsonl")
            verdicts = Counter(answers[p["key"]]["verdict"] for p in prompts[split])
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for prompt in prompts[split]:
                    line = chat_line(prompt, answers[prompt["key"]])
                    if settings.reject and line["teacher_label"]["verdict"] != "accepted":
                        rejected.append({"split": split, **line})
                    else:
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
            with_reference = sum(p["reference"] is not None for p in prompts[split])
            meta["splits"][split] = {
                "prompts": len(prompts[split]),
                "with_reference": with_reference,
                "verdicts": dict(verdicts),
                "kept": verdicts["accepted"] if settings.reject else len(prompts[split]),
            }
        with open(folder / "rejected.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in rejected)
        if (root / "images").is_dir():
            link_images(root / "images", folder / "images")
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))

    save_dir_atomic(out, write)
    shutil.rmtree(logs)  # everything in it is now in the folder
    for split, counts in meta["splits"].items():
        log.info(
            "%s: %d prompts labelled, %d kept (%s) -> %s",
            split, counts["prompts"], counts["kept"], ", ".join(f"{k} {v}" for k, v in counts["verdicts"].items()),
            out / f"{split}.jsonl",
        )  # fmt: skip
    return meta


config_lib.register_recipes()
config_lib.register_resolvers()


@hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    label_with_teacher(cfg)


if __name__ == "__main__":
    main()
