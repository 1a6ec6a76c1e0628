"""The model in a process of its own, so that its calls never wait for the server's interpreter lock.

    process = ModelProcess(model)
    results = process.run("match", batch)     # jobs.match(model, batch), computed in the other process
    process.close()

The server's threads parse HTTP, decode images and build responses; in one process they hold the interpreter lock
in turn with the model's Python code (a small model runs many short kernels with Python in between), so the model
thread waits for them. Here the model runs in a child process (started with `spawn`, its weights passed in shared
memory, not copied): a batch of `jobs.Job`s goes through a pipe as pickled bytes (pixels made at the edge, not the
images they came from), `jobs.<kind>(model, batch)` runs there, and its results or its error come back. The child
starts with `start()` or on the first call; when it dies (killed, out of memory) the call in progress fails and the
next call starts a new one.

A script that serves with it needs the `if __name__ == "__main__":` guard `spawn` asks for (`blipkit serve` has it).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import threading
from typing import Any

import numpy as np
import torch

from ..base import BlipBase
from . import jobs


class ModelProcessError(RuntimeError):
    """The model's process stopped during a call, or sent back what cannot be read."""


def _light(job: Any) -> Any:
    """A job as it travels: with pixels made at the edge, the images themselves stay behind (only their count), and
    the pixels go as a numpy array (pickled as raw bytes: a tensor pickles through torch.save, ten times slower)."""
    if not isinstance(job, jobs.Job) or job.pixels is None:
        return job
    pixels = job.pixels
    if pixels.device.type == "cpu" and pixels.dtype in (torch.float32, torch.float16):
        pixels = pixels.numpy()
    return dataclasses.replace(job, images=[None] * len(job.images), pixels=pixels)


def _arrived(job: Any) -> Any:
    """A job as `_light` sent it, with its pixels a tensor again."""
    if isinstance(job, jobs.Job) and isinstance(job.pixels, np.ndarray):
        job.pixels = torch.from_numpy(job.pixels)
    return job


def _main(conn: Any, model: BlipBase, threads: int) -> None:
    """The child: run `jobs.<kind>(model, batch)` for every message until told to stop (None) or the pipe closes."""
    torch.set_num_threads(threads)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        request = pickle.loads(message)
        if request is None:
            return
        kind, batch = request
        try:
            reply = pickle.dumps((True, getattr(jobs, kind)(model, [_arrived(job) for job in batch])))
        except Exception as e:  # noqa: BLE001 - the caller gets the error, the process goes on
            try:
                reply = pickle.dumps((False, e))
                pickle.loads(reply)  # an error the server could not rebuild is sent as its text
            except Exception:  # noqa: BLE001
                reply = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
        conn.send_bytes(reply)


class ModelProcess:
    """Runs `jobs.<kind>(model, batch)` in a child process; one call at a time.

    Args:
        model: the model; its tensors move to shared memory, so the child uses the same weights.
        threads: torch threads of the child; by default one less than torch's (one per core), leaving a core to
            the server's HTTP work, which would otherwise stall the model's threads.
    """

    def __init__(self, model: BlipBase, threads: int | None = None) -> None:
        self.model, self.threads = model, threads or max(1, torch.get_num_threads() - 1)
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None

    def start(self) -> None:
        """Start the child now (it loads in the background) rather than on the first call."""
        with self._lock:
            if self._process is None:
                self._start()

    def _start(self) -> None:
        import torch.multiprocessing  # noqa: F401 - registers the pickling of tensors through shared memory

        self.model.share_memory()
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_main, args=(child, self.model, self.threads),
                                        name="blipkit-model", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def _stop(self) -> None:
        """Forget a dead child (its pipe closed, its exit code collected)."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._process = self._conn = None

    def run(self, kind: str, batch: list[Any]) -> list[Any]:
        """`jobs.<kind>(model, batch)`, computed in the child; its error is raised here."""
        message = pickle.dumps((kind, [_light(job) for job in batch]), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send_bytes(message)
                reply = self._conn.recv_bytes()
            except (EOFError, OSError):
                self._process.join(timeout=5)
                code = self._process.exitcode
                self._stop()
                raise ModelProcessError(f"the model's process stopped during a {kind} call (exit code {code}); "
                                        "the next request starts it again") from None
        try:
            ok, value = pickle.loads(reply)
        except Exception as e:  # noqa: BLE001
            raise ModelProcessError(f"the model's process sent a {kind} result that cannot be read ({e})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child (after the call in progress)."""
        with self._lock:
            if self._conn is not None and self._process is not None and self._process.is_alive():
                try:
                    self._conn.send_bytes(pickle.dumps(None))
                except OSError:
                    pass
            self._stop()
