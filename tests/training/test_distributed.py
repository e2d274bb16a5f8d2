"""Training with several processes (torchrun), on the CPU with gloo: two processes with a
global batch B train as one process with batch B (the gathered global negatives), the
setting that turns the gather off acts, and a run that loses a rank stops and resumes to
the uninterrupted result."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stages.pipeline.train as train_module
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.io.checkpoint import load_checkpoint
from stages.pipeline.train import build_model_and_loss, build_task, open_data, train
from stages.training.batches import epoch_batches
from stages.training.distributed import destroy, gather_batch
from stages.training.loop import Trainer
from tests.resume_helpers import assert_same_training
from tests.run_helpers import imported_candidates

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 2  # steps compared in float64 (the second one reads the memory bank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _double(collate):
    """``collate`` with its floating tensors in float64."""
    def collate64(items):
        return {k: v.double() if v.is_floating_point() else v
                for k, v in collate(items).items()}
    return collate64


def _steps(config, folder: Path, rank: int, world: int) -> dict:
    """Build the run's trainer in float64 and take its first ``STEPS`` steps, this rank's
    share of each global batch; returns the logged values of each step and the gradients
    (model and loss parameters) of the last."""
    torch.set_num_threads(1)
    data = open_data(config)
    device = torch.device("cpu")
    task, _ = build_task(config, data, device, folder)
    model, loss_fn, _, _ = build_model_and_loss(config, data)
    model.double()
    loss_fn.double()
    task.collate = _double(task.collate)
    trainer = Trainer(model, loss_fn, task, config.train, config.memory, device, folder,
                      lambda m: {}, {})
    t = config.train
    batches = task.epoch_batches(t.batch_size // world, t.seed, 0, rank, world)
    values = [trainer.step(task.collate([task.dataset[i] for i in batch]))
              for batch in batches[:STEPS]]
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(),
                                            *loss_fn.named_parameters()]
             if p.grad is not None}
    return {"values": values, "grads": grads}


def _uneven_gather(rank: int) -> dict:
    """Rank 0 holds global rows 0, 2, 4 and rank 1 rows 1, 3 (an epoch's last batch cut
    unevenly): gathered, and the gradient each rank gets of the same loss on them."""
    rows = torch.tensor([0.0, 2.0, 4.0] if rank == 0 else [1.0, 3.0], dtype=torch.float64)
    rows.requires_grad_(True)
    gathered = gather_batch(rows[:, None])
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (gathered[:, 0] * weights).sum().backward()
    return {"gathered": gathered.detach()[:, 0], "grad": rows.grad}


def _worker(rank: int, world: int, port: int, configs: dict, folder: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {"uneven": _uneven_gather(rank)}
        out.update({name: _steps(config, folder / name, rank, world)
                    for name, config in configs.items()})
        torch.save(out, folder / f"rank{rank}.pt")
    finally:
        destroy()  # what train() does: the DDP wrappers freed first


@pytest.fixture
def configs(tiny_config, tmp_path):
    """The runs compared: pairs with a memory bank, pairs with offline negatives and AOQ's
    loss, and InfoNCE (a learnable temperature) with local negatives only."""
    cands = imported_candidates(tiny_config, tmp_path / "cands")
    offline = ["train.offline_negatives=true", f"offcandi.dir={cands}", "offcandi.hardest=20",
               "loss.name=aoq"]
    return {"memory": load_config(base=tiny_config, overrides=["memory.size=20"]),
            "offline": load_config(base=tiny_config, overrides=offline),
            "local": load_config(base=tiny_config, overrides=[
                "loss.name=infonce", "loss.learnable_temperature=true",
                "train.global_negatives=false"])}


def test_two_processes_step_as_one_with_the_global_batch(configs, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), configs, tmp_path), nprocs=2)
    ranks, other = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in configs:  # the ranks' gradients are averaged: they stay in step
        for param, grad in ranks[name]["grads"].items():
            torch.testing.assert_close(other[name]["grads"][param], grad, rtol=0, atol=0)
    assert "logit_scale" in ranks["local"]["grads"]
    # The shares come back in the global order; each rank's rows get every rank's gradient
    # of them (both ranks computed the same loss: twice the one-process gradient, which
    # DDP's average over the ranks halves again).
    torch.testing.assert_close(ranks["uneven"]["gathered"],
                               torch.arange(5, dtype=torch.float64))
    torch.testing.assert_close(ranks["uneven"]["grad"],
                               2 * torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))
    for name in ("memory", "offline"):
        one = _steps(configs[name], tmp_path / name, 0, 1)
        for a, b in zip(ranks[name]["values"], one["values"], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-10), (name, key)
        assert ranks[name]["grads"].keys() == one["grads"].keys()
        for param, grad in one["grads"].items():
            torch.testing.assert_close(ranks[name]["grads"][param], grad, rtol=1e-10,
                                       atol=1e-10, msg=f"{name}: {param}")
    # train.global_negatives=false: each rank's loss over its own half of the batch only
    local = _steps(configs["local"], tmp_path / "local", 0, 1)
    assert ranks["local"]["values"][0]["loss"] != pytest.approx(local["values"][0]["loss"],
                                                                rel=1e-3)


def _torchrun(args: list[str], cwd: Path, launcher: str = "") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 aoq ...`` (or ``launcher``, a script that
    patches before it calls the CLI)."""
    script = launcher or str(BIN / "aoq")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                           script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# Rank 1 is killed (SIGKILL) as it starts step KILL_AT + 1, after rank 0 saved last.pt at
