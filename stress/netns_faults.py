"""Faults between hosts: the project's own test hosts in network namespaces (ip netns, veth
pairs, tc), the node in the root namespace. Needs root.

  1. A scanner on a slow link (tbf, 4 Mbit/s): storescu in its own namespace sends series;
     what it was told against what the node keeps.
  2. A worker host cut off from PostgreSQL in the middle of its claims (a qdisc that drops
     every packet on its link: a partition, no reset): its claims expire, a worker on another
     host scores
     them; when the partition heals the first worker's late results are dropped: every slice
     scored once, every series decided.
  3. The PACS (Orthanc in its own namespace) behind a partition while series arrive: the
     forward queue waits, and when the partition heals Orthanc gets every instance.

This sandbox's kernel has no netem (nor iptables), so random loss and delay are not emulated;
tbf and a drop-all pfifo are. PostgreSQL listens on 127.0.0.1 only: the worker host reaches
it through a TCP relay on the host side of its link, so cutting the link cuts the worker off
as a partition would.
Run: sudo .venv/bin/python stress/netns_faults.py [--series 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    DCMTK_ENV,
    NODE_AET,
    NODE_ENV,
    ORTHANC,
    NodeServer,
    ThrowawayPostgres,
    machine_line,
    make_series,
    table,
    tool,
    wait_until,
)
from sqlalchemy import create_engine, text  # noqa: E402

PREFIX = "mriqa"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Host:
    """A network namespace joined to the root namespace by a veth pair on 10.77.<n>.0/24:
    the root side is 10.77.<n>.1, the host 10.77.<n>.2."""

    def __init__(self, name: str, n: int) -> None:
        self.ns, self.n = f"{PREFIX}-{name}", n
        self.outer, self.inner = f"{PREFIX}{n}o", f"{PREFIX}{n}i"
        self.gateway, self.address = f"10.77.{n}.1", f"10.77.{n}.2"

    def __enter__(self) -> Host:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.outer, check=False)
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        sh("ip", "link", "set", self.inner, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outer)
        sh("ip", "link", "set", self.outer, "up")
        self.run("ip", "addr", "add", f"{self.address}/24", "dev", self.inner)
        self.run("ip", "link", "set", self.inner, "up")
        self.run("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.outer, check=False)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *cmd, check=check)

    def popen(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], env=env,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip

    def shape(self, *qdisc: str) -> None:
        """The same queueing discipline both ways (each side's egress); none: a clean link."""
        sh("tc", "qdisc", "del", "dev", self.outer, "root", check=False)
        self.run("tc", "qdisc", "del", "dev", self.inner, "root", check=False)
        if qdisc:
            sh("tc", "qdisc", "add", "dev", self.outer, "root", *qdisc)
            self.run("tc", "qdisc", "add", "dev", self.inner, "root", *qdisc)

    def cut(self) -> None:
        """A partition: every packet dropped both ways, the links still up (no reset)."""
        self.shape("pfifo", "limit", "0")


class Relay(threading.Thread):
    """TCP relay from (host, port) to 127.0.0.1:target, one thread pair per connection."""

    def __init__(self, host: str, target: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server((host, 0))
        self.port, self.target = self.listener.getsockname()[1], target

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def storescu(host: Host, target: str, port: int, files: list[Path], aet: str) -> int:
    """Send from inside ``host``; returns how many were answered Success."""
    cmd = [tool("storescu"), "-v", "-aet", aet, "-aec", NODE_AET, "-to", "30", "-ta", "30",
           "-td", "60", target, str(port), *map(str, files)]  # fmt: skip
    out = subprocess.run(["ip", "netns", "exec", host.ns, *cmd], capture_output=True,
                         text=True, env=DCMTK_ENV, timeout=600)  # fmt: skip
    return (out.stdout + out.stderr).count("Received Store Response (Success)")


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def slow_scanner(root: Path, pg_url: str, n_series: int) -> list:
    series = make_series(root / "data", n_series, 12, size=256, seed0=500)
    files = [f for s in series for f in s]
    with Host("scanner", 1) as scanner:
        scanner.shape("tbf", "rate", "4mbit", "burst", "32kbit", "latency", "400ms")
        node = NodeServer(root / "node", pg_url, dicom={"host": "0.0.0.0"},
                          worker={"enabled": False}, console={"enabled": False})  # fmt: skip
        with node:
            node.start()
            start = time.monotonic()
            told = sum(storescu(scanner, scanner.gateway, node.port, s, "STORESCU")
                       for s in series)  # fmt: skip
            seconds = time.monotonic() - start
            engine = create_engine(pg_url)
            kept = count(engine, "select count(*) from instance")
            engine.dispose()
    return [["scanner on a 4 Mbit/s link", f"{len(files)} sent, {told} told Success",
             f"{kept} kept, {told - min(told, kept)} lost",
             f"{len(files) / seconds:.1f} instances/s"]]  # fmt: skip


def cut_off_worker(root: Path, pg_url: str, n_series: int) -> list:
    series = make_series(root / "data2", n_series, 12, size=512, seed0=700)
    pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    with Host("worker", 2) as worker_host:
        relay = Relay(worker_host.gateway, pg_port)
        relay.start()
        claim = {"claim_seconds": 8.0, "poll_seconds": 0.1}
        node = NodeServer(root / "node2", pg_url, worker={"enabled": False, **claim},
                          console={"enabled": False})  # fmt: skip
        with node:
            node.start(args=("serve", "--no-worker"))
            relayed = pg_url.replace("127.0.0.1:5432", f"{worker_host.gateway}:{relay.port}")
            config = node.config_path.with_name("worker.toml")
            config.write_text(node.config_path.read_text().replace(pg_url, relayed))
            env = {**NODE_ENV, "MRIQA_CONFIG": str(config)}
            cmd = [sys.executable, "-m", "mriqa_node.cli", "worker"]
            cut_worker = worker_host.popen(cmd, root / "worker-cut.log", env)
            engine = create_engine(pg_url)
            for s in series:
                storescu_root(node.port, s)
            mine = f"select count(*) from instance where state = 'claimed' and claimed_by like" \
                   f" '%:{cut_worker.pid}:%'"  # fmt: skip
            wait_until(lambda: count(engine, mine) > 0, 180, "the worker to claim", 0.05)
            held = count(engine, mine)
            worker_host.cut()
            cut_at = time.monotonic()
            env2 = {**NODE_ENV, "MRIQA_CONFIG": str(node.config_path)}
            log2 = (root / "worker-2.log").open("ab")
            other = subprocess.Popen(cmd, env=env2, stdout=log2, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
            decided = "select count(*) from series where state = 'decided'"
            wait_until(lambda: count(engine, decided) == len(series), 300, "all decided", 0.5)
            recovered = time.monotonic() - cut_at
            worker_host.shape()  # the partition heals; the cut-off worker comes back
            time.sleep(20)
            twice = count(engine, "select count(*) from (select instance_id, frame from"
                                  " slice_score group by instance_id, frame"
                                  " having count(*) > 1) x")  # fmt: skip
            scores = count(engine, "select count(*) from slice_score")
            instances = count(engine, "select count(*) from instance")
            verdicts = count(engine, "select count(*) from series_verdict")
            for proc in (cut_worker, other):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            engine.dispose()
    return [["worker cut off from PostgreSQL holding claims",
             f"{held} claimed when cut; {instances} instances, {scores} slices scored, "
             f"{twice} twice", f"all {len(series)} series decided {recovered:.0f} s after the "
             f"cut ({verdicts} verdicts)", "claims expire after 8 s"]]  # fmt: skip


def storescu_root(port: int, files: list[Path]) -> None:
    subprocess.run([tool("storescu"), "-aet", "STORESCU", "-aec", NODE_AET, "127.0.0.1",
                    str(port), *map(str, files)], check=True, capture_output=True,
                   env=DCMTK_ENV)  # fmt: skip


def partitioned_pacs(root: Path, pg_url: str, n_series: int, partition: float) -> list:
    series = make_series(root / "data3", n_series, 12, size=256, seed0=900)
    files = [f for s in series for f in s]
    with Host("pacs", 3) as pacs:
        http_port, dicom_port = 8042, 4242
        workdir = root / "orthanc"
        workdir.mkdir()
        config = {
            "Name": "pacs", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "DicomAet": "ORTHANC",
            "DicomPort": dicom_port, "HttpPort": http_port, "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": True, "AuthenticationEnabled": False, "Plugins": [],
        }  # fmt: skip
        (workdir / "orthanc.json").write_text(json.dumps(config))
        orthanc = pacs.popen([ORTHANC, str(workdir / "orthanc.json")], workdir / "orthanc.log",
                             DCMTK_ENV)  # fmt: skip

        def held() -> int:
            import urllib.request

            url = f"http://{pacs.address}:{http_port}/statistics"
            with urllib.request.urlopen(url, timeout=3) as r:
                return int(json.load(r)["CountInstances"])

        wait_until(lambda: _quiet(held) is not None, 60, "Orthanc", 0.2)
        destination = {"name": "pacs", "ae_title": "ORTHANC", "host": pacs.address,
                       "port": dicom_port, "send_sr": False, "send_kos": False,
                       "backoff_seconds": 1.0, "backoff_max_seconds": 5.0}  # fmt: skip
        node = NodeServer(root / "node3", pg_url, worker={"enabled": False},
                          pacs={"destinations": [destination]},
                          console={"enabled": False})  # fmt: skip
        with node:
            node.start()
            pacs.cut()
            start = time.monotonic()
            for s in series:
                storescu_root(node.port, s)
            time.sleep(max(0.0, partition - (time.monotonic() - start)))
            during = _quiet(held)  # Orthanc's HTTP is behind the partition too
            pacs.shape()
            healed = time.monotonic()
            wait_until(lambda: (_quiet(held) or 0) >= len(files), 300, "Orthanc to catch up", 0.5)
            caught_up = time.monotonic() - healed
            engine = create_engine(pg_url)
            sent = count(engine, "select count(*) from forward_job where state = 'sent'")
            jobs = count(engine, "select count(*) from forward_job")
            engine.dispose()
            final = held()
        orthanc.terminate()
        orthanc.wait(30)
    shown = "unreachable" if during is None else str(during)
    return [["PACS behind a partition", f"{len(files)} kept while cut off {partition:.0f} s "
             f"(Orthanc: {shown})", f"Orthanc holds {final} after healing; jobs {sent}/{jobs} "
             "sent", f"caught up {caught_up:.1f} s after the heal"]]  # fmt: skip


def _quiet(fn):
    try:
        return fn()
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--partition-seconds", type=float, default=30.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns, tc)")
    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="mriqa-netns-"))
    rows = []
    with ThrowawayPostgres("mriqa_netns") as pg:
        rows += slow_scanner(root, pg.url, args.series)
    with ThrowawayPostgres("mriqa_netns") as pg:
        rows += cut_off_worker(root, pg.url, args.series)
    with ThrowawayPostgres("mriqa_netns") as pg:
        rows += partitioned_pacs(root, pg.url, args.series, args.partition_seconds)
    print(table(["fault", "what happened", "outcome", "note"], rows))


if __name__ == "__main__":
    main()
