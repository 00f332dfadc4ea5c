"""Hosted mode: models only from allow-listed folders, no escapes, limits with clear messages.

The library takes its access policy as an argument and reads no hosting setting; the studio builds the policy
from its configuration (MANGO_HOSTED, MANGO_MODEL_DIRS, ...) and passes it on every call."""

import os
import shutil

import pytest

import mol
from mol.errors import AccessError, ModelNotFoundError, ResourceError
from studio.engine import StudioConfig, StudioEngine
from studio.limits import ASSETS_MODELS, Limits, hosted, hosted_policy

HOSTING_ENV = ("MANGO_HOSTED", "SPACE_ID", "MANGO_MODEL_DIRS", "MANGO_HOSTED_ALLOW_HUB")


@pytest.fixture
def allowed(tiny):
    return tiny("llama").parent


@pytest.fixture
def policy(allowed):
    """What a hosted studio passes: the embedded models and the allowed folder, no Hub, no pickles."""
    return hosted_policy([allowed])


@pytest.fixture
def quiet_env(monkeypatch):
    """An environment that says nothing about hosting."""
    for name in HOSTING_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def outside(tmp_path, tiny):
    return shutil.copytree(tiny("llama"), tmp_path / "elsewhere")


def recipe(ref, slots=("a:0",)):
    return mol.Recipe.from_dict({"name": "h", "models": {"a": ref}, "slots": list(slots)})


# ---- the library: the policy it is given, and nothing else -------------------------------------------------


def test_the_default_policy_is_unrestricted_local_use():
    p = mol.AccessPolicy()
    assert not p.restricted and p.allow_hub and not p.allow_bin and not p.allow_remote_code
    assert hosted_policy().allowed_dirs == (ASSETS_MODELS.resolve(),) and not hosted_policy().allow_hub


def test_allowed_folder_plans(policy, tiny):
    p = mol.plan(recipe(str(tiny("llama"))), policy=policy)
    assert p.base.num_layers == 4 and p.base.policy is policy


def test_an_explicit_policy_refuses_a_folder_outside_it_while_the_env_says_nothing(
    quiet_env, policy, outside
):
    with pytest.raises(AccessError, match="outside the folders"):
        mol.plan(recipe(str(outside)), policy=policy)
    with pytest.raises(AccessError, match="outside the folders"):
        mol.build(recipe(str(outside)), device="cpu", policy=policy)
    assert mol.plan(recipe(str(outside))).base.width == 64  # no policy given: local use


