"""conf/distill/ options and conf/student/ presets inherit their shared keys from one base in conf/_base/ instead of
repeating them: an option that drops the base's defaults entry, or copies the block back in, fails here."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from autoglm_distill import config as config_lib

from .conftest import compose_config

BASES = config_lib.CONF_DIR / "_base"
INHERIT = {"distill": ["/_base/distill@_here_", "_self_"], "student": ["/_base/student@_here_", "_self_"]}
# The keys every student preset chooses itself (left ??? in the base); the rest are shared values.
STUDENT_OWN = {"path", "arch", "config"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_lib.CONF_DIR / group).glob("*.yaml"))


def raw(group: str, name: str):
    return OmegaConf.load(config_lib.CONF_DIR / group / f"{name}.yaml")


def test_bases_are_not_options_of_their_groups():
    assert {p.stem for p in BASES.glob("*.yaml")} == set(INHERIT)
    for group in INHERIT:
        assert options(group), f"conf/{group}/ is empty"
        assert not any(name.startswith("_") for name in options(group)), options(group)


@pytest.mark.parametrize("name", options("distill"))
def test_distill_option_inherits_the_loss_base(name, tmp_path):
    option = raw("distill", name)
    assert list(option.defaults) == INHERIT["distill"], f"conf/distill/{name}.yaml no longer inherits the base"
    # The option states its kind and nothing else: every other loss key comes from the base.
    assert OmegaConf.to_container(option.loss) == {"kind": name}
    assert set(option) == {"defaults", "loss"}

    base = OmegaConf.load(BASES / "distill.yaml").loss
    assert OmegaConf.is_missing(base, "kind")  # an option that forgets its kind cannot compose a usable loss
    loss = compose_config([f"distill={name}"], tmp_path).distill.loss
    assert list(loss) == list(base)  # same keys, in the base's order
    assert loss.kind == name


def test_distill_options_compose_the_same_loss_but_its_kind(tmp_path):
    # (under the default recipe, which may change shared values, e.g. alpha: the same change for every option)
    losses = {name: compose_config([f"distill={name}"], tmp_path).distill.loss for name in options("distill")}
    shared = [OmegaConf.to_container(loss) | {"kind": None} for loss in losses.values()]
    assert all(one == shared[0] for one in shared), shared


@pytest.mark.parametrize("name", options("student"))
def test_student_preset_inherits_the_shared_keys(name, tmp_path):
    preset = raw("student", name)
    assert list(preset.defaults) == INHERIT["student"], f"conf/student/{name}.yaml no longer inherits the base"
    assert set(preset) - {"defaults"} <= STUDENT_OWN, "a shared key is repeated: change it in conf/_base/student.yaml"

    base = OmegaConf.load(BASES / "student.yaml")
    assert {key for key in base if OmegaConf.is_missing(base, key)} == STUDENT_OWN
    student = compose_config([f"student={name}"], tmp_path).student
    assert list(student) == list(base)  # same keys, in the base's order
    for key in STUDENT_OWN - {"path"}:  # every preset chooses its architecture (or null to take the folder's)
        assert not OmegaConf.is_missing(student, key), f"student={name} leaves student.{key} unset"
    # path: null builds the student from `config`; only a from_pretrained preset leaves it for the command line.
    assert OmegaConf.is_missing(student, "path") == (student.config is None), name


def test_student_presets_compose_the_same_shared_values(tmp_path):
    # (under the default recipe, which may change shared values: the same change for every preset)
    students = [
        OmegaConf.to_container(compose_config([f"student={name}"], tmp_path).student) for name in options("student")
    ]
    shared = [{key: value for key, value in one.items() if key not in STUDENT_OWN} for one in students]
    assert all(one == shared[0] for one in shared), shared
