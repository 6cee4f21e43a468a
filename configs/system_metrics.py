"""The system figures one process reports once per step: CPU and memory of the process and its children
(vLLM's engine-core and worker processes), the memory of the machine it runs on, and on a GPU torch's
memory (allocated, reserved, peak) and the device's utilisation.

Every Ray actor (rollout workers, learner ranks, the reward actor) answers the driver's
`system_metrics()` call with `sample()`, and the driver samples itself; the driver logs the figures
as `system/<role>/<name>` (cluster.system.SystemMonitor), which MLflow's UI shows in the run's
"System metrics" tab. The module sits in the bottom layer because all three actor packages import it;
it imports nothing of the project.
"""

from __future__ import annotations

import os
import socket
import sys
import time

GIB = float(1 << 30)


def busy_percent(previous: dict[int, float], current: dict[int, float], seconds: float) -> float:
    """CPU use of a set of processes over the last `seconds`, from each pid's cumulative CPU seconds now
    (`current`) and at the previous sample (`previous`): 100 = one core busy all the time. A pid that
    started since counts all its CPU time; one that ended since counts none."""
    if seconds <= 0:
        return 0.0
    used = sum(max(0.0, cpu - previous.get(pid, 0.0)) for pid, cpu in current.items())
    return 100.0 * used / seconds


def node_busy_percent(previous, current) -> float | None:
    """The machine's CPU use between two `psutil.cpu_times()` readings, in percent of all its cores."""
    total = sum(current) - sum(previous)
    idle = (current.idle + getattr(current, "iowait", 0.0)) - (
        previous.idle + getattr(previous, "iowait", 0.0)
    )
    return None if total <= 0 else 100.0 * (total - idle) / total


def visible_gpus(environ: dict[str, str]) -> list[str] | None:
    """The GPUs this process may use as NVML names them (index or UUID), from CUDA_VISIBLE_DEVICES
    (which Ray sets for an actor with GPUs); None when unset (every GPU of the machine)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip() and part.strip() != "-1"]


class ProcessSampler:
    """Samples this process and, with `children`, the processes it started; each figure of a rate (CPU)
    covers the time since the previous sample, the first one the process's life so far."""

    def __init__(self, children: bool = True) -> None:
        import psutil

        self.process = psutil.Process()
        self.children = children
        self.cpu_seconds: dict[int, float] = {}
        self.sampled_at = self.process.create_time()
        self.node_times = None

    def sample(self) -> dict[str, float]:
        import psutil

        now = time.time()
        cpu_seconds, rss, count = {}, 0, 0
        tree = [self.process, *(self.process.children(recursive=True) if self.children else [])]
        for process in tree:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    # children_*: reaped children that are no longer in the tree (compile workers, ...).
                    cpu_seconds[process.pid] = sum(times[:4])
                    rss += process.memory_info().rss
                    count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        memory = psutil.virtual_memory()
        figures = {
            "cpu_percent": busy_percent(self.cpu_seconds, cpu_seconds, now - self.sampled_at),
            "rss_gib": rss / GIB,
            "processes": float(count),
            "node_memory_used_gib": (memory.total - memory.available) / GIB,
            "node_memory_used_percent": memory.percent,
        }
        node_times = psutil.cpu_times()
        if self.node_times is not None:
            node_percent = node_busy_percent(self.node_times, node_times)
            if node_percent is not None:
                figures["node_cpu_percent"] = node_percent
        self.cpu_seconds, self.sampled_at, self.node_times = cpu_seconds, now, node_times
        figures.update(torch_gpu_figures())
        figures.update(nvml_gpu_figures(visible_gpus(dict(os.environ))))
        return figures


def torch_gpu_figures() -> dict[str, float]:
    """This process's CUDA memory as torch's allocator sees it (peak: since the previous sample); empty
    where torch has not touched a GPU here (it is not imported nor initialised for this)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    figures = {
        "gpu_allocated_gib": torch.cuda.memory_allocated() / GIB,
        "gpu_reserved_gib": torch.cuda.memory_reserved() / GIB,
        "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
    }
    torch.cuda.reset_peak_memory_stats()
    return figures


def nvml_gpu_figures(gpus: list[str] | None) -> dict[str, float]:
    """Utilisation (mean) and used memory (sum, every process on them: a vLLM engine-core process's
    too) of the devices named in `gpus` (None: all), from NVML; empty without nvidia-ml-py or a GPU."""
    if gpus == []:
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        if gpus is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            handles = [
                pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
                if gpu.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(gpu)
                for gpu in gpus
            ]
        if not handles:
            return {}
        utilisation = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        used = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles]
    except Exception:  # no nvidia-ml-py, no driver, a MIG or odd device name: no device figures
        return {}
    return {
        "gpu_utilization_percent": sum(utilisation) / len(utilisation),
        "gpu_memory_used_gib": sum(used) / GIB,
    }


_SAMPLER: ProcessSampler | None = None


def machine() -> dict[str, str]:
    """The host name and address of this process's machine (Ray's node address where Ray runs)."""
    try:
        import ray

        address = ray.util.get_node_ip_address()
    except Exception:
        address = ""
    return {"host": socket.gethostname(), "address": address}


def sample(extra: dict[str, float] | None = None, children: bool = True) -> dict:
    """This process's figures since its previous call ({"host", "address", "time", "figures"}; time: when
    they were taken, seconds since the epoch); `extra` adds
    figures of the caller's own (a rollout worker's KV cache). children=False leaves out the processes
    it started (the driver's: a local Ray node, whose workers are the actors, reporting on their own)."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = ProcessSampler(children)
    figures = _SAMPLER.sample()
    figures.update(extra or {})
    return {**machine(), "time": time.time(), "figures": figures}
