"""A drop-in for TRL 1.16's experimental `CPOTrainer` and `ORPOTrainer`: the same constructors and
config fields (TRL's defaults included), trained on prefopt's own path.

    from prefopt.trl import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer

    configs     CPOConfig, ORPOConfig: TrainingArguments with TRL's fields and defaults (+ layout, max_dropped_share)
    translate   what a TRL call means for prefopt: refusals, the objective and data keys → Config, the datasets
    model       the tokenizer and model: given or loaded as prefopt loads them, the PEFT adapter added
    trainers    CPOTrainer, ORPOTrainer: PreferenceTrainer subclasses with TRL's constructor and logging hooks
"""

from .configs import CPOConfig, ORPOConfig
from .trainers import CPOTrainer, ORPOTrainer

__all__ = ["CPOConfig", "CPOTrainer", "ORPOConfig", "ORPOTrainer"]
