"""Tests for the launcher episodes of the screenshot demo (find an app's icon by its look)."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from autoglm_distill.actions import try_parse
from autoglm_distill.data import launcher, synth
from autoglm_distill.data.episodes import EpisodeFormat, check_episode, step_chats
from autoglm_distill.validate import ConfigError, validate

from .conftest import compose_config

SIZES = {"n_train": 120, "n_val": 20, "n_test": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("launcher") / "data", seed=0, kind="launcher", **SIZES)


def episodes(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def taps(folder: Path, split: str) -> list[tuple[dict, dict]]:
    """(episode, step) of every Tap."""
    return [(ep, s) for ep in episodes(folder, split) for s in ep["steps"] if s["action"].startswith('do(action="Tap"')]


def cell_of(box: list[int]) -> int:
    """The grid cell of an icon box (rows start below the status bar's row)."""
    (x1, y1, x2, y2), cols = box, launcher.COLUMNS
    return ((y1 + y2) // 2 // launcher.CELL_H - 1) * cols + (x1 + x2) // 2 // launcher.CELL_W


def test_every_app_has_its_own_icon_and_held_out_cells() -> None:
    assert len(set(launcher.ICONS.values())) == len(launcher.ICONS) == len(synth.APPS)
    for app in synth.APPS:
        assert len(launcher.held_out_cells(app)) == 4
        assert all(0 <= c < launcher.COLUMNS * launcher.ROWS for c in launcher.held_out_cells(app))


def test_the_screenshot_shows_the_target_icon_in_its_colour_and_the_tap_lands_on_it(data: Path) -> None:
    """Grounding from pixels is possible: the tap lands on a tile of the app's colour (on the white shape in its
    middle), and the thinking names that colour, shape, row and column."""
    for ep, step in taps(data, "train") + taps(data, "test"):
        app = re.fullmatch(r"(?:Open |Open the |Go to )(\w+)(?: app)?", ep["task"]).group(1)
        x, y = try_parse(f"<answer>{step['action']}</answer>")["element"]
        x1, y1, x2, y2 = step["target"]["bbox"]
        assert x1 <= x <= x2 and y1 <= y <= y2
        image = Image.open(data / step["screenshot"])
        colour, shape = launcher.ICONS[app]
        corner = (x1 * image.width // 1000 + 1, y1 * image.height // 1000 + 1)
        assert image.getpixel(corner) == launcher.COLOURS[colour]  # the tile
        assert image.getpixel((x * image.width // 1000, y * image.height // 1000)) == (255, 255, 255)  # its shape
        row, col = divmod(cell_of(step["target"]["bbox"]), launcher.COLUMNS)
        assert launcher.cell_box(row * launcher.COLUMNS + col) == (x1, y1, x2, y2)
        row, col = row + 1, col + 1
        assert step["thinking"] == f"{app} is the {colour} {shape}, in row {row}, column {col}, so I tap it."
        assert sum(e["text"] == app for e in step["elements"]) == 1


def test_a_swipe_page_lacks_the_app_and_every_episode_ends_with_it_open(data: Path) -> None:
    swipes = 0
    for ep in episodes(data, "train"):
        kinds = [s["action"].split('"')[1] if s["action"].startswith("do(") else "finish" for s in ep["steps"]]
        assert kinds in (["Tap", "finish"], ["Swipe", "Tap", "finish"])
        app = ep["steps"][-1]["current_app"]
        assert ep["steps"][-1]["action"] == f'finish(message="{app} is open.")'
        if kinds[0] == "Swipe":
            swipes += 1
            assert app not in {e["text"] for e in ep["steps"][0]["elements"]}
    assert 0.15 < swipes / len(episodes(data, "train")) < 0.45


def test_val_and_test_ask_for_icons_where_training_never_did(data: Path) -> None:
    def cells(split: str) -> set[tuple[str, int]]:
        return {(ep["steps"][-1]["current_app"], cell_of(step["target"]["bbox"])) for ep, step in taps(data, split)}

    assert all(cell not in launcher.held_out_cells(app) for app, cell in cells("train"))
    assert all(cell in launcher.held_out_cells(app) for app, cell in cells("val") | cells("test"))


def test_episodes_read_as_screenshot_chats_without_element_lists(data: Path) -> None:
    fmt = EpisodeFormat("system", history_steps=1, elements_in_text=False)
    record = step_chats(check_episode(episodes(data, "val")[0], data), fmt)[0]
    user = record["messages"][-2]["content"]
    assert [item["type"] for item in user] == ["image", "text"] and "Elements" not in user[1]["text"]


def test_same_seed_same_bytes_and_a_phone_folder_is_not_reused_as_launcher(tmp_path: Path, data: Path) -> None:
    again = synth.generate(tmp_path / "again", seed=0, kind="launcher", **SIZES)
    assert all((again / p).read_bytes() == (data / p).read_bytes() for p in ("train.jsonl", "images/train-00003/0.png"))
    with pytest.raises(FileExistsError, match="'kind': 'launcher'"):
        synth.generate(again, seed=0, kind="phone", **SIZES)
    with pytest.raises(ValueError, match="unknown synthetic data kind 'icons'.*data.generate.kind"):
        synth.generate(tmp_path / "bad", kind="icons")
    assert not (tmp_path / "bad").exists()


def test_a_folder_written_before_kinds_existed_is_reused_as_phone(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "d", images=False, n_train=4, n_val=2, n_test=2)
    meta = json.loads((out / synth.META_FILE).read_text())
    del meta["kind"]
    (out / synth.META_FILE).write_text(json.dumps(meta))
    assert synth.generate(out, images=False, n_train=4, n_val=2, n_test=2) == out


def test_a_wrong_kind_in_the_config_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.generate.kind='icons'.*phone, launcher"):
        validate(compose_config(["recipe=demo_vision", "data.generate.kind=icons"], tmp_path))
