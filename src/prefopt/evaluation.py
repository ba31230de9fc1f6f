"""Judge a trained model: preference metrics on held-out pairs, and what it generates.

    prefopt eval --model DIR [--model DIR2 ...] [--data FILE_OR_FOLDER [--split test]]
                 [--prompts FILE] [--reward_model DIR] [--output report.json] [--alpaca_eval DIR]
    prefopt generate --model DIR [--prompt TEXT ... | --prompts FILE] [--output FILE]   (none: chat)

Preference metrics use the objective the model was trained with (its `prefopt_config.yaml`;
the first model's for all of them, so the columns compare): accuracy (the chosen answer's
implicit reward above the rejected one's), the margin distribution, mean log-probs and lengths
of chosen and rejected, and the length-only baseline (how often "pick the longer answer" is
right). With prompts it generates, stopping at every EOS id the generation config lists, and
reports mean and longest length (generated tokens up to, not counting, the stopping EOS), the model's next-token entropy along its answers, repetition (repeated
3-grams within an answer), distinct-1/2 across answers and the share of empty answers; with a reward model (`AutoModelForSequenceClassification`)
each answer's reward, and with two models the win rate of each over the first. Every answer goes
into the report (`evalreport.generation_records`).
"""

import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import MissingSplit, PrefoptError
from .evalreport import LENGTH_UNIT, format_report, generation_records  # noqa: F401 (format_report: the CLI's)

GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": False}


# -- preference metrics -----------------------------------------------------------------------

def _objective_keys(models: list[str]) -> dict:
    """The objective the first trained model recorded (else SimPO's defaults), for every model."""
    import yaml

    from .config import OBJECTIVE_KEYS

    for model in models:
        path = Path(model) / "prefopt_config.yaml"
        if path.is_file():
            saved = yaml.safe_load(path.read_text()) or {}
            return {k: v for k, v in saved.items() if k in OBJECTIVE_KEYS and v is not None}
    return {"method": "simpo"}


def held_out_split(data: str, split: str | None) -> str:
    """The split `prefopt eval` scores: the one named; else a single file's only split (datasets calls
    it train), or a folder's test split."""
    if split is not None:
        return split
    return "train" if Path(data).is_file() else "test"


def preference_metrics(model_dir: str, data: str, split: str | None, objective: dict, batch_size: int = 8) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="prefopt_eval_") as scratch:  # nothing is written beside the model
        return _preference_metrics(model_dir, data, held_out_split(data, split), objective, batch_size, scratch)


def _preference_metrics(model_dir: str, data: str, split: str, objective: dict, batch_size: int, scratch: str) -> dict:
    from datasets import Dataset

    from .collate import collator_for
    from .config import build_config
    from .models import load_model, load_tokenizer
    from .step import loss, score
    from .trainer import PreferenceTrainer

    cfg = build_config({**objective, "model_name_or_path": model_dir, "datasets": [{"path": data, "split": split}],
                        "output_dir": scratch, "report_to": "none",
                        "per_device_train_batch_size": 1, "per_device_eval_batch_size": batch_size,
                        "layout": "padded"}, "prefopt eval")
    # whatever split was named (a "test" split is routed to evaluation) is what gets scored
    cfg.data.train_datasets, cfg.data.eval_datasets = cfg.data.train_datasets + cfg.data.eval_datasets, []
    tokenizer = load_tokenizer(cfg.model)
    pairs = _scored_pairs(cfg, tokenizer, data, split)
    model = load_model(cfg.model, tokenizer, cfg.training, log=lambda *a: None).eval()
    collator = collator_for(cfg, tokenizer.pad_token_id, "padded", model.config._attn_implementation)
    trainer = PreferenceTrainer(model=model, args=cfg.training, eval_dataset=pairs, data_collator=collator,
                                processing_class=tokenizer, objective=cfg.objective)
    rows = {"margin": [], "chosen_reward": [], "logps_chosen": [], "logps_rejected": [], "len_chosen": [],
            "len_rejected": []}
    with torch.no_grad():
        for batch in tqdm(trainer.get_eval_dataloader(Dataset.from_list(list(pairs))), desc="scoring pairs", disable=None):
            batch = trainer.on_device(batch)
            # under several processes: this process's share, without the sampler's padding duplicates
            scores = score(model, batch, trainer.scorer(model), trainer.eval_pairs_kept(len(batch["row"])))
            result = loss(scores, trainer.step_objective)
            chosen, rejected, K = result.chosen_rewards, result.rejected_rewards, scores.pairs
            rows["margin"] += (chosen - rejected).tolist()
            rows["logps_chosen"] += result.pairs.chosen_logps.tolist()
            rows["logps_rejected"] += result.pairs.rejected_logps.tolist()
            rows["len_chosen"] += scores.tokens[:K].tolist()
            rows["len_rejected"] += scores.tokens[K:].tolist()
    if trainer.accelerator.num_processes > 1:  # every process's pairs, on every process
        from accelerate.utils import gather_object

        shares = gather_object([rows])
        rows = {k: [v for share in shares for v in share[k]] for k in rows}
    n = len(rows["margin"])
    longer = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(rows["len_chosen"], rows["len_rejected"])]
    margins = sorted(rows["margin"])
    quantile = lambda q: margins[min(n - 1, int(q * n))]  # noqa: E731
    return {
        "pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n,
        "margin": {"mean": statistics.fmean(margins), "p10": quantile(0.1), "p50": quantile(0.5),
                   "p90": quantile(0.9)},
        "logps_chosen": statistics.fmean(rows["logps_chosen"]),
        "logps_rejected": statistics.fmean(rows["logps_rejected"]),
        "length_chosen": statistics.fmean(rows["len_chosen"]),
        "length_rejected": statistics.fmean(rows["len_rejected"]),
        "length_baseline_accuracy": statistics.fmean(longer),
    }


