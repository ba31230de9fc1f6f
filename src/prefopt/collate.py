"""Collation: tokenized pairs → the rows of one forward pass, plus which positions to score.

Every layout returns the same batch contract, so the log-prob helper and the loss never know
which layout made it:

    input_ids            [R, T]  token ids (padding is arbitrary: masks come from lengths)
    attention_mask       [R, T]  1 on real tokens
    score_index          [N]     flat index r·T + t of each position whose *next* token is scored
    score_target         [N]     that next token
    score_seq            [N]     which sequence it belongs to: pair i's chosen is i, its rejected B + i
    score_is_completion  [N]     True on completion tokens; False on prompt tokens, which are
                                 scored only when an NLL term spans the prompt (ORPO)
    source, row                  provenance of each pair, for error messages

Layout "padded" (this module, the reference): rows are [prompt; chosen] for each pair, then
[prompt; rejected] for each pair, right-padded to the longest.
"""

from dataclasses import dataclass

import torch

from .config import Config


@dataclass
class PaddedCollator:
    pad_token_id: int
    score_prompt: bool = False  # also score the chosen prompt (for an NLL over prompt + completion)

    def __call__(self, features: list[dict]) -> dict:
        B = len(features)
        rows = [f["prompt_ids"] + f["chosen_ids"] for f in features]
        rows += [f["prompt_ids"] + f["rejected_ids"] for f in features]
        prompt_lens = [len(f["prompt_ids"]) for f in features] * 2
        T = max(len(r) for r in rows)

        input_ids = torch.full((2 * B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((2 * B, T), dtype=torch.long)
        index, target, seq, is_completion = [], [], [], []
        for r, (ids, P) in enumerate(zip(rows, prompt_lens)):
            L = len(ids)
            input_ids[r, :L] = torch.tensor(ids)
            attention_mask[r, :L] = 1
            # Token t is predicted at position t-1, so the first token (BOS) is never scored.
            first = 1 if self.score_prompt and r < B else max(P, 1)
            index.extend(range(r * T + first - 1, r * T + L - 1))
            target.extend(ids[first:L])
            seq.extend([r] * (L - first))
            is_completion.extend(t >= P for t in range(first, L))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "score_index": torch.tensor(index, dtype=torch.long),
            "score_target": torch.tensor(target, dtype=torch.long),
            "score_seq": torch.tensor(seq, dtype=torch.long),
            "score_is_completion": torch.tensor(is_completion, dtype=torch.bool),
            "source": [f["source"] for f in features],
            "row": [f["row"] for f in features],
        }


def collator_for(cfg: Config, pad_token_id: int) -> PaddedCollator:
    # prompt tokens are scored only for an NLL term that spans the prompt (ORPO)
    score_prompt = cfg.objective.nll_weight > 0 and cfg.method.nll_span == "prompt+completion"
    return PaddedCollator(pad_token_id=pad_token_id, score_prompt=score_prompt)
