"""prefopt: train causal language models on preference pairs with reference-free objectives
(SimPO, CPO, CPO-SimPO, ORPO, AlphaPO, SimPER, RePO) from one YAML file."""

__version__ = "0.1.0"