def test_hosting_env_alone_changes_nothing_in_the_library(monkeypatch, allowed, outside):
    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("SPACE_ID", "someone/some-space")
    monkeypatch.setenv("MANGO_MODEL_DIRS", str(allowed))
    monkeypatch.setenv("MANGO_LIMIT_SLOTS", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert mol.plan(recipe(str(outside), ["a:0", "a:1"])).base.width == 64  # outside, and over the slot limit
    with pytest.raises(ModelNotFoundError):  # the Hub is tried (offline here), not refused
        mol.plan(recipe("someone/some-model"))
    from mol.sources import load_source

    assert load_source("a", str(outside)).policy == mol.AccessPolicy()


def test_a_plan_keeps_its_policy_for_the_files_the_build_opens(policy, allowed, tmp_path, tiny):
    model = shutil.copytree(tiny("llama"), allowed / "swapped")
    try:
        p = mol.plan(recipe(str(model)), policy=policy)
        secret = shutil.copy(model / "model.safetensors", tmp_path / "secret.safetensors")
        (model / "model.safetensors").unlink()
        (model / "model.safetensors").symlink_to(secret)  # swapped for a link out after planning
        with pytest.raises(AccessError, match="leads outside"):
            mol.build(p, device="cpu")
    finally:
        shutil.rmtree(model)


def test_dotdot_is_refused(policy, tiny):
    sneaky = os.path.join(str(tiny("llama")), "..", tiny("llama").name)
    with pytest.raises(AccessError, match=r"'\.\.'"):
        mol.plan(recipe(sneaky), policy=policy)


def test_symlink_out_of_the_allow_list_is_refused(policy, allowed, outside):
    link = allowed / "innocent"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(AccessError):
            mol.plan(recipe(str(link)), policy=policy)
    finally:
        link.unlink()


def test_system_paths_are_refused(policy):
    with pytest.raises(mol.MolError):
        mol.plan(recipe("/etc"), policy=policy)


def test_hub_is_refused_unless_allowed(policy):
    with pytest.raises(AccessError, match="Hub"):
        mol.plan(recipe("someone/some-model"), policy=policy)


# ---- the studio: its configuration, its limits, its policy passed on ---------------------------------------


def test_space_turns_hosted_mode_on(monkeypatch):
    monkeypatch.delenv("MANGO_HOSTED", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/some-space")
    assert hosted() and StudioConfig.from_env().hosted
    monkeypatch.setenv("MANGO_HOSTED", "0")
    assert not hosted()


def test_the_studio_config_builds_the_policy_from_the_env(monkeypatch, allowed):
    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("MANGO_MODEL_DIRS", str(allowed))
    monkeypatch.delenv("MANGO_HOSTED_ALLOW_HUB", raising=False)
    p = StudioConfig.from_env().access_policy()
    assert p == hosted_policy([allowed]) and p.restricted and not p.allow_hub and not p.allow_bin
    monkeypatch.setenv("MANGO_HOSTED_ALLOW_HUB", "1")
    assert StudioConfig.from_env().access_policy().allow_hub
    monkeypatch.setenv("MANGO_HOSTED", "0")
    assert StudioConfig.from_env().access_policy() == mol.AccessPolicy()


def test_recipe_and_generation_limits():
    limits = Limits(slots=2, new_tokens=10, prompt_chars=5)
    with pytest.raises(ResourceError, match="at most 2"):
        limits.check_recipe(recipe("x", ["a:0", "a:1", "a:2"]))
    with pytest.raises(ResourceError, match="allows 10"):
        limits.check_generation("hi", 11)
    with pytest.raises(ResourceError, match="characters"):
        limits.check_generation("too long", 1)
    limits.check_generation("ok", 10)


@pytest.fixture
def hosted_engine(monkeypatch, allowed, tmp_path):
    monkeypatch.setenv("MANGO_HOSTED", "1")
    monkeypatch.setenv("MANGO_MODEL_DIRS", str(allowed))
    monkeypatch.setenv("MANGO_LIMIT_SLOTS", "3")
    monkeypatch.setenv("MANGO_DB_URL", f"sqlite:///{tmp_path / 'studio.db'}")
    return StudioEngine(StudioConfig.from_env())


def test_the_hosted_studio_passes_its_policy_on(hosted_engine, monkeypatch, tiny, outside):
    engine = hosted_engine
    seen = []
    real_plan = mol.plan

    def spy(the_recipe, sources=None, policy=mol.AccessPolicy()):
        seen.append(policy)
        return real_plan(the_recipe, sources, policy=policy)

    monkeypatch.setattr(mol, "plan", spy)
    for name in HOSTING_ENV:  # the engine holds its configuration: the env is read once, at start
        monkeypatch.delenv(name, raising=False)
    expected = hosted_policy([tiny("llama").parent])
    assert engine.policy == expected
    assert engine.check(recipe(str(tiny("llama"))).to_dict()).ok
    report = engine.check(recipe(str(outside)).to_dict())
    assert not report.ok and "outside the folders" in report.error
    with pytest.raises(AccessError, match="outside the folders"):
        engine.model_card("x", str(outside))
    with pytest.raises(AccessError, match="Hub"):
        engine.model_card("x", "org/some-model")
    with pytest.raises(AccessError, match="outside the folders"):
        engine.fused_for_source("x", str(outside))
    assert seen and all(p == expected for p in seen)


def test_the_hosted_studio_checks_its_limits_before_the_library(hosted_engine, tiny):
    many = recipe(str(tiny("llama")), ["a:0", "a:1", "a:2", "a:3"])
    report = hosted_engine.check(many.to_dict())
    assert not report.ok and "this server allows at most 3" in report.error
    assert mol.plan(many, policy=hosted_engine.policy).base.num_layers == 4  # limits are not the library's
    with pytest.raises(ResourceError, match="characters"):
        hosted_engine.check_prompt("x" * 5000, 4)


def test_local_mode_has_no_restrictions(monkeypatch, tiny, tmp_path):
    monkeypatch.setenv("MANGO_HOSTED", "0")
    config = StudioConfig.from_env()
    assert not config.access_policy().restricted
    engine = StudioEngine(StudioConfig(db_url=f"sqlite:///{tmp_path / 'studio.db'}"))
    assert engine.check(recipe(str(tiny("llama"))).to_dict()).ok
    assert mol.plan(recipe(str(tiny("llama")))).base.width == 64