# -- generation ---------------------------------------------------------------------------------

def _scored_pairs(cfg, tokenizer, data: str, split: str):
    """The split's tokenized pairs; a split it does not have is refused naming --split."""
    from . import data as data_mod

    try:
        return data_mod.prepare(cfg, tokenizer).train
    except MissingSplit as e:
        if e.split != split:
            raise
        raise PrefoptError(f"prefopt eval: {data} has no split {split!r}; name the one to score with --split (the "
                           f"message: {e})") from None


def read_prompts(path: str) -> list[list[dict]]:
    """Prompts as conversations: a .txt (one per line), or .json/.jsonl rows with `prompt` (text
    or messages) or AlpacaEval's `instruction`."""
    file = Path(path)
    if not file.is_file():
        raise PrefoptError(f"--prompts {path}: no such file.")
    if file.suffix == ".txt":
        return [[{"role": "user", "content": line}] for line in file.read_text().splitlines() if line.strip()]
    text = file.read_text()
    try:
        rows = json.loads(text) if file.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise PrefoptError(f"--prompts {path}: not valid JSON ({e}).") from None
    prompts = []
    for i, row in enumerate(rows):
        value = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if isinstance(value, str):
            prompts.append([{"role": "user", "content": value}])
        elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            prompts.append(value)
        else:
            raise PrefoptError(f"--prompts {path} row {i}: needs a `prompt` (text or messages) or `instruction`.")
    return prompts


class Generator:
    """A saved model and its tokenizer, answering conversations with the saved chat template."""

    def __init__(self, model_dir: str, **generation):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .config import ModelArgs
        from .models import check_weights_format

        check_weights_format(ModelArgs(model_name_or_path=model_dir), "prefopt")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
        except OSError as e:
            raise PrefoptError(f"could not load a model from {model_dir!r}: {e}") from None
        if not self.tokenizer.chat_template:
            raise PrefoptError(f"{model_dir}: the tokenizer has no chat template to format prompts with.")
        self.name = Path(model_dir).name
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.eos = sorted({i for i in eos + [self.tokenizer.eos_token_id] if i is not None})  # stop at every one
        self.generation = {**GENERATION_DEFAULTS, **generation}
        self.entropy_sum, self.entropy_count = 0.0, 0
        self.answer_ids: list[list[int]] = []  # each answer's generated ids, up to and excluding its EOS

    def answer(self, conversations: list[list[dict]], batch_size: int = 8, progress: bool = True) -> list[str]:
        """The answers' texts; their token ids (what lengths are counted in) go to `answer_ids`."""
        out = []
        batches = range(0, len(conversations), batch_size)
        for start in tqdm(batches, desc=f"generating ({self.name})",
                          disable=None if progress else True):  # None: shown on a terminal only
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start : start + batch_size]]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                result = self.model.generate(**enc, eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                                             output_logits=True, return_dict_in_generate=True, **self.generation)
            new = result.sequences[:, enc["input_ids"].shape[1]:]
            # the model's own next-token entropy (before temperature or top-p) at each generated token
            logp = torch.log_softmax(torch.stack(result.logits, 1).float(), -1)  # [rows, steps, V]
            entropy = -(logp.exp() * logp).sum(-1)
            live = torch.ones_like(new, dtype=torch.bool)
            ended = torch.isin(new, torch.tensor(self.eos))
            live[:, 1:] = ~(ended.cumsum(1)[:, :-1] > 0)  # up to and including the first EOS
            self.entropy_sum += float((entropy * live).sum())
            self.entropy_count += int(live.sum())
            # a row that never stopped ran to the last step: all its tokens were generated, none is padding
            stops = torch.where(ended.any(1), ended.int().argmax(1), new.shape[1]).tolist()
            for row, stop in zip(new.tolist(), stops):
                self.answer_ids.append(row[:stop])
                out.append(self.tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
        return out


def generation_metrics(outputs: list[str], tokens: list[list[int]]) -> dict:
    """`tokens`: each answer's generated ids (`Generator.answer_ids`), not its text tokenized again:
    decoded and re-tokenized, an answer can come back longer (a byte-level BPE piece that is no whole
    UTF-8 character decodes to U+FFFD, three bytes, three tokens), past max_new_tokens."""

    def ngrams(seq, n):
        return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]

    repeated = [1 - len(set(ngrams(t, 3))) / len(ngrams(t, 3)) for t in tokens if len(t) >= 3]
    every = {n: [g for t in tokens for g in ngrams(t, n)] for n in (1, 2)}
    return {
        "answers": len(outputs),
        "mean_length": statistics.fmean(len(t) for t in tokens) if tokens else 0.0,
        "max_length": max((len(t) for t in tokens), default=0),
        "repetition_rate": statistics.fmean(repeated) if repeated else 0.0,
        "distinct_1": len(set(every[1])) / len(every[1]) if every[1] else 0.0,
        "distinct_2": len(set(every[2])) / len(every[2]) if every[2] else 0.0,
        "empty_rate": sum(not o.strip() for o in outputs) / len(outputs) if outputs else 0.0,
    }


