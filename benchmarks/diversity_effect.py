"""What the diversity term does on the demo task (about 4 minutes on 2 CPU cores).

    .venv/bin/python benchmarks/diversity_effect.py [OUT_DIR]

Trains the offline demo three times, identical but for `diversity_weight`/`diversity_alpha`
(0; the ELYZA seed's 0.05/0.1; 0.5/0.5), then runs `prefopt eval` on all three: preference
metrics on the demo's 256 held-out pairs, and 64 sampled answers (temperature 1, seed 0) to
unseen prompts with their next-token entropy and distinct-2.
"""

import json
import sys
from pathlib import Path

from prefopt.cli import main
from prefopt.demo import make_rows, run_demo

VARIANTS = {"diversity_0": (0.0, 0.0), "diversity_0.05_a0.1": (0.05, 0.1), "diversity_0.5_a0.5": (0.5, 0.5)}


def run(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for name, (weight, alpha) in VARIANTS.items():
        result = run_demo(out / "runs" / name, log=lambda *a: None, diversity_weight=weight, diversity_alpha=alpha)
        (out / "runs" / name / "model").rename(out / name)  # eval names each model by its folder
        print(f"{name}: greedy answers correct {result['greedy_correct_after']:.0%}", flush=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in make_rows(64, 998, chat=True)))
    models = [arg for name in VARIANTS for arg in ("--model", str(out / name))]
    return main(["eval", *models, "--data", str(out / "runs" / "diversity_0" / "data"), "--split", "test",
                 "--prompts", str(prompts), "--temperature", "1.0", "--max_new_tokens", "24", "--seed", "0",
                 "--output", str(out / "report.json")])


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "diversity_output")))
