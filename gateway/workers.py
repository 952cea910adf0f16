"""`chatgw serve --workers N`: N gateway processes accepting on one listening socket.

The parent binds the socket, starts N workers (spawned, so each builds its own event loop, backend
connections and model client) and then only supervises:

- A worker that exits after it became ready is replaced by a new one (a second later); one that
  exits before it ever became ready (an unmigrated database, a bad URL) stops the whole command,
  since every replacement would fail the same way.
- On SIGTERM or SIGINT the parent closes its copy of the listening socket and sends SIGTERM to
  every worker; each drains exactly as a single instance does (gateway/drain.py: reconnect frames,
  answers finished within the grace period, 1012) and closes its own copy, so the port stops
  accepting once all have. The parent waits for them all, then ends with the signal it got, as a
  single instance does.

uvicorn's own supervisor (`uvicorn.run(workers=N)`) would run plain `uvicorn.Server`s, without the
gateway's drain; hence this small one. Each worker is an instance like any other: they share
conversations through PostgreSQL and Redis only, which is why the command refuses `--workers > 1`
on the embedded memory backends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

# Runs one worker's server on the inherited sockets; calls `on_ready` once it serves, and prints
# the start banner when `announce` is true (the first worker only, so it is printed once).
WorkerTarget = Callable[..., int]

_RESTART_DELAY_S = 1.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    ready_pipe: Connection  # the worker writes to it once it serves (a pipe: no semaphore to leak)
    ready: bool = False

    def is_ready(self) -> bool:
        if not self.ready and self.ready_pipe.poll():
            with contextlib.suppress(EOFError):  # the worker exited without saying it was ready
                self.ready = bool(self.ready_pipe.recv())
        return self.ready


def _worker_main(target: WorkerTarget, sockets: list[socket.socket], index: int, ready: Connection) -> None:
    def on_ready() -> None:
        ready.send(True)

    raise SystemExit(target(sockets=sockets, on_ready=on_ready, announce=index == 0))


class Supervisor:
    """Starts `workers` processes running `target` on one socket bound to host:port; `run()` returns
    the command's exit status once they have all stopped (see the module docstring)."""

    def __init__(
        self, target: WorkerTarget, *, host: str, port: int, workers: int, stop_timeout: float
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._target = target
        self._stop_timeout = stop_timeout
        self._host = host
        self._port = port
        self._count = workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._stop_signal: int | None = None
        self._failed = False

    def run(self) -> int:
        sock = uvicorn.Config(app="gateway.app:create_app", host=self._host, port=self._port).bind_socket()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            self._workers = [self._start(index, sock) for index in range(self._count)]
            log.info("started %d workers: %s", self._count, [w.process.pid for w in self._workers])
            while self._stop_signal is None and not self._failed:
                wait([w.process.sentinel for w in self._workers], timeout=0.5)
                self._note_ready()
                self._replace_exited(sock)
        finally:
            sock.close()  # the port stops accepting once every worker closed its copy too
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._stop_signal is not None and not self._failed:
            # End as a single instance ends on that signal (uvicorn re-raises the one it handled).
            signal.signal(self._stop_signal, signal.SIG_DFL)
            signal.raise_signal(self._stop_signal)
        return 1 if self._failed else 0

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stop_signal = sig

    def _start(self, index: int, sock: socket.socket) -> _Worker:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main, args=(self._target, [sock], index, writer), name=f"chatgw-worker-{index}"
        )
        process.start()
        writer.close()  # the worker has its own copy
        return _Worker(index, process, reader)

    def _note_ready(self) -> None:
        """Log each worker once it says it serves (within half a second of it)."""
        for worker in self._workers:
            if not worker.ready and worker.process.is_alive() and worker.is_ready():
                log.info("worker %d (pid %s) is ready", worker.index, worker.process.pid)

    def _replace_exited(self, sock: socket.socket) -> None:
        for position, worker in enumerate(self._workers):
            if worker.process.is_alive() or self._stop_signal is not None:
                continue
            code = worker.process.exitcode
            if not worker.is_ready():
                log.error("worker %d exited with %s before it was ready: stopping", worker.index, code)
                self._failed = True
                return
            log.warning(
                "worker %d (pid %s) exited with %s: starting another", worker.index, worker.process.pid, code
            )
            worker.ready_pipe.close()
            time.sleep(_RESTART_DELAY_S)
            self._workers[position] = self._start(worker.index, sock)

    def _stop_all(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():  # a drain is bounded; this one is stuck
                log.error("worker %d did not stop in %.0f s: killing it", worker.index, self._stop_timeout)
                worker.process.kill()
                worker.process.join()
        log.info("all workers stopped")
