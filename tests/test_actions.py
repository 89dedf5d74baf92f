"""Tests for answer parsing and ActionMetrics."""

import pytest
import torch

from autoglm_distill.actions import (
    ActionMetrics,
    action_type,
    normalise_text,
    parse_action,
    split_response,
    step_correct,
    try_parse,
)


def wrap(action: str, think: str = "I look at the screen.") -> str:
    return f"<think>{think}</think><answer>{action}</answer>"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('do(action="Tap", element=[500,150])', {"_metadata": "do", "action": "Tap", "element": [500, 150]}),
        ('do(action="Type", text="hello")', {"_metadata": "do", "action": "Type", "text": "hello"}),
        (
            'do(action="Swipe", start=[500,800], end=[500,200])',
            {"_metadata": "do", "action": "Swipe", "start": [500, 800], "end": [500, 200]},
        ),
        (
            'do(action="Long Press", element=[140, 180])',
            {"_metadata": "do", "action": "Long Press", "element": [140, 180]},
        ),
        ('do(action="Launch", app="Maps")', {"_metadata": "do", "action": "Launch", "app": "Maps"}),
        ('do(action="Back")', {"_metadata": "do", "action": "Back"}),
        ('do(action="Home")', {"_metadata": "do", "action": "Home"}),
        (
            'do(action="Wait", duration="2 seconds")',
            {"_metadata": "do", "action": "Wait", "duration": "2 seconds"},
        ),
        ('finish(message="Wi-Fi is on.")', {"_metadata": "finish", "message": "Wi-Fi is on."}),
    ],
)
def test_every_action_type_parses_from_full_response(answer: str, expected: dict) -> None:
    assert try_parse(wrap(answer)) == expected
    assert parse_action(answer) == expected
    assert action_type(expected) == expected.get("action", "finish")


def test_split_response_rules() -> None:
    # Tags present: thinking without tags, answer cut at </answer>.
    assert split_response(wrap('do(action="Back")', "Go back.")) == ("Go back.", 'do(action="Back")')
    assert split_response(wrap('finish(message="ok")')) == ("I look at the screen.", 'finish(message="ok")')
    # Tag-free output as Open-AutoGLM's server returns it: split at the call.
    assert split_response('Thinking here.\ndo(action="Home")') == ("Thinking here.", 'do(action="Home")')
    # Legacy <answer> fallback with something that is not a call.
    assert split_response("<think>t</think><answer>noop</answer>") == ("t", "noop")
    # No marker at all: whole text is the answer.
    assert split_response("just prose") == ("", "just prose")


def test_type_keeps_quotes_and_commas() -> None:
    action = try_parse(wrap('do(action="Type", text="Say "hi", then leave, ok")'))
    assert action == {"_metadata": "do", "action": "Type", "text": 'Say "hi", then leave, ok'}
    # Type_Name is an alias of Type in Open-AutoGLM.
    assert parse_action('do(action="Type_Name", text="Bob")')["action"] == "Type"


def test_finish_message_with_quotes_and_newlines() -> None:
    assert try_parse(wrap('finish(message="He said "yes",\nthen left")'))["message"] == 'He said "yes",\nthen left'


def test_do_with_newline_in_string_is_escaped() -> None:
    assert parse_action('do(action="Launch", app="Ma\nps")')["app"] == "Ma\nps"


@pytest.mark.parametrize(
    "text",
    [
        "I should tap Wi-Fi.",  # no tags, no call
        "<think>hmm</think>",  # thinking only
        wrap('do(action="Tap", element=[500,150]'),  # broken call
        wrap("click(element=[1,2])"),  # unknown function
        wrap("do(action=Tap)"),  # non-literal argument
        wrap('do(action="Type")'),  # Type without text
        wrap("done"),  # starts with "do" but is no call
    ],
)
def test_malformed_answers(text: str) -> None:
    assert try_parse(text) is None
    with pytest.raises(ValueError, match="Failed to parse action"):
        parse_action(split_response(text)[1])


def test_action_type_unknown() -> None:
    assert action_type({"_metadata": "do"}) == ""
    assert action_type({"_metadata": "finish", "message": "x"}) == "finish"


def test_metrics_hand_computed_batch() -> None:
    tap = 'do(action="Tap", element=[{},{}])'
    rows = [
        # (prediction, reference, bbox): comment says parse / type / tap / exact
        (wrap(tap.format(500, 150)), wrap(tap.format(500, 150)), [40, 120, 960, 180]),  # 1 1 hit 1
        (wrap(tap.format(100, 300)), wrap(tap.format(500, 230)), [40, 200, 960, 260]),  # 1 1 miss 0
        (wrap(tap.format(220, 120)), wrap(tap.format(140, 180)), [60, 120, 220, 240]),  # 1 1 hit(edge) 0
        (
            wrap(tap.format(500, 300)),
            wrap('do(action="Long Press", element=[500,300])'),
            [40, 270, 960, 330],
        ),  # 1 0 miss(type) 0
        ("I think I should type", wrap('do(action="Type", text="hello, world")'), None),  # 0 0 - 0
        (wrap('do(action="Launch", app="Maps")'), wrap('do(action="Launch", app="Maps")'), None),  # 1 1 - 1
        (
            wrap('do(action="Swipe", start=[500,200], end=[500,800])'),
            wrap('do(action="Swipe", start=[500,800], end=[500,200])'),
            None,
        ),  # 1 1 - 0
        (wrap('finish(message="Done")'), wrap('finish(message="Done")'), None),  # 1 1 - 1
        (wrap(tap.format(10, 10)), wrap(tap.format(500, 500)), None),  # 1 1 - 0 (no bbox: not in tap)
    ]
    preds, refs, boxes = map(list, zip(*rows, strict=True))
    metric = ActionMetrics()
    metric.update(preds[:4], refs[:4], boxes[:4])  # two batches accumulate like one
    metric.update(preds[4:], refs[4:], boxes[4:])
    out = metric.compute()
    assert set(out) == {
        "parse_rate", "action_type_acc", "tap_in_element", "tap_within_14pct", "step_success", "exact_match", "n"
    }  # fmt: skip
    assert out["n"].item() == 9
    assert out["parse_rate"].item() == pytest.approx(8 / 9)
    assert out["action_type_acc"].item() == pytest.approx(7 / 9)
    assert out["tap_in_element"].item() == pytest.approx(2 / 4)
    assert out["exact_match"].item() == pytest.approx(3 / 9)


