"""One thread everywhere in the suite, on every machine.

How a float32 reduction is split over threads sets its order of summation, so the same test
computes slightly different numbers on a 2-core and on a 64-core machine. The tolerances in
these tests are derived for round-off of one summation order against another and checked
against measured deviations; with one thread in the test process and in every process it starts
(`torchrun`, `accelerate launch`, `deepspeed` and their workers inherit the environment), what
was measured here is what runs everywhere.
"""

import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)
