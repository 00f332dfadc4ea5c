"""Hosted mode: models only from allow-listed folders, no escapes, limits with clear messages."""

import os

import pytest

import mol
from mol.errors import AccessError, ResourceError
from mol.hosted import AccessPolicy, Limits, hosted


@pytest.fixture
def hosted_env(monkeypatch, tiny):
    allowed = tiny("llama").parent
    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("MANGO_MODEL_DIRS", str(allowed))
    return allowed


def recipe(ref, slots=("a:0",)):
    return mol.Recipe.from_dict({"name": "h", "models": {"a": ref}, "slots": list(slots)})


def test_space_turns_hosted_mode_on(monkeypatch):
    monkeypatch.delenv("MANGO_HOSTED", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/some-space")
    assert hosted()
    monkeypatch.setenv("MANGO_HOSTED", "0")
    assert not hosted()


def test_allowed_folder_plans(hosted_env, tiny):
    assert mol.plan(recipe(str(tiny("llama")))).base.num_layers == 4


def test_folder_outside_the_allow_list_is_refused(hosted_env, tmp_path, tiny):
    import shutil

    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny("llama"), outside)
    with pytest.raises(AccessError, match="outside the folders"):
        mol.plan(recipe(str(outside)))


def test_dotdot_is_refused(hosted_env, tiny):
    sneaky = os.path.join(str(tiny("llama")), "..", tiny("llama").name)
    with pytest.raises(AccessError, match=r"'\.\.'"):
        mol.plan(recipe(sneaky))


def test_symlink_out_of_the_allow_list_is_refused(hosted_env, tmp_path, tiny):
    import shutil

    outside = tmp_path / "secret-model"
    shutil.copytree(tiny("llama"), outside)
    link = hosted_env / "innocent"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(AccessError):
            mol.plan(recipe(str(link)))
    finally:
        link.unlink()


def test_system_paths_are_refused(hosted_env):
    with pytest.raises(mol.MolError):
        mol.plan(recipe("/etc"))


def test_hub_is_refused_unless_allowed(hosted_env):
    with pytest.raises(AccessError, match="Hub"):
        mol.plan(recipe("someone/some-model"))


def test_recipe_and_generation_limits():
    policy = AccessPolicy(
        allowed_dirs=[], limits=Limits(slots=2, new_tokens=10, prompt_chars=5), enforce_limits=True
    )
    with pytest.raises(ResourceError, match="at most 2"):
        policy.check_recipe(recipe("x", ["a:0", "a:1", "a:2"]))
    with pytest.raises(ResourceError, match="allows 10"):
        policy.check_generation("hi", 11)
    with pytest.raises(ResourceError, match="characters"):
        policy.check_generation("too long", 1)
    policy.check_generation("ok", 10)


def test_local_mode_has_no_restrictions(monkeypatch, tiny):
    monkeypatch.setenv("MANGO_HOSTED", "0")
    assert not AccessPolicy.from_env().restricted
    assert mol.plan(recipe(str(tiny("llama")))).base.width == 64