def test_metrics_malformed_point_is_a_miss() -> None:
    metric = ActionMetrics()
    ref = wrap('do(action="Tap", element=[500,150])')
    metric.update(
        [wrap('do(action="Tap", element="here")'), wrap('do(action="Tap")')],
        [ref, ref],
        [[0, 0, 1000, 1000]] * 2,
    )
    assert metric.compute()["tap_in_element"].item() == 0.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metrics_empty_returns_zeros() -> None:
    out = ActionMetrics().compute()
    for value in out.values():
        assert not torch.isnan(value)
        assert value.item() == 0.0


def test_metrics_input_errors() -> None:
    metric = ActionMetrics()
    with pytest.raises(ValueError, match="length mismatch"):
        metric.update(["a"], [], [])
    with pytest.raises(ValueError, match="reference answer does not parse"):
        metric.update(["a"], ["not an action"], [None])


def test_field_metrics_on_hand_made_predictions() -> None:
    """Both grounding protocols, step success (arguments judged as GUI-agent papers do) and episode success."""
    box = [400, 100, 600, 200]
    rows = [  # prediction, reference, box, episode   -> in box, within 14%, step ok, exact
        ('do(action="Tap", element=[500,150])', 'do(action="Tap", element=[500,150])', box, "e1"),  # 1 1 1 1
        ('do(action="Tap", element=[610,150])', 'do(action="Tap", element=[500,150])', box, "e1"),  # 0 1 0 0
        ('do(action="Tap", element=[600,260])', 'do(action="Tap", element=[500,150])', None, "e2"),  # - 0 0 0
        ('do(action="Double Tap", element=[550,250])', 'do(action="Double Tap", element=[500,150])', None, "e2"),
        # ^ distance 111.8 <= 140: - 1 1 0
        ('do(action="Type", text=" Hello   World")', 'do(action="Type", text="hello world")', None, "e3"),  # 1 0
        ('do(action="Launch", app="maps")', 'do(action="Launch", app="Maps")', None, "e3"),  # step 1, exact 0
        ('do(action="Swipe", start=[500,900], end=[520,100])', 'do(action="Swipe", start=[500,800], end=[500,200])',
         None, "e3"),  # same direction (up): step 1, exact 0
        ('do(action="Swipe", start=[500,200], end=[500,800])', 'do(action="Swipe", start=[500,800], end=[500,200])',
         None, "e4"),  # opposite: step 0
        ('finish(message="All set")', 'finish(message="Done")', None, "e5"),  # step 1, exact 0
        ('do(action="Wait", duration="2 seconds")', 'do(action="Wait", duration="1 seconds")', None, "e5"),  # 1 0
    ]  # fmt: skip
    preds, refs, boxes, episodes = map(list, zip(*rows, strict=True))
    metric = ActionMetrics()
    metric.update([wrap(p) for p in preds[:5]], [wrap(r) for r in refs[:5]], boxes[:5], episodes[:5])
    metric.update([wrap(p) for p in preds[5:]], [wrap(r) for r in refs[5:]], boxes[5:], episodes[5:])
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out["tap_in_element"] == pytest.approx(1 / 2)  # the two references with a box
    assert out["tap_within_14pct"] == pytest.approx(3 / 4)  # all four point references
    assert out["step_success"] == pytest.approx(7 / 10)
    assert out["exact_match"] == pytest.approx(1 / 10)
    assert out["episode_success"] == pytest.approx(2 / 5)  # e3 and e5; e1, e2, e4 each miss a step


def test_episode_success_only_when_episodes_are_given() -> None:
    metric = ActionMetrics()
    metric.update([wrap('do(action="Back")')], [wrap('do(action="Back")')], [None])
    assert "episode_success" not in metric.compute()


def test_step_correct_rules() -> None:
    ref = {"_metadata": "do", "action": "Type", "text": "Coffee  shop"}
    assert step_correct({"_metadata": "do", "action": "Type", "text": "coffee shop "}, ref, None)
    assert not step_correct({"_metadata": "do", "action": "Type", "text": "coffee"}, ref, None)
    assert not step_correct(None, ref, None)
    tap = {"_metadata": "do", "action": "Tap", "element": [500, 500]}
    assert step_correct({**tap, "element": [598, 598]}, tap, None)  # 138.6 from the reference: inside 14%
    assert not step_correct({**tap, "element": [600, 600]}, tap, None)  # 141.4
    assert not step_correct({**tap, "element": [598, 598]}, tap, [450, 450, 550, 550])  # the box decides
    assert normalise_text("  A\tB  c ") == "a b c"
