"""Several receiver processes on one DICOM port ([dicom] receivers > 1).

One Python process holds one GIL: associations from several scanners at once (or a C-MOVE
from the PACS) then queue behind each other. With ``receivers = N`` the node's main process
and N - 1 receiver processes listen on the same port with SO_REUSEPORT (the kernel spreads
new connections over them); each has its own receive journal (``<spool>/.journal/receiver-k``)
and applies it to the shared database itself. A child tells the main process's worker and
forwarder that there is work over a loopback UDP socket (a lost datagram costs at most the
worker's poll interval). The main process restarts a child that dies; the child applies what
its journal still holds before it listens again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable

from mriqa_node.config import Settings

log = logging.getLogger(__name__)

WORK, FORWARD = b"w", b"f"
RESTART_SECONDS = 1.0
PR_SET_PDEATHSIG = 1


class WakeListener:
    """The main process's end: a datagram from a child sets the matching event."""

    def __init__(self, on_work: Callable[[], None], on_forward: Callable[[], None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._actions = {WORK: on_work, FORWARD: on_forward}

    def run(self, stopping: threading.Event) -> None:
        self.sock.settimeout(0.5)
        while not stopping.is_set():
            try:
                data = self.sock.recv(16)
            except TimeoutError:
                continue
            except OSError:
                return
            for byte in {data[i : i + 1] for i in range(len(data))}:
                if action := self._actions.get(byte):
                    action()

    def close(self) -> None:
        self.sock.close()


def wake_sender(port: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """A child's end: (on_work, on_forward)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(byte: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendto(byte, ("127.0.0.1", port))

    return (lambda: send(WORK)), (lambda: send(FORWARD))


class ReceiverProcesses:
    """Starts receivers 1..N-1, restarts any that dies, stops them with the node."""

    def __init__(self, settings: Settings, wake_port: int) -> None:
        self.settings_json = settings.model_dump_json()
        self.count = settings.dicom.receivers
        self.wake_port = wake_port
        self._context = multiprocessing.get_context("spawn")  # no threads or TF inherited
        self._children: dict[int, multiprocessing.process.BaseProcess] = {}

    def start(self) -> None:
        for slot in range(1, self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        child = self._context.Process(target=run_receiver, name=f"mriqa-receiver-{slot}",
                                      args=(self.settings_json, slot, self.wake_port),
                                      daemon=True)  # fmt: skip
        child.start()
        self._children[slot] = child
        log.info("receiver process %d started (pid %d)", slot, child.pid)

    def supervise(self, stopping: threading.Event) -> None:
        while not stopping.wait(RESTART_SECONDS):
            for slot, child in list(self._children.items()):
                if not child.is_alive() and not stopping.is_set():
                    log.error("receiver process %d (pid %s) ended with %s: restarting it",
                              slot, child.pid, child.exitcode)  # fmt: skip
                    self._spawn(slot)

    def pids(self) -> list[int]:
        return [c.pid for c in self._children.values() if c.pid is not None]

    def stop(self) -> None:
        for child in self._children.values():
            child.terminate()  # SIGTERM: the child stops listening and applies its journal
        for child in self._children.values():
            child.join(timeout=30)
            if child.is_alive():
                child.kill()


def run_receiver(settings_json: str, slot: int, wake_port: int) -> None:
    """A receiver process: the DICOM receiver and its journal, nothing else."""
    from mriqa_node.cli import setup_logging
    from mriqa_node.node import Node

    _end_with_parent()
    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.logging.level)
    node = Node(settings, slot=slot)
    node.intake.on_work, node.intake.on_forward = wake_sender(wake_port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    node.start(receiver=True, worker=False, monitor=False, console=False)
    done.wait()
    node.stop()


def _end_with_parent() -> None:
    """SIGTERM when the main process dies, even by kill -9 (Linux): an orphan receiver would
    keep the port and its journal from the main process's successor."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
