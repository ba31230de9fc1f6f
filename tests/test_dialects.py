"""Other tools' spellings: one table (`dialects.SPELLINGS`), every entry read as a key build_config
knows, two names of one key in one place refused, and the resolved config free of them. The
tests walk the table, so a new entry is tested without a new test."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefopt.config import build_config, load_config, resolved_dict, save_resolved
from prefopt.dialects import ALIASES, NON_CANONICAL, PRECEDENCE, SPELLINGS, canonical
from prefopt.errors import PrefoptError
from prefopt.losses import HYPERPARAMETERS
from prefopt.schema import _base_types
from prefopt.values import CANONICAL_KEYS, FIELD_TYPES

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "tests" / "fixtures" / "seed_configs"
# prefopt configs only (deepspeed_zero3.yaml is an accelerate config the SimPO repository launches with)
DIALECT_CONFIGS = sorted(set(SEEDS.glob("*.yaml")) - {SEEDS / "deepspeed_zero3.yaml"}) + sorted(
    (ROOT / "configs").glob("*.yaml"))
BASE = {"method": "simpo"}
CANONICAL_OF = {s.spelling: s.canonical for s in SPELLINGS}
# A value for a key of each type (a text key needs one by name: its values are its own)
TEXTS = {"eval_strategy": "steps", "dtype": "bfloat16", "attn_implementation": "eager", "method": "orpo",
         "loss_type": "hinge", "hub_revision": "v1.0",
         "finetuning_type": "lora", "lora_target": "q_proj,v_proj", "lora_target_modules": ["q_proj", "v_proj"]}  # (a spelling with values of its own: by name)


def sample(name: str) -> object:
    types = _base_types(FIELD_TYPES[name])
    for t, value in ((bool, True), (float, 0.5), (int, 2), (dict, {"use_reentrant": False})):
        if t in types:
            return value
    key = name if name in TEXTS else CANONICAL_OF.get(name, name)
    assert key in TEXTS, f"{key} takes text: give TEXTS a value for it"
    return TEXTS[key]


def base(*names: str) -> dict:
    """BASE with a value for each of `names` (and without BASE's key where one of them names it)."""
    keys = {CANONICAL_OF.get(n, n) for n in names}
    return {k: v for k, v in BASE.items() if k not in keys} | {n: sample(n) for n in names}


@pytest.mark.parametrize("s", SPELLINGS, ids=[s.spelling for s in SPELLINGS])
def test_every_spelling_is_read_as_a_canonical_key_build_config_knows(s):
    assert s.canonical in CANONICAL_KEYS and s.canonical not in NON_CANONICAL  # no chains
    assert s.needs is None or s.needs in HYPERPARAMETERS or s.needs == "method"
    spelled_raw = base(s.spelling)
    value = spelled_raw[s.spelling]
    if s.needs:  # converted with the other key's value as resolved
        converted = s.convert(value, getattr(build_config(spelled_raw).objective, s.needs))
    else:
        raw, later, _ = canonical("c.yaml", {s.spelling: value})
        assert not later and list(raw) == [s.canonical]
        converted = raw[s.canonical]
    spelled = build_config(spelled_raw)
    direct = build_config({k: v for k, v in spelled_raw.items() if k != s.spelling} | {s.canonical: converted})
    assert resolved_dict(spelled) == resolved_dict(direct)
    assert spelled.notes == ([s.noted(value, converted)] if s.note else []) + direct.notes


def groups() -> list[tuple[str, str, list[str]]]:
    """(first, second, the group's names in order) for every two names of one canonical key, from the table."""
    names: dict[str, list[str]] = {}
    for s in SPELLINGS:
        names.setdefault(s.canonical, [s.canonical]).append(s.spelling)
    return [(a, b, group) for group in names.values() for a, b in itertools.combinations(group, 2)
            if PRECEDENCE.get(a) != b]  # (a rule says which one counts: tests/test_dialects_peers.py)


@pytest.mark.parametrize("a, b, group", groups(), ids=[f"{a}+{b}" for a, b, _ in groups()])
def test_two_names_of_one_key_in_one_place_are_refused(tmp_path, a, b, group):
    assert ALIASES[group[0]] == tuple(group)
    message = f"'{a}' and '{b}' say the same thing; keep one of them."
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, b: None, a: None}))  # refused before the values are read
    with pytest.raises(PrefoptError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"
    with pytest.raises(PrefoptError) as e:
        load_config(None, [f"--{b}", "1", f"--{a}", "1"])
    assert str(e.value) == f"command line: {message}"
    with pytest.raises(PrefoptError) as e:
        build_config({**BASE, a: None, b: None})
    assert str(e.value) == f"config: {message}"
    # one in the file, the other on the command line: the command line's wins
    path.write_text(yaml.safe_dump(base(a)))
    overridden = load_config(path, [f"--{b}", json.dumps(sample(b))])
    assert resolved_dict(overridden) == resolved_dict(build_config(base(b)))


@pytest.mark.parametrize("path", DIALECT_CONFIGS, ids=[p.name for p in DIALECT_CONFIGS])
def test_the_resolved_config_holds_canonical_keys_only_and_loads_back(path, tmp_path):
    cfg = load_config(path)
    resolved = resolved_dict(cfg)
    assert not set(resolved) & NON_CANONICAL
    assert set(resolved) <= CANONICAL_KEYS | {"datasets"}  # the data in TRL's list form
    save_resolved(cfg, tmp_path / "prefopt_config.yaml")
    again = load_config(tmp_path / "prefopt_config.yaml")
    assert resolved_dict(again) == resolved
    assert not [n for n in again.notes if " read as " in n]  # nothing left to read as something else


def test_the_dialect_configs_are_walked():
    assert len(DIALECT_CONFIGS) >= 12
    spelled = {s.spelling for p in DIALECT_CONFIGS for s in SPELLINGS if s.spelling in yaml.safe_load(p.read_text())}
    assert {"simpo_gamma", "cpo_alpha", "sft_weight", "torch_dtype", "warmup_ratio"} <= spelled  # not vacuous


def test_what_a_dialect_config_was_read_as():
    notes = load_config(SEEDS / "phi3-mini4k-cpo-simpo.yaml").notes
    assert [n for n in notes if not n.startswith("bf16 without a GPU")] == [
        "evaluation_strategy read as eval_strategy", "torch_dtype read as dtype", "cpo_alpha read as nll_weight",
        "warmup_ratio read as warmup_steps", "gradient_checkpointing read as activation_checkpointing",
        "gradient_checkpointing_kwargs read as activation_checkpointing_kwargs",
        "data: alignment-handbook dataset_mixer with splits ['train', 'test']",
        "loss_type: simpo (TRL) read as method cpo_simpo", "simpo_gamma 5.4 (absolute, TRL) read as gamma_beta_ratio 0.54"]


@pytest.mark.parametrize("raw, attn", [({"use_flash_attention_2": True}, "flash_attention_2"),
                                       ({"use_flash_attention_2": "false"}, None),
                                       ({"use_flash_attention_2": "true"}, "flash_attention_2")])
def test_use_flash_attention_2(raw, attn):
    assert build_config({**BASE, **raw}).model.attn_implementation == attn
    with pytest.raises(PrefoptError, match="use_flash_attention_2: expected true or false, got 'maybe'"):
        build_config({**BASE, "use_flash_attention_2": "maybe"})


def test_the_table_imports_no_transformers():
    code = "import sys, prefopt.dialects, prefopt.schema; assert 'transformers' not in sys.modules, 'transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


# The SimPO repository's early recipes (as the CPO_SIMPO repository keeps them): `beta` + an absolute
# `gamma`, no method, run with SimPO's sigmoid loss on mean log-probs. Written here in that dialect.
CPO_SIMPO_RECIPES = [
    ({"beta": 2.5, "gamma": 1.4, "learning_rate": 1e-6}, "simpo", 1.4 / 2.5),
    ({"beta": 2.0, "gamma": 1.0, "loss_type": "hinge"}, "simpo", 0.5),
    ({"method": "cpo_simpo", "beta": 10.0, "gamma": 5.4}, "cpo_simpo", 0.54),
    ({"method": "alphapo", "gamma": 1.0}, "alphapo", 0.5),  # β the method's default, 2
]


@pytest.mark.parametrize("raw, method, ratio", CPO_SIMPO_RECIPES)
def test_an_absolute_gamma_with_simpo_is_the_simpo_repositorys_margin(raw, method, ratio, tmp_path):
    cfg = build_config({**raw, "output_dir": str(tmp_path)})
    o = cfg.objective
    assert (o.method, o.gamma) == (method, 0.0)
    assert o.gamma_beta_ratio == pytest.approx(ratio, rel=1e-12)  # γ/β: one division
    assert any(f"gamma {raw['gamma']:g} (absolute" in n for n in cfg.notes)
    resolved = resolved_dict(cfg)
    assert resolved_dict(build_config(resolved)) == resolved  # prefopt_config.yaml reads back the same


def test_gamma_stays_repos_and_a_second_margin_is_refused():
    assert build_config({"method": "repo", "gamma": 0.5}).objective.gamma == 0.5
    for second in ({"gamma_beta_ratio": 0.5}, {"simpo_gamma": 1.0, "loss_type": "simpo"}):
        with pytest.raises(PrefoptError, match="'gamma' and '(gamma_beta_ratio|simpo_gamma)' both give the target"):
            build_config({"beta": 2.0, "gamma": 1.0, **second})
    with pytest.raises(PrefoptError, match="cpo takes no absolute margin gamma"):
        build_config({"method": "cpo", "gamma": 1.0})