def reward_scores(reward_model: str, prompts: list[list[dict]], answers: dict[str, list[str]]) -> dict:
    """Each model's answers scored by a sequence-classification reward model (`rewards.RewardModel`):
    name -> scores."""
    from .rewards import RewardModel, ScoreItem

    judge = RewardModel(reward_model)
    return {n: judge.score([ScoreItem(p, a, {"prompt": p}, f"--prompts row {i} ({n}'s answer)")
                            for i, (p, a) in enumerate(zip(prompts, answers[n]))])
            for n in tqdm(list(answers), desc="judging", disable=None)}


def win_rates(scores: dict[str, list[float]]) -> dict:
    """Each model's win rate over the first, prompt by prompt (a tie counts half)."""
    names = list(scores)
    first = scores[names[0]]
    return {n: statistics.fmean(1.0 if s > f else 0.5 if s == f else 0.0 for s, f in zip(scores[n], first))
            for n in names[1:]}


def alpaca_eval_rows(prompts: list[list[dict]], outputs: list[str], generator: str) -> list[dict]:
    return [{"instruction": p[-1]["content"], "output": o, "generator": generator} for p, o in zip(prompts, outputs)]


def evaluate(models: list[str], data: str | None = None, split: str | None = None, prompts: str | None = None,
             reward_model: str | None = None, alpaca_dir: str | None = None, seed: int = 0, **generation) -> dict:
    if not models:
        raise PrefoptError("prefopt eval: name at least one --model.")
    if data is None and prompts is None:
        raise PrefoptError("prefopt eval: give --data (preference pairs) and/or --prompts (to generate).")
    names = []
    for m in models:  # folder names, made unique ("base", "base #2") so a model can face itself
        name = Path(m).name
        names.append(name if name not in names else f"{name} #{sum(n.split(' #')[0] == name for n in names) + 1}")
    report: dict = {"models": dict(zip(names, models))}
    if data is not None:
        objective = _objective_keys(models)
        report["objective"] = objective
        report["preference"] = {n: preference_metrics(m, data, split, objective) for n, m in zip(names, models)}
    if prompts is not None:
        report.update(_generate(dict(zip(names, models)), read_prompts(prompts), reward_model, alpaca_dir, seed,
                                generation))
    return report


def _generate(models: dict[str, str], conversations: list[list[dict]], reward_model: str | None,
              alpaca_dir: str | None, seed: int, generation: dict) -> dict:
    """The report's generation part: each model's metrics, every answer (with its reward, given a
    reward model) prompt by prompt, and the win rates over the first model."""
    from transformers import set_seed

    answers, tokens, metrics = {}, {}, {}
    for name, model in models.items():
        set_seed(seed)  # sampled answers: each model draws from the same random stream
        generator = Generator(model, **generation)
        answers[name] = generator.answer(conversations)
        tokens[name] = generator.answer_ids
        metrics[name] = generation_metrics(answers[name], tokens[name])
        metrics[name]["entropy"] = generator.entropy_sum / max(generator.entropy_count, 1)
        if alpaca_dir:
            Path(alpaca_dir).mkdir(parents=True, exist_ok=True)
            path = Path(alpaca_dir) / f"{Path(model).name}.json"
            path.write_text(json.dumps(alpaca_eval_rows(conversations, answers[name], name), indent=1))
    out: dict = {"generation": metrics, "length_unit": LENGTH_UNIT}
    rewards = reward_scores(reward_model, conversations, answers) if reward_model else None
    if rewards is not None:
        for name in models:
            metrics[name]["mean_reward"] = statistics.fmean(rewards[name]) if rewards[name] else 0.0
        if len(models) > 1:
            out["win_rate_over_" + next(iter(models))] = win_rates(rewards)
    out["generations"] = generation_records(conversations, answers, tokens, rewards)
    return out

