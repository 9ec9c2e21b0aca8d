"""Ray processes a test starts on its own (a fake_multinode head and its nodes), found and
stopped by their --temp-dir: `ray stop` would stop every Ray on the machine."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GCS_PORT = 6379  # the fake provider starts its nodes against the GCS on this port


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the GCS binds: TIME_WAIT is no obstacle
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """Every process of the Ray started with --temp-dir=temp_dir (fake nodes share the head's temp
    dir), with their children (workers retitle themselves `ray::...`)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            try:
                for p in (process, *process.children(recursive=True)):
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def stop_ray_under(temp_dir: str) -> None:
    """`ray stop --force` for this test's Ray only: that command stops every Ray on the machine
    (other test sessions share it), so the processes are found by their temp dir instead. Half a
    second's grace (Ray's Python helpers exit on SIGTERM in that time; the GCS and raylets take 20 s
    and more to heed it, so a longer wait buys nothing), then SIGKILL, which --force sends at once."""
    processes = processes_of(temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=0.5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
