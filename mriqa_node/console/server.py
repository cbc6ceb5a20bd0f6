"""Serve the console with uvicorn in a thread of the node process."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from mriqa_node.config import ConsoleConfig

log = logging.getLogger(__name__)


class ConsoleServer:
    def __init__(self, app: FastAPI, config: ConsoleConfig) -> None:
        self.config = config
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="warning",
                access_log=False,  # URLs carry series UIDs only, but keep logs for events
                ssl_certfile=config.tls_cert or None,
                ssl_keyfile=config.tls_key or None,
                timeout_graceful_shutdown=2,
            )
        )
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: start() says so
            self.server.run()

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"console cannot listen on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        log.info("console on %s", self.config.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
