"""One retry for a crash of PyTorch's gloo backend that is not this library's: on a loaded machine a rank of
a 2-process CPU group now and then dies at start-up with SIGABRT ("terminate called without an active
exception", from a C++ thread of the process group), before it has trained a step; seen twice in CI in
~30 full runs, never in 175 launches on an idle or loaded machine here. A failure of any other kind, or
the same crash twice in a row, still fails the test. Every rank runs with Python's fault handler on, so
the crash prints the Python stack it happened under."""
import faulthandler
import subprocess
import warnings
from typing import Callable, TypeVar

import torch.multiprocessing as mp

GLOO_ABORT = "terminate called without an active exception"
T = TypeVar("T")


def enable_fault_handler() -> None:
    """In a spawned rank: print the Python stack on SIGABRT/SIGSEGV."""
    faulthandler.enable()


def gloo_aborted(error: BaseException) -> bool:
    """Whether a ``mp.spawn`` failure is a rank killed by SIGABRT."""
    return isinstance(error, mp.ProcessExitedException) and error.signal_name == "SIGABRT"


def spawn_with_retry(launch: Callable[[], T]) -> T:
    """``launch()`` (an ``mp.spawn``), once more if a rank died of SIGABRT."""
    try:
        return launch()
    except mp.ProcessExitedException as error:
        if not gloo_aborted(error):
            raise
        warnings.warn(f"a gloo rank aborted ({error}); spawning once more")
        return launch()


def run_with_retry(command: list, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command)`` of a torchrun launch, once more if a rank died of the gloo abort."""
    env = {**kwargs.pop("env", {}), "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, env=env, **kwargs)
    if result.returncode != 0 and GLOO_ABORT in result.stderr + result.stdout:
        warnings.warn(f"a gloo rank aborted; launching once more. Its output:\n{result.stderr[-4000:]}")
        result = subprocess.run(command, env=env, **kwargs)
    return result
