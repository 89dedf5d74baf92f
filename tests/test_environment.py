"""The synthetic phone (autoglm_distill.environment): closed-loop episodes driven by the model's own answers."""

from __future__ import annotations

import json

import pytest

from autoglm_distill.data.episodes import EpisodeFormat, answer_text, step_chats
from autoglm_distill.environment import ReplayPhone, closed_loop, read_episodes
from autoglm_distill.play import play
from autoglm_distill.validate import ConfigError

from .conftest import compose_config, main_in_process, read_summary, reuse_teacher

FMT = EpisodeFormat(history_steps=None, elements_in_text=True)


@pytest.fixture(scope="module")
def episodes(data_dir) -> list[dict]:
    return read_episodes(data_dir, "test")


def tap_episode(episodes: list[dict]) -> dict:
    """An episode of at least three steps whose second step is a tap."""
    return next(e for e in episodes if len(e["steps"]) >= 3 and e["steps"][1]["bbox"] is not None)


def test_the_experts_answers_finish_the_episode(episodes):
    for episode in episodes:
        phone = ReplayPhone(episode)
        for step in episode["steps"]:
            assert not phone.done
            assert phone.observe()["elements"] == step["elements"]
            phone.act(answer_text(step))
        assert phone.done and phone.success and phone.progress == 1.0
        assert phone.actions == len(episode["steps"])


def test_a_miss_stays_back_returns_and_an_early_finish_fails(episodes):
    episode = tap_episode(episodes)
    phone = ReplayPhone(episode)
    phone.act(answer_text(episode["steps"][0]))
    assert phone.screen == 1
    x1, y1, _, _ = episode["steps"][1]["bbox"]
    outside = [max(x1 - 30, 0), max(y1 - 30, 0)] if x1 >= 30 or y1 >= 30 else [999, 999]
    phone.act(f'<think>t</think><answer>do(action="Tap", element={outside})</answer>')
    assert phone.screen == 1 and not phone.done  # a tap on nothing: same screen, one step spent
    phone.act("not an action at all")
    assert phone.screen == 1 and phone.actions == 3
    phone.act('<answer>do(action="Back")</answer>')
    assert phone.screen == 0  # the previous screen of the path
    phone.act('<answer>finish(message="done")</answer>')
    assert phone.done and not phone.success and phone.progress == pytest.approx(1 / len(episode["steps"]))
    with pytest.raises(RuntimeError, match="is over"):
        phone.act("anything")


def test_the_step_budget_ends_an_episode(episodes):
    phone = ReplayPhone(episodes[0], max_steps=3)
    for _ in range(3):
        phone.act('<answer>do(action="Wait", duration="1 seconds")</answer>')
    assert phone.done and not phone.success and phone.actions == 3


def test_closed_loop_prompts_are_the_training_prompts_when_every_answer_is_right(episodes):
    """An oracle that knows only the training chats answers every closed-loop prompt: so the prompts the loop builds
    from the screens reached and the answers given are exactly the ones training builds from the recording."""
    oracle = {}
    for episode in episodes:
        for record in step_chats(episode, FMT):
            oracle[json.dumps(record["messages"][:-1])] = record["messages"][-1]["content"]
    asked = []

    def answer(chats: list[list[dict]]) -> list[str]:
        asked.extend(chats)
        return [oracle[json.dumps(chat[:-1])] for chat in chats]

    result = closed_loop(answer, episodes, FMT, batch_size=2)
    assert result == {
        "episode_success": 1.0,
        "progress": 1.0,
        "actions_per_episode": sum(len(e["steps"]) for e in episodes) / len(episodes),
        "episodes": float(len(episodes)),
    }
    assert len(asked) == len(oracle)


def test_closed_loop_of_a_model_that_never_acts(episodes):
    result = closed_loop(lambda chats: ["I am not sure."] * len(chats), episodes, FMT)
    assert result["episode_success"] == 0.0 and result["progress"] == 0.0
    assert result["actions_per_episode"] == pytest.approx(2 * sum(len(e["steps"]) for e in episodes) / len(episodes))


def test_closed_loop_needs_episode_lines(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1 is not an episode line"):
        read_episodes(tmp_path, "test")


def test_run_reports_closed_loop_columns(smoke_run, tmp_path, monkeypatch):
    args = ["recipe=smoke", *reuse_teacher(smoke_run), "eval.closed_loop=true", "baseline=false", "trainer.max_steps=1"]
    assert main_in_process([*args, f"hydra.run.dir={tmp_path}"], monkeypatch) == 0
    evals = read_summary(tmp_path)["eval"]
    for name in ("teacher", "student"):
        test = evals[name]["test"]
        assert 0.0 <= test["closed_loop_success"] <= test["closed_loop_progress"] <= 1.0
    assert "closed_loop_success | closed_loop_progress |" in (tmp_path / "results.md").read_text()


def test_play_a_saved_student_on_the_synthetic_phone(smoke_run, tmp_path):
    cfg = compose_config(["recipe=smoke", *reuse_teacher(smoke_run), f"play.model={smoke_run / 'student'}"], tmp_path)
    results = play(cfg)
    written = json.loads((tmp_path / "closed_loop.json").read_text())
    assert written["splits"] == results and list(results) == ["test"]
    assert results["test"]["episodes"] == len(read_episodes(smoke_run / "data", "test"))
    assert results["test"]["actions_per_episode"] >= 1


def test_play_needs_a_model_folder(smoke_run, tmp_path):
    cfg = compose_config(["recipe=smoke", *reuse_teacher(smoke_run), f"play.model={tmp_path}"], tmp_path)
    with pytest.raises(ConfigError, match=r"is not a saved model folder(.|\n)*play.model=<run dir>/student"):
        play(cfg)
