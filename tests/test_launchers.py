"""Launch scripts: shellcheck-clean, --help, one clear error for missing arguments, --dry-run
prints the exact command, and the elastic multi-node script really launches a c10d job on CPU."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import free_port
from tests.test_cli import tiny_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
LAUNCHERS = ["torchrun_node.sh", "torchrun_multinode.sh", "slurm.sbatch", "deepspeed.sh", "tpu_pod.sh"]
CONFIG = "configs/simclr/fmnist_cpu.yaml"


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join("launchers", script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=full_env)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """The '+ cmd ...' lines a dry run prints, split as a shell would read them."""
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_shellcheck_passes_on_every_launcher():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `make test` installs it (Debian package shellcheck)"
    paths = [os.path.join(REPO, "launchers", name) for name in LAUNCHERS]
    assert all(os.path.isfile(p) for p in paths)
    proc = subprocess.run([shellcheck, "--shell=bash", *paths], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_and_missing_arguments(script):
    proc = launch(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr
    proc = launch(script)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{script}: error: missing"), proc.stderr
    assert "--config" in proc.stderr and "\n" == proc.stderr[-1] and proc.stderr.count("\n") == 1
    proc = launch(script, "--bogus")
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr


def test_torchrun_node_dry_run():
    proc = launch("torchrun_node.sh", "--config", CONFIG, "--nproc-per-node", "8", "--dry-run", "--", "trainer.max_steps=5")
    assert proc.returncode == 0, proc.stderr
    assert commands(proc) == [["torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", "8", "-m", "scale_ssl",
                               "fit", "--config", CONFIG, "trainer.max_steps=5"]]
    bad = launch("torchrun_node.sh", "--config", CONFIG, "--nproc-per-node", "eight")
    assert bad.returncode == 2 and "--nproc-per-node must be a positive integer" in bad.stderr


def test_torchrun_multinode_static_and_elastic_dry_runs():
    static = launch("torchrun_multinode.sh", "--config", CONFIG, "--nnodes", "8", "--nproc-per-node", "8",
                    "--node-rank", "3", "--master-addr", "node0", "--dry-run")
    assert commands(static) == [["torchrun", "--nnodes", "8", "--nproc_per_node", "8", "--max_restarts", "0",
                                 "--node_rank", "3", "--master_addr", "node0", "--master_port", "29500",
                                 "-m", "scale_ssl", "fit", "--config", CONFIG]]
    elastic = launch("torchrun_multinode.sh", "--config", CONFIG, "--nnodes", "6:8", "--nproc-per-node", "8",
                     "--rdzv-endpoint", "node0:29400", "--max-restarts", "3", "--dry-run", "--", "trainer.ckpt_path=last")
    assert commands(elastic) == [["torchrun", "--nnodes", "6:8", "--nproc_per_node", "8", "--max_restarts", "3",
                                  "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29400", "--rdzv_id", "scale_ssl",
                                  "-m", "scale_ssl", "fit", "--config", CONFIG, "trainer.ckpt_path=last"]]
    for args, message in [
        (["--nnodes", "8", "--nproc-per-node", "8"], "missing --node-rank K with --master-addr HOST (static), or --rdzv-endpoint"),
        (["--nnodes", "8", "--nproc-per-node", "8", "--node-rank", "1"], "--node-rank needs --master-addr"),
        (["--nnodes", "8", "--nproc-per-node", "8", "--node-rank", "8", "--master-addr", "h"], "--node-rank must be 0..7"),
        (["--nnodes", "8", "--nproc-per-node", "8", "--rdzv-endpoint", "h"], "--rdzv-endpoint must be HOST:PORT"),
    ]:
        proc = launch("torchrun_multinode.sh", "--config", CONFIG, *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_slurm_submits_itself_and_runs_one_torchrun_per_node(tmp_path):
    outside = launch("slurm.sbatch", "--config", CONFIG, "--nodes", "8", "--dry-run", "--", "trainer.ckpt_path=last")
    assert outside.returncode == 0, outside.stderr
    assert commands(outside)[0] == ["sbatch", "--nodes", "8", "launchers/slurm.sbatch", "--config", CONFIG, "--nodes", "8",
                                    "--", "trainer.ckpt_path=last"]
    # Inside a job: SLURM's variables and its scontrol (a stand-in printing the allocation's hosts).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-017\\ngpu-018\\n'\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[017-018]", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    inside = launch("slurm.sbatch", "--config", CONFIG, "--max-restarts", "2", "--dry-run", env=env)
    assert inside.returncode == 0, inside.stderr
    assert commands(inside) == [["srun", "--ntasks-per-node", "1", "torchrun", "--nnodes", "2", "--nproc_per_node", "8",
                                 "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-017:29400", "--rdzv_id", "4242",
                                 "--max_restarts", "2", "-m", "scale_ssl", "fit", "--config", CONFIG]]


def test_deepspeed_dry_run(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    proc = launch("deepspeed.sh", "--config", "configs/swav/imagenet_64gpu_deepspeed.yaml", "--num-gpus", "8",
                  "--hostfile", str(hostfile), "--dry-run")
    assert commands(proc) == [["deepspeed", "--num_gpus", "8", "--master_port", "29500", "--no_local_rank", "--hostfile",
                               str(hostfile), "--module", "scale_ssl", "fit", "--config",
                               "configs/swav/imagenet_64gpu_deepspeed.yaml", "trainer.strategy=deepspeed"]]
    missing = launch("deepspeed.sh", "--config", CONFIG, "--num-gpus", "8", "--hostfile", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "--hostfile" in missing.stderr and "does not exist" in missing.stderr


def test_tpu_pod_dry_run_runs_fit_on_every_host_with_pjrt_tpu():
    proc = launch("tpu_pod.sh", "--tpu", "pod", "--zone", "europe-west4-a", "--config", "configs/simclr/imagenet_tpu_v3_128.yaml",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    ssh = [c for c in commands(proc) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert ssh and all("--worker=all" in c for c in ssh)
    assert any("PJRT_DEVICE=TPU" in c[-1] and "configs/simclr/imagenet_tpu_v3_128.yaml" in c[-1] for c in ssh)
    scp = [c for c in commands(proc) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    # the local config goes to every host before the run; then one log per host (v3-128: 16 hosts)
    assert scp[0][5:7] == ["configs/simclr/imagenet_tpu_v3_128.yaml", "pod:scale_ssl/configs/simclr/imagenet_tpu_v3_128.yaml"]
    assert "--worker=all" in scp[0]
    collected = scp[1:]
    assert [c[-1] for c in collected] == [f"--worker={i}" for i in range(16)]
    assert all(c[5] == "pod:scale_ssl/logs/fit.log" and c[6].endswith(f"/worker-{i}.log") for i, c in enumerate(collected))


def test_tpu_pod_collects_every_hosts_log_and_keeps_the_fits_exit_status(tmp_path):
    """Run (not dry-run) against a stand-in `gcloud` on PATH (no Cloud project exists here) that
    records each call, fails the fit like a crashed host would, and writes the log file scp asks
    for: the logs are still collected and the script exits with the fit's status."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\n' \"$*\" >> {calls}\n"
        'if [[ "$4" == ssh ]]; then exit 7; fi\n'
        'if [[ "$4" == scp && "$5" == *:scale_ssl/logs/fit.log ]]; then echo "log of ${*: -1}" > "$6"; fi\n'
    )
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    proc = launch("tpu_pod.sh", "--tpu", "pod", "--zone", "z", "--config", "configs/simclr/imagenet_tpu_v4_128.yaml",
                  "--accelerator-type", "v4-32", "--skip-create", "--skip-install", "--log-dir", str(logs),
                  env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert proc.returncode == 7, proc.stderr
    assert "the fit exited with status 7" in proc.stderr
    assert sorted(p.name for p in logs.iterdir()) == [f"worker-{i}.log" for i in range(4)]
    assert (logs / "worker-3.log").read_text().strip() == "log of --worker=3"
    assert sum(" ssh " in f" {line} " for line in calls.read_text().splitlines()) == 1


def test_tpu_pod_needs_the_host_count_for_slice_names_it_cannot_read():
    proc = launch("tpu_pod.sh", "--tpu", "pod", "--zone", "z", "--config", "configs/simclr/imagenet_tpu_v3_128.yaml",
                  "--accelerator-type", "v5litepod-16", "--dry-run")
    assert proc.returncode == 2 and "pass --hosts N" in proc.stderr


@pytest.mark.timeout(400)
def test_elastic_multinode_launcher_runs_a_real_c10d_job(fmnist_shards, tmp_path):
    """The command the script prints is the one it runs: 1 node x 2 gloo ranks meeting at a c10d
    rendezvous on loopback, with restarts enabled, train 3 steps."""
    port = free_port()
    env = dict(os.environ, TORCHRUN=os.path.join(VENV_BIN, "torchrun"), PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launchers", "torchrun_multinode.sh"), "--config", os.path.join(REPO, CONFIG),
         "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "1", "--",
         *tiny_overrides(fmnist_shards, tmp_path, strategy="ddp"), "tracking.enabled=false"],
        capture_output=True, text=True, timeout=380, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--rdzv_endpoint 127.0.0.1:{port}" in proc.stdout.splitlines()[0]
    assert "16/device x 2" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["world_size"] == 2