# step 4 (train.ckpt_every=2).
KILL_AT = 5
LAUNCHER = f"""
import os, signal, sys
import stages.training.loop as loop
real = loop.Trainer.step
def step(self, batch):
    if int(os.environ["RANK"]) == 1 and self.progress.step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch)
loop.Trainer.step = step
from stages.cli import main
sys.exit(main())
"""


def test_torchrun_trains_as_one_process_and_resumes_after_a_lost_rank(tiny_root, tiny_config,
                                                                      tmp_path):
    settings = [f"data.path={tiny_root}", "data.name=tiny", "model.embed_size=32",
                "model.word_dim=16", "train.batch_size=16", "train.epochs=2",
                "data.workers=0", "train.device=cpu", "train.ckpt_every=2"]
    args = ["train", *[a for s in settings for a in ("--set", s)]]
    whole = _torchrun([*args, "--run-dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (tmp_path / "whole" / "checkpoint.pt").is_file()

    # The same run in one process: the same checkpoint after each epoch, up to float32
    # rounding (the two processes sum the same terms in another order).
    tiny_config.train.ckpt_every = 2
    train(tiny_config, tmp_path / "one")
    two, one = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "one"))
    assert (two["world_size"], one["world_size"], two["step"]) == (2, 1, one["step"])
    for name, tensor in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], tensor, rtol=1e-5, atol=1e-6,
                                   msg=name)
    torch.testing.assert_close(two["memory"]["ids"], one["memory"]["ids"])

    # A rank lost mid-epoch stops the run: non-zero exit, no checkpoint.pt.
    (tmp_path / "launch.py").write_text(textwrap.dedent(LAUNCHER))
    killed = _torchrun([*args, "--run-dir", "killed"], tmp_path, str(tmp_path / "launch.py"))
    assert killed.returncode != 0
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch_step"] == 4
    # Another number of processes is refused, with the number to use.
    with pytest.raises(UserError, match="trained with 2.*--nproc_per_node=2"):
        train(tiny_config, tmp_path / "killed", resume=True)
    resumed = _torchrun([*args, "--run-dir", "killed", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(tmp_path / "whole", tmp_path / "killed")


def test_a_last_batch_smaller_than_the_ranks_is_left_out():
    # 10 items in global batches of 4 over 2 ranks: 4, 4, 2, each rank 3 batches.
    # 9 items in global batches of 8 over 4 ranks: a last global batch of 1 item would leave
    # three ranks without a batch (and waiting for the others): it is left out.
    two = [epoch_batches(10, 2, 0, 0, r, 2) for r in range(2)]
    assert [len(b) for b in two] == [3, 3] and sorted(sum(two[0] + two[1], [])) == list(range(10))
    four = [epoch_batches(9, 2, 0, 0, r, 4) for r in range(4)]
    assert [len(b) for b in four] == [1, 1, 1, 1]
    assert sorted(sum((b[0] for b in four), [])) == sorted(
        epoch_batches(9, 8, 0, 0)[0])


@pytest.mark.parametrize("nproc, command", [
    ("1", "/v/bin/aoq"),
    ("4", "/v/bin/torchrun --standalone --nproc_per_node=4 /v/bin/aoq")])
def test_make_trains_in_nproc_processes(nproc, command):
    result = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "--eval",
                             "show-aoq-train: ; @echo $(AOQ_TRAIN)", "show-aoq-train",
                             f"NPROC={nproc}", "VENV=/v"], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == command, result.stderr


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_config, monkeypatch):
    monkeypatch.setattr(train_module, "world_size", lambda: 3)
    with pytest.raises(UserError, match="batch_size=16 is the global batch, split over 3"):
        train_module.check_processes(tiny_config)
    tiny_config.train.batch_size = 18
    train_module.check_processes(tiny_config)
    tiny_config.offcandi.remine_every = 1
    with pytest.raises(UserError, match="remine_every=1"):
        train_module.check_processes(tiny_config)
