"""``nc-finetune run`` under torchrun and ``accelerate launch`` with 2 CPU processes (gloo) equals one process: the
probe is sharded and all-reduced, the logged loss is the mean over ranks, only rank 0 prints; and
``accelerate launch --cpu --num_processes 2`` (which starts one process) is refused with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nc_finetune.cli import main
from tests.conftest import recipe_overrides

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
GLOBAL_BATCH = 4
# Exactly zero gradient in exact arithmetic, so Adam turns its round-off into sign-dependent moves (see test_ddp).
ZERO_GRADIENT = "attention.self.key.bias"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", *launcher, "-m", "nc_finetune.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)


LAUNCHERS = {
    "torchrun": lambda port: ["torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
                              "--master_port", str(port)],
    "accelerate": lambda port: ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}


def _overrides(bert_dir: Path, csv: dict[str, str], batch: int) -> list[str]:
    return recipe_overrides(bert_dir, csv, **{"train.batch_size": batch, "train.checkpoint_every": 2})


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, bert_dir_nodrop, text_csv) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["run", "minilm-rotten-tomatoes", "--out", str(out), "--quiet",
                 *_overrides(bert_dir_nodrop, text_csv, GLOBAL_BATCH)]) == 0
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_cpu_processes_match_one(launcher, single_run, bert_dir_nodrop, text_csv, tmp_path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "run"
    argv = ["run", "minilm-rotten-tomatoes", "--out", str(out), "--quiet",
            *_overrides(bert_dir_nodrop, text_csv, GLOBAL_BATCH // WORLD)]
    proc = _launch(LAUNCHERS[launcher](_free_port()), argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1, proc.stdout  # only rank 0 prints

    # The probe: each rank probed its shard, the all-reduced statistics equal one process's.
    one, two = (json.loads((d / "probe.json").read_text()) for d in (single_run, out))
    assert (one["world_size"], two["world_size"]) == (1, WORLD) and one["samples"] == two["samples"] == 16
    for a, b in zip(one["layers"], two["layers"], strict=True):
        for key in ("nc1", "nc1_trace", "cdnv", "nc2", "ncc_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), (a["name"], key)

    # Training: the same steps, the same logged losses (averaged over ranks), the same weights and test metrics.
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single_run, out))
    assert s2["world_size"] == WORLD and s1["steps"] == s2["steps"] == 12
    assert s2["test_confusion_matrix"] == s1["test_confusion_matrix"]
    assert s2["test_loss"] == pytest.approx(s1["test_loss"], abs=1e-5)
    log1, log2 = ([r for r in _lines(d / "metrics.jsonl") if "split" not in r] for d in (single_run, out))
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, 13))
    for r1, r2 in zip(log1, log2, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5), (r1, r2)
    w1, w2 = (load_file(str(d / "trainable.safetensors")) for d in (single_run, out))
    assert set(w1) == set(w2)
    for k in w1:
        if ZERO_GRADIENT not in k:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5, msg=k)


def test_accelerate_cpu_launch_of_several_processes_is_refused(bert_dir_nodrop, text_csv, tmp_path) -> None:
    launcher = ["accelerate.commands.launch", "--cpu", "--num_processes", str(WORLD), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    argv = ["probe", "minilm-rotten-tomatoes", "--out", str(tmp_path / "p"), *_overrides(bert_dir_nodrop, text_csv, 2)]
    proc = _launch(launcher, argv, tmp_path)
    assert proc.returncode != 0
    assert "nc-finetune probe: error: accelerate launch --cpu starts a single process" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_check_launch_recognises_only_that_launch() -> None:
    from nc_finetune.errors import UserError
    from nc_finetune.utils.dist import check_launch

    trap = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(UserError, match="--multi_gpu --num_processes N"):
        check_launch(trap)
    check_launch({"ACCELERATE_USE_CPU": "True"})  # one CPU process asked for: fine
    check_launch({**trap, "WORLD_SIZE": "2", "RANK": "0"})  # launched with a world size
    check_launch({**trap, "OMPI_COMM_WORLD_SIZE": "2"})  # through mpirun
    check_launch({"MASTER_PORT": "29500"})
