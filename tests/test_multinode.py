"""Two nodes on one machine. Each "node" is a launcher started with a datasets cache, an HF home, a
temp folder and a working directory of its own (its local disk); they meet over 127.0.0.1 as two
machines meet over the network:

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1 --rdzv_backend static \
        --master_addr 127.0.0.1 --master_port P -m prefopt train config.yaml --output_dir OUT

The model, the data and (normally) output_dir are on the shared file system, as /scratch is on a
cluster. The run must be the one-process run on the same global batch; each node tokenizes into
its own cache (on a cluster node 1 cannot read node 0's disk); the run's files are written once.
configs/slurm/train.sbatch runs here under bash, its `srun` and `scontrol` replaced by shims that
start its per-node command on this machine, so the script's own command lines are what runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import adam_ratio_bound, free_port
from prefopt.checkpoints import COMPLETE
from test_distributed import RUN, SPLITS

ROOT = Path(__file__).resolve().parents[1]
NODES = 2
LR = RUN["learning_rate"]
# values that depend on the wall clock, not on the computation
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second"}


@pytest.fixture(scope="module")
def ws(workspace):
    """The shared file system: model, data and config (the run tests/test_distributed.py compares)."""
    # checkpoints too: their files are among those written once
    return workspace("multinode", SPLITS, **RUN, save_steps=2).root


def node_env(node: Path) -> dict:
    """The environment of a process on the node whose local disk is `node`."""
    for sub in ("work", "hf", "tmp"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(node / "hf"), "HF_DATASETS_CACHE": str(node / "hf" / "datasets"),
            "TMPDIR": str(node / "tmp")}


def train_args(ws, out, per_device: int, *extra: str) -> list[str]:
    return ["train", str(ws / "config.yaml"), "--output_dir", str(out), "--per_device_train_batch_size",
            str(per_device), *extra]


def torchrun_node(rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", "1",
            "--node_rank", str(rank), "--rdzv_backend", "static", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "prefopt"]


def run_nodes(root: Path, commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start command i on node i (working directory and local disk `root/node<i>`), all at once;
    wait for all of them."""
    procs = [subprocess.Popen(cmd, cwd=root / f"node{i}" / "work", env=node_env(root / f"node{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate(commands)]
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            proc.kill()
    return done


def two_node_run(ws, root: Path, out, *extra: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    return run_nodes(root, [torchrun_node(r, port) + train_args(ws, out, 2, *extra) for r in range(NODES)])


def assert_ok(done: list[subprocess.CompletedProcess]):
    # a node's own error comes before torchrun's summary of it, and the first node to fail may not be node 0
    failed = [f"--- node {rank} (exit {d.returncode}):\n{d.stdout[-1500:]}{d.stderr[-6000:]}"
              for rank, d in enumerate(done) if d.returncode != 0]
    assert not failed, "\n".join(failed)


def results(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(out / "model.safetensors")
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines], weights


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_identical(a, b):
    """Bit for bit: the same computation in the same order."""
    lines_a, weights_a = a
    lines_b, weights_b = b
    assert lines_b == lines_a
    assert weights_b.keys() == weights_a.keys()
    for name in weights_a:
        assert torch.equal(weights_b[name], weights_a[name]), name


@pytest.fixture(scope="module")
def single(ws, tmp_path_factory):
    """The reference: one process on one node, 4 pairs per micro-batch, 2 micro-batches per step."""
    root = tmp_path_factory.mktemp("one")
    assert_ok(run_nodes(root, [[sys.executable, "-m", "prefopt", *train_args(ws, root / "out", 4)]]))
    return root / "out"


@pytest.fixture(scope="module")
def two_nodes(ws, tmp_path_factory):
    """2 nodes × 1 process × 2 pairs per micro-batch × 2 micro-batches: the same 8 pairs per step.
    output_dir is on the shared file system."""
    root = tmp_path_factory.mktemp("two")
    done = two_node_run(ws, root, root / "out")
    assert_ok(done)
    return root, done


def assert_equal_one_process(single: Path, out: Path):
    """The run in `out` (2 processes) logged what the one-process run logged and ended with its weights."""
    (one, w1), (two, w2) = results(single), results(out)
    # 4 train lines, 2 eval lines, the summary
    assert [x["step"] for x in two] == [x["step"] for x in one] == [1, 2, 2, 3, 4, 4, 4]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a.keys() - {"total_flos"}:  # the Trainer's estimate: under ZeRO-3, of one shard
            # The runs differ only in float32 summation order (rank-local sums, then the sum over
            # ranks), and in the weights, which drift apart by that through the steps (below).
            # Logged sums over <= 16 sequences agree to rel 1e-5; rewards/margins is a difference of
            # two rewards of magnitude < 64, each rounded to float32 in units of 2^-18 = 3.8e-6, so
            # it can differ by a few of those units: abs 1.5e-5 (4 units).
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1.5e-5), (a["step"], key)
    assert w2.keys() == w1.keys()
    diff = torch.cat([(w2[n] - w1[n]).abs().flatten() for n in w1])
    # AdamW moves a weight by lr·m/(sqrt(v) + eps). Where a gradient element is well above its
    # round-off, a relative change d in it changes the step by ~d (1e-6 here), and the weights agree
    # to a few units in their last place (|w| <= 1: 1.2e-7 each). Where a gradient element is itself
    # near zero, round-off decides m/sqrt(v), and the element can step differently by up to the whole
    # step, 2·lr·max|m̂/√v̂| per step either way (helpers.adam_ratio_bound): seen, 21 of 110,656
    # elements beyond 1e-6, the largest 1.4e-5 here and 3.2e-5 on an AVX-512 machine (issue 11), and
    # 5.2e-5 once the head formed its gradient in forward (another summation order). A batch trained
    # twice or skipped, or a gradient not averaged over the nodes, moves most elements by ~lr
    # instead: the count is the check, the maximum only its derived bound.
    assert (diff > 1e-6).sum() <= diff.numel() // 1000
    assert diff.max() <= 2 * LR * sum(adam_ratio_bound(t) for t in range(1, RUN["max_steps"] + 1))


def test_two_nodes_equal_one_process(single, two_nodes):
    assert_equal_one_process(single, two_nodes[0] / "out")


def test_two_nodes_are_exactly_two_processes_on_one_node(ws, two_nodes, tmp_path):
    """Where the processes run changes nothing: one node with two processes does the same
    arithmetic in the same order as two nodes with one each."""
    root, _ = two_nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "prefopt", *train_args(ws, tmp_path / "out", 2)]
    assert_ok(run_nodes(tmp_path, [cmd]))
    assert_identical(results(root / "out"), results(tmp_path / "out"))


def cache_files(node: Path) -> set[str]:
    """The datasets cache's arrow files on a node: the loaded json and the tokenized columns."""
    cache = node / "hf" / "datasets"
    return {str(p.relative_to(cache)) for p in cache.rglob("*.arrow")}


def test_each_node_tokenizes_into_its_own_cache(two_nodes):
    root, done = two_nodes
    node0, node1 = cache_files(root / "node0"), cache_files(root / "node1")
    assert node1 == node0  # the same fingerprints: the same tokenized data, computed on each node
    # train and test tokenized, on each node into its own HF_HOME: datasets writes a cache-*.arrow only
    # where it computes the map, so a node that had loaded another node's cache would have none of its own.
    # (The tokenizing bar is no evidence: it is off where stdout is not a terminal, as here.)
    for node in (node0, node1):
        assert len([f for f in node if f.rsplit("/", 1)[-1].startswith("cache-")]) == 2, node
    assert all("Tokenizing pairs" not in d.stderr for d in done)  # no bar of carriage returns in a log


def test_the_run_files_are_written_once(single, two_nodes):
    root, done = two_nodes
    out = root / "out"
    # every process keeps its own RNG state in each checkpoint; everything else is as one process writes it
    per_process = {f"checkpoint-{s}/rng_state_{r}.pth" for s in (2, 4) for r in range(NODES)}
    one_process = {f"checkpoint-{s}/rng_state.pth" for s in (2, 4)}
    assert files(out) - per_process == files(single) - one_process
    assert files(out) & per_process == per_process
    # metrics.jsonl: one line per log, not one per node (appended to by rank 0 only)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(results(single)[0])
    assert done[0].stdout.count("prefopt: resolved objective") == 1
    assert "prefopt: 2 processes on cpu, DDP" in done[0].stdout
    assert "prefopt:" not in done[1].stdout  # only the first process speaks


def test_on_local_disks_without_checkpoints_node_0_holds_the_run(ws, two_nodes, tmp_path):
    """output_dir on each node's own disk: the same relative path, resolved in each node's working
    directory. Without checkpoints that works: node 0 holds the whole run, node 1 writes nothing."""
    done = two_node_run(ws, tmp_path, "out", "--save_strategy", "no")
    assert_ok(done)
    node0, node1 = tmp_path / "node0" / "work" / "out", tmp_path / "node1" / "work" / "out"
    shared = two_nodes[0] / "out"
    assert files(node0) == {f for f in files(shared) if not f.startswith("checkpoint-")}
    assert_identical(results(shared), results(node0))  # checkpoints or not, the same training
    assert not node1.exists() or not files(node1)


def test_on_local_disks_a_run_with_checkpoints_is_refused_before_it_starts(ws, tmp_path):
    """Every process writes its part of each checkpoint into output_dir (node 1 its RNG state), and
    a resume reads all of it back on every process. On node-local disks node 1's checkpoint folders
    would hold only its RNG state: a resume there fails, or, with each process deciding for itself,
    the nodes train out of step until they hang (seen: over 10 minutes, until killed). A requeued
    job may also land on other nodes, whose disks hold nothing. Refuse before any work is done."""
    done = two_node_run(ws, tmp_path, "out")
    for d in done:  # torchrun reports its process's exit status (2: a PrefoptError) and exits 1 itself
        assert "exitcode  : 2" in d.stderr, d.stderr[-3000:]
        assert "]: Traceback" not in d.stderr  # no process's traceback ("[rank1]: Traceback ...")
    assert "prefopt: error: output_dir out" in done[0].stderr
    assert "a file system every node shares" in done[0].stderr
    assert not (tmp_path / "node0" / "work" / "out" / "metrics.jsonl").exists()


def test_save_on_each_node_is_refused_before_loading(ws, tmp_path, capsys):
    """transformers 5.23 writes a checkpoint's model weights from global rank 0 only
    (`should_save_on_this_rank`), whatever save_on_each_node says: with output_dir on each node's
    disk, node 1 got checkpoint-2 with the optimizer, the scheduler and the Trainer's state but no
    weights, marked complete, and the resume failed there ("Can't find a valid checkpoint")."""
    from prefopt.cli import main

    assert main(train_args(ws, tmp_path / "out", 2, "--save_on_each_node", "true",
                           "--model_name_or_path", str(tmp_path / "nowhere"))) == 2
    err = capsys.readouterr().err
    assert "save_on_each_node" in err and "a file system every node shares" in err


def test_shipped_multinode_accelerate_configs_validate():
    from accelerate.commands.config.config_args import ClusterConfig

    folder = ROOT / "configs" / "accelerate" / "multinode"
    configs = {p.stem: ClusterConfig.from_yaml_file(p) for p in folder.glob("*.yaml")}
    assert sorted(configs) == ["ddp", "zero3"]
    for c in configs.values():
        assert (c.num_machines, c.num_processes, c.machine_rank, c.main_process_port) == (2, 16, 0, 29500)
        assert c.rdzv_backend == "static" and c.same_network and not c.use_cpu
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    z3 = configs["zero3"].deepspeed_config
    assert z3["zero_stage"] == 3 and z3["zero3_save_16bit_model"] is True and z3["zero3_init_flag"] is True
    assert z3["deepspeed_multinode_launcher"] == "standard"  # torchrun on each machine: no pdsh, no hostfile


def accelerate_node(config: str, rank: int, port: int) -> list[str]:
    """The configs' own launch line, with this machine's sizes (2 machines × 1 CPU process, fp32)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "multinode" / config), "--num_processes", str(NODES),
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "-m", "prefopt"]


@pytest.mark.parametrize("config", ["ddp.yaml", "zero3.yaml"])
def test_the_multinode_accelerate_configs_train_two_nodes(ws, single, two_nodes, tmp_path, config):
    port = free_port()
    done = run_nodes(tmp_path, [accelerate_node(config, r, port) + train_args(ws, tmp_path / "out", 2)
                                for r in range(NODES)])
    assert_ok(done)
    if config == "ddp.yaml":  # torchrun underneath, the same processes: the same run, bit for bit
        assert "prefopt: 2 processes on cpu, DDP" in done[0].stdout
        assert_identical(results(two_nodes[0] / "out"), results(tmp_path / "out"))
    else:
        assert "prefopt: 2 processes on cpu, DeepSpeed ZeRO-3" in done[0].stdout
        assert "saved model checked: 110,656 parameters" in done[0].stdout
        assert_equal_one_process(single, tmp_path / "out")


# -- SLURM ---------------------------------------------------------------------------------------
# No SLURM here: configs/slurm/train.sbatch runs under bash with these two on PATH. The script's
# own lines (rendezvous from scontrol, srun, its torchrun line, the USR1 trap, the requeue) run.

SRUN = '''#!{python}
"""srun, for the tests: runs its command once per node of the job ($SLURM_NNODES), all on this
machine, each with the node's SLURM_NODEID/SLURM_PROCID and its own local disk as TMPDIR
($NODES/node<i>/tmp), in the batch script's working directory as srun does. Like srun it passes
SIGTERM and SIGINT on to every task, and with --kill-on-bad-exit=1 a failing task stops the rest."""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
kill_on_bad_exit = "--kill-on-bad-exit=1" in args
while args[0].startswith("--"):
    args.pop(0)
tasks = []
for node in range(int(os.environ["SLURM_NNODES"])):
    disk = os.path.join(os.environ["NODES"], f"node{{node}}")
    os.makedirs(os.path.join(disk, "tmp"), exist_ok=True)
    env = {{**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
           "TMPDIR": os.path.join(disk, "tmp")}}
    log = open(os.path.join(disk, "task.log"), "w")
    tasks.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))


def forward(signum, frame=None):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)


signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
stopping = False
while any(task.poll() is None for task in tasks):
    if kill_on_bad_exit and not stopping and any(task.returncode for task in tasks):
        stopping = True
        forward(signal.SIGTERM)
    time.sleep(0.05)
failed = [task.returncode for task in tasks if task.returncode]
sys.exit(0 if not failed else failed[0] if failed[0] > 0 else 128 - failed[0])
'''

SCONTROL = '''#!/bin/bash
# scontrol, for the tests: the job's nodes are all this machine; a requeue is written down.
if [[ "$1 $2" == "show hostnames" && "$3" == "$SLURM_JOB_NODELIST" ]]; then
    for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done
elif [[ "$1" == requeue ]]; then
    echo "$2" >> "$NODES/requeued"
else
    echo "scontrol (test shim): unexpected arguments: $*" >&2
    exit 1
fi
'''

# Each training step sleeps a little, in the workers only, so that a signal surely arrives mid-run.
SLOW_STEPS = '''import os
if os.environ.get("SLOW_STEP_SECONDS") and "LOCAL_RANK" in os.environ:
    import time
    from prefopt.trainer import PreferenceTrainer

    compute_loss = PreferenceTrainer.compute_loss

    def slow_compute_loss(self, *args, **kwargs):
        if self.model.training and self.state.global_step >= 2:
            time.sleep(float(os.environ["SLOW_STEP_SECONDS"]))
        return compute_loss(self, *args, **kwargs)

    PreferenceTrainer.compute_loss = slow_compute_loss
'''


@pytest.fixture
def slurm(tmp_path):
    """A 2-node job's environment on this machine: shims first on PATH, then the venv's torchrun.
    HF_HOME is shared (a home directory on NFS), so a datasets cache the script did not move to
    each node's disk would show up there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    for shim in ("srun", "scontrol"):
        (bin_dir / shim).chmod(0o755)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_STEPS)
    pythonpath = [str(tmp_path / "site")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(pythonpath), "NODES": str(tmp_path / "nodes"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path), "MASTER_PORT": str(free_port()),
           "HF_HOME": str(tmp_path / "shared_home" / "hf"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("TMPDIR", None)
    return tmp_path, env


def sbatch(ws, slurm, out, **env) -> subprocess.Popen:
    """The batch script as SLURM starts it on the job's first node: bash, in the submit directory."""
    root, job_env = slurm
    return subprocess.Popen(["bash", str(ROOT / "configs" / "slurm" / "train.sbatch"), str(ws / "config.yaml"),
                             "--output_dir", str(out), "--per_device_train_batch_size", "2"],
                            cwd=root, env={**job_env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def task_logs(root: Path) -> str:
    return "".join(f"--- node {i}\n" + (root / "nodes" / f"node{i}" / "task.log").read_text()[-3000:]
                   for i in range(NODES))


def test_the_sbatch_script_trains_two_nodes_like_torchrun(ws, two_nodes, slurm):
    root, env = slurm
    job = sbatch(ws, slurm, root / "out")
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log + task_logs(root)
    assert f"prefopt-slurm: job 4242: 2 nodes, 1 processes each, rendezvous at localhost:{env['MASTER_PORT']}" in log
    assert_identical(results(two_nodes[0] / "out"), results(root / "out"))
    for i in range(NODES):  # each node's datasets cache on its own disk (TMPDIR), none in the shared home
        cache = root / "nodes" / f"node{i}" / "tmp" / f"prefopt-datasets-{os.getuid()}"
        assert len(list(cache.rglob("cache-*.arrow"))) == 2, i
    assert not (root / "shared_home" / "hf" / "datasets").exists()
    assert not (root / "nodes" / "requeued").exists()


def test_the_sbatch_script_requeues_near_the_time_limit_and_the_job_resumes(ws, two_nodes, slurm):
    """SLURM sends SIGUSR1 to the batch shell only (--signal=B:USR1@300); the script passes SIGTERM
    on to the training processes, which finish the step and write a checkpoint, waits for them,
    and requeues the job. The requeued job (the same script again) ends where an uninterrupted run
    ends."""
    root, _ = slurm
    out = root / "out"
    # steps 3 and 4 take >= 4 s each (2 micro-batches × 2 s): the signal, sent once checkpoint-2 is
    # complete, reaches the processes inside step 3
    job = sbatch(ws, slurm, out, SLOW_STEP_SECONDS="2")
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / COMPLETE).is_file():
        assert job.poll() is None and time.time() < deadline, task_logs(root)
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=300)
    assert job.returncode != 0, log + task_logs(root)
    assert "the time limit is near" in log
    assert (root / "nodes" / "requeued").read_text() == "4242\n"
    assert (out / "checkpoint-3" / COMPLETE).is_file(), task_logs(root)  # written on SIGTERM, after step 3
    assert not (out / "model.safetensors").exists()  # stopped before the end

    again = sbatch(ws, slurm, out)
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log + task_logs(root)
    assert (root / "nodes" / "requeued").read_text() == "4242\n"  # not requeued again
    assert_identical(results(two_nodes[0] / "out"), results(out))
