"""The model card (prefopt.modelcard): every run writes output_dir/README.md with a YAML header the
Hub reads and a body that says what was trained, on what, with which result, and how to load it —
its loading example runs as written, for a full model and for a LoRA adapter. A README.md that is
not the run's own is never overwritten."""

import json
import re
import shutil

import pytest

from prefopt import manifest, modelcard
from prefopt.config import build_config
from prefopt.errors import PrefoptError
from prefopt.explanation import loss_formula
from prefopt.pipeline import train


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("modelcard", {"train": (8, 0), "test": (4, 1)}, chat=True, method="cpo_simpo",
                     learning_rate=5e-3, seed=3, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                     save_strategy="no", report_to="none")


def _run(ws, out, **keys):
    cfg = build_config({**ws.config, "output_dir": str(out), **keys})
    return cfg, train(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def full(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("card-runs") / "full"
    return out, *_run(ws, out)


@pytest.fixture(scope="module")
def lora(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("card-runs") / "lora"
    return out, *_run(ws, out, use_peft=True, lora_r=4, lora_alpha=8)


def _python_block(card: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    return code


def test_the_card_header_parses_and_says_what_was_trained(full):
    out, cfg, result = full
    card = (out / "README.md").read_text()
    meta = modelcard.front_matter(card)
    assert meta["library_name"] == "prefopt" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:2] == ["prefopt", "cpo_simpo"]
    # a local base and local data mean nothing on the Hub: not in the header, named in the body
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
    assert f"`{cfg.model.model_name_or_path}`" in card
    # the objective, its formula and the settings as `config explain` prints them
    assert loss_formula(cfg) in card and "CPO-SimPO" in card
    assert "4 pairs per device × 1 accumulation × 1 = 4 pairs per step, seed 3" in card
    # the data report's counts
    report = json.loads((out / "data_report.json").read_text())
    assert f"| train | {report['train']['rows_in']} | {report['train']['kept']} | none |" in card
    assert f"| eval | {report['eval']['rows_in']} | {report['eval']['kept']} | none |" in card
    # the final evaluation, every metric of it, as the run returned it
    final = result.eval_metrics
    assert "Final evaluation (step 2, held-out pairs)" in card
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert f"| {key.removeprefix('eval_')} | {final[key]:.4g} |" in card
    assert "eval_runtime" not in card and "samples_per_second" not in card  # timings are not results
    assert f"{result.train_metrics['train_loss']:.4g} (2 steps)" in card
    # plots and the record
    for png in (out / "plots").glob("*.png"):
        assert f"(plots/{png.name})" in card
    assert card.index("(plots/overview.png)") < card.index("(plots/accuracies.png)")  # the overview first
    assert "## Reproducibility" in card and "prefopt_provenance.json" in card
    # the card is the run's own file
    assert "README.md" in manifest.read_manifest(out)["files"]


@pytest.mark.parametrize("which", ["full", "lora"])
def test_the_loading_example_runs_as_written(which, request):
    out = request.getfixturevalue(which)[0]
    code = _python_block((out / "README.md").read_text()).replace("max_new_tokens=256", "max_new_tokens=4")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the card's own example)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]  # it answered
    if which == "lora":
        from peft import PeftModel

        assert isinstance(namespace["model"], PeftModel)


def test_a_lora_card_is_the_adapters(lora):
    out, cfg, _ = lora
    card = (out / "README.md").read_text()
    meta = modelcard.front_matter(card)
    # the Hub's convention for an adapter: library_name peft (prefopt a tag); PEFT's own template replaced
    assert meta["library_name"] == "peft" and {"prefopt", "cpo_simpo", "lora"} <= set(meta["tags"])
    assert "Model Card for Model ID" not in card and "More Information Needed" not in card
    assert card.count("A LoRA adapter for") == 1 and "AutoPeftModelForCausalLM" in card
    assert f"prefopt merge {out}" in card
    assert "README.md" in manifest.read_manifest(out)["files"]


def test_hub_ids_and_the_bases_license(ws, tmp_path, monkeypatch):
    """base_model and datasets only when they are Hub ids; the license from the base's card where it
    is on this machine (its folder, or the Hugging Face cache), nothing downloaded."""
    import huggingface_hub.constants

    keys = {**ws.config, "output_dir": str(tmp_path / "o")}
    hub_data = {"dataset_mixer": {"HuggingFaceH4/ultrafeedback_binarized": 1.0, str(ws.data): 1.0}}
    cfg = build_config({**keys, **hub_data, "model_name_or_path": "Org/Base-1B"})
    assert modelcard.metadata(cfg, adapter=False) == {
        "base_model": "Org/Base-1B", "library_name": "prefopt", "datasets": ["HuggingFaceH4/ultrafeedback_binarized"],
        "tags": ["prefopt", "cpo_simpo", "preference-optimization"], "pipeline_tag": "text-generation"}
    adapter = modelcard.metadata(cfg, adapter=True)
    assert adapter["library_name"] == "peft" and "base_model:adapter:Org/Base-1B" in adapter["tags"]
    # the base's card in the cache, as from_pretrained leaves it (refs/main → snapshots/<sha>/)
    cache = tmp_path / "hub"
    snapshot = cache / "models--Org--Base-1B" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--Org--Base-1B" / "refs").mkdir()
    (cache / "models--Org--Base-1B" / "refs" / "main").write_text("a" * 40)
    (snapshot / "README.md").write_text("---\nlicense: llama3.1\n---\n# Base\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert modelcard.metadata(cfg, adapter=False)["license"] == "llama3.1"
    # a local base folder's card
    base = tmp_path / "base"
    shutil.copytree(ws.model, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n")
    local = build_config({**keys, "model_name_or_path": str(base)})
    assert modelcard.metadata(local, adapter=False)["license"] == "apache-2.0"
    assert "base_model" not in modelcard.metadata(local, adapter=False)
    # a loader with data_files is not a dataset of the Hub
    plain = {k: v for k, v in keys.items() if k not in ("dataset_mixer", "dataset_splits")}
    files = build_config({**plain, "datasets": [{"path": "json", "data_files": str(ws.data / "train.jsonl")}]})
    assert "datasets" not in modelcard.metadata(files, adapter=False)
    assert modelcard.hub_id("../x") is None and modelcard.hub_id("a/b/c") is None and modelcard.hub_id("gpt2")


def test_the_users_readme_is_refused_and_never_overwritten(ws, full, tmp_path):
    # at the start: a README.md the run did not write is where the card would go
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(PrefoptError, match="README.md, which this run did not write"):
        _run(ws, out)
    assert (out / "README.md").read_text() == "my notes"
    # at the end: one put there while the run trained (not in the manifest, there before the final save)
    done = tmp_path / "done"
    shutil.copytree(full[0], done)
    record = manifest.read_manifest(done)
    record["files"].remove("README.md")
    (done / manifest.MANIFEST).write_text(json.dumps(record))
    (done / "README.md").write_text("mine")
    said = []
    assert not modelcard.write_card(full[1], done, log=said.append)
    assert (done / "README.md").read_text() == "mine" and "is not the card this run wrote" in said[0]
    # the run's own card is rewritten (a repository named)
    own = tmp_path / "own"
    shutil.copytree(full[0], own)
    assert modelcard.write_card(full[1], own, repo_id="me/model", log=said.append)
    assert 'from_pretrained("me/model")' in (own / "README.md").read_text()


def test_an_edited_card_is_the_users(ws, full, tmp_path):
    """The run's card, edited: never rewritten, and no longer the run's to delete (overwrite_output_dir
    refuses, as for any file of the user's where the run writes)."""
    out = tmp_path / "run"
    shutil.copytree(full[0], out)
    assert (out / "README.md") in manifest.owned(out, manifest.read_manifest(out))
    edited = (out / "README.md").read_text() + "\nMy notes on this model.\n"
    (out / "README.md").write_text(edited)
    assert (out / "README.md") not in manifest.owned(out, manifest.read_manifest(out))
    assert not modelcard.write_card(full[1], out, repo_id="me/model", log=lambda *a: None)
    with pytest.raises(PrefoptError, match="README.md, which this run did not write"):
        _run(ws, out, overwrite_output_dir=True)
    assert (out / "README.md").read_text() == edited


@pytest.mark.parametrize("saving", [{}, {"save_strategy": "steps", "save_steps": 1}], ids=["no-checkpoints", "checkpoints"])
def test_a_readme_the_user_writes_mid_run_stays_theirs(ws, tmp_path, monkeypatch, saving):
    """A README.md put in output_dir while the run trains is not the run's: the end leaves it, the
    manifest does not list it, push neither rewrites nor uploads it, an overwrite refuses. (With
    checkpoints, the checkpoint saved right after it was written records the folder mid-run too.)"""
    from transformers import TrainerCallback

    from prefopt import hub, pipeline

    out = tmp_path / "run"

    class UserWrites(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                (out / "README.md").write_text("MY OWN NOTES")

    build = pipeline.build_trainer

    def with_user(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(UserWrites())
        return trainer

    monkeypatch.setattr(pipeline, "build_trainer", with_user)
    cfg, _ = _run(ws, out, **saving)
    monkeypatch.setattr(pipeline, "build_trainer", build)
    record = manifest.read_manifest(out)
    assert (out / "README.md").read_text() == "MY OWN NOTES"
    assert record["finished"] == {"step": 2} and record.get("card") is None
    assert "README.md" not in record["files"] and (out / "README.md") not in manifest.owned(out, record)
    assert "model.safetensors" in record["files"]  # the run's own files are still recorded
    assert not modelcard.may_write(out)
    assert not modelcard.write_card(cfg, out, repo_id="me/model", log=lambda *a: None)  # what push does first
    patterns = hub.upload_patterns(out)
    assert "model.safetensors" in patterns and "README.md" not in patterns
    with pytest.raises(PrefoptError, match="README.md, which this run did not write"):
        _run(ws, out, overwrite_output_dir=True, **saving)
    assert (out / "README.md").read_text() == "MY OWN NOTES"
