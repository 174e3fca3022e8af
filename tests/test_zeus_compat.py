"""The official Zeus Python clients, unchanged, against the real daemon.

Both generations are exercised: zeus 0.15.1 (pairs with the v0.4.0 contract)
and zeus 0.16.0 (v0.5.0). Each runs in its own virtual environment
(``tests/zeus_clients/setup_venvs.sh``) as a long-lived driver process
(``tests/zeus_clients/driver.py``) that answers JSON commands; every HTTP
request is made by zeus itself, over the daemon's real UNIX socket or TCP
port, with and without bearer-token auth. The daemons run on the stand-in
NVML library and a RAPL tree; the client process loads the same stand-in
(zeus reads power and energy locally through pynvml), with its own call log so
the tests can tell that privileged writes were relayed through the daemon.

Without the venvs these tests skip, unless ``ZEUSD_REQUIRE_ZEUS_CLIENTS=1``
(set by ``make test``), where they fail.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import pytest

from tests.daemon import REPO, Daemon, Transport, free_tcp_port, issue_token, terminate, wait_until
from tests.fakenvml import FakeNvml, build_library
from tests.rapl_tree import RaplTree
from tests.zeus_clients import GENERATIONS, client_python
from zeusd.auth import AUTH_REQUIRED_MESSAGE

#: The --stream-format each generation needs: neither client asks with ``format=``.
STREAM_FORMAT = {"0.15": "v0.4", "0.16": "v0.5"}
ALL_GROUPS = "gpu-control,gpu-read,cpu-read"

GPUS: list[dict[str, object]] = [
    {"name": "NVIDIA A40", "power_mw": 151_234, "energy_mj": 1_234_567},
    {"name": "NVIDIA H100 80GB HBM3", "power_mw": 98_765, "energy_mj": 7_654_321},
]

_values = itertools.count(1)


def fresh(base: int, step: int = 1000, *, unlike: Collection[int] = ()) -> int:
    """A value no recent test used and none of ``unlike`` (the current settings), so a dropped write is seen."""
    while (value := base + step * (next(_values) % 200)) in unlike:
        pass
    return value


# --------------------------------------------------------------------------- the client venvs



class ClientError(AssertionError):
    pass


class ZeusProcess:
    """One driver process running one zeus release; ``run`` sends a command and returns its result."""

    def __init__(self, gen: str, python: Path, env: dict[str, str], log: Path) -> None:
        self.gen = gen
        self.log = log
        self._stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(python), str(REPO / "tests" / "zeus_clients" / "driver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=REPO,
        )
        version = self.run("version")
        assert version["zeus"] == GENERATIONS[gen]
        self.pid = int(version["pid"])

    def _send(self, op: str, timeout: float, kw: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"zeus {self.gen} driver gave no answer to {op}:\n{self.log.read_text(errors='replace')[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, op: str, timeout: float = 60, **kw: Any) -> Any:
        answer = self._send(op, timeout, kw)
        if "error" in answer:
            raise ClientError(f"zeus {self.gen} {op} {kw} failed: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["ok"]

    def fails(self, op: str, timeout: float = 60, **kw: Any) -> dict[str, Any]:
        """The error a command raised inside zeus (type, base types, message); fails if it succeeded."""
        answer = self._send(op, timeout, kw)
        assert "error" in answer, f"zeus {self.gen} {op} {kw} unexpectedly succeeded: {answer['ok']}"
        error: dict[str, Any] = answer["error"]
        return error

    def call(self, method: str, *args: Any, client: str = "default", **kwargs: Any) -> Any:
        return self.run("call", client=client, method=method, args=list(args), kwargs=kwargs)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    """One stand-in machine: GPUs, RAPL packages, a signing key, and daemons started on demand."""

    directory: Path
    fake: FakeNvml
    tree: RaplTree
    key: Path
    tokens: dict[str, str] = field(default_factory=dict)
    daemons: dict[tuple[str, str, bool], Daemon] = field(default_factory=dict)
    daemon_nvml: dict[tuple[str, str, bool], FakeNvml] = field(default_factory=dict)
    clients: dict[str, ZeusProcess] = field(default_factory=dict)

    def daemon(self, fmt: str, transport: str, auth: bool) -> Daemon:
        key = (fmt, transport, auth)
        if key not in self.daemons:
            name = f"{fmt}-{transport}-{'auth' if auth else 'open'}"
            directory = self.directory / name
            directory.mkdir()
            # Same stand-in state for every process; a call log of its own, to see who called.
            nvml = FakeNvml(self.fake.state_path, directory / "nvml.log", self.fake.lib_dir)
            where = Transport("unix", str(directory / "zeusd.sock")) if transport == "unix" else Transport("tcp", free_tcp_port())
            args = ["--rapl-root", str(self.tree.root), "--stream-format", fmt, "--enable", ALL_GROUPS]
            if auth:
                args += ["--signing-key-path", str(self.key)]
            self.daemons[key] = Daemon(where, args, nvml.env(), directory / "zeusd.log").start()
            self.daemon_nvml[key] = nvml
        return self.daemons[key]

    def client(self, gen: str) -> ZeusProcess:
        if gen not in self.clients:
            python = client_python(gen)
            nvml = FakeNvml(self.fake.state_path, self.directory / f"client-{gen}-nvml.log", self.fake.lib_dir)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEUSD_", "CUDA_VISIBLE"))}
            env.update(nvml.env(), PYTHONUNBUFFERED="1")
            self.clients[gen] = ZeusProcess(gen, python, env, self.directory / f"client-{gen}.stderr")
        return self.clients[gen]

    def client_nvml(self, gen: str) -> FakeNvml:
        return FakeNvml(self.fake.state_path, self.directory / f"client-{gen}-nvml.log", self.fake.lib_dir)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("zeus-compat")
    fake = FakeNvml(directory / "nvml.state", None, build_library())
    fake.create(len(GPUS), gpus=GPUS)
    tree = RaplTree(directory / "powercap")
    tree.add_package(0, energy_uj=5_000_000, dram_energy_uj=700_000)
    tree.add_package(1, energy_uj=6_000_000)
    key = directory / "signing.key"
    key.write_bytes(os.urandom(48).hex().encode() + b"\n")
    key.chmod(0o600)
    other = directory / "other.key"
    other.write_bytes(os.urandom(48).hex().encode() + b"\n")
    other.chmod(0o600)
    node = Node(directory, fake, tree, key)
    node.tokens = {
        "full": issue_token(key, ALL_GROUPS, user="alice"),
        "gpu-read": issue_token(key, "gpu-read", user="bob"),
        "foreign": issue_token(other, ALL_GROUPS, user="mallory"),
    }
    yield node
    for client in node.clients.values():
        client.close()
    for daemon in node.daemons.values():
        terminate(daemon)


def env_for(daemon: Daemon, token: str | None) -> dict[str, Any]:
    """The driver's ``env`` command pointing zeus's ZeusdConfig.from_env at ``daemon``."""
    values: dict[str, str] = {}
    if daemon.transport.kind == "unix":
        values["ZEUSD_SOCK_PATH"] = str(daemon.transport.address)
        unset = ["ZEUSD_HOST_PORT"]
    else:
        values["ZEUSD_HOST_PORT"] = f"127.0.0.1:{daemon.transport.address}"
        unset = ["ZEUSD_SOCK_PATH"]
    if token is not None:
        values["ZEUSD_TOKEN"] = token
    else:
        unset.append("ZEUSD_TOKEN")
    return {"set": values, "unset": unset}


def server_config(daemon: Daemon, **extra: Any) -> dict[str, Any]:
    if daemon.transport.kind == "unix":
        return {"kind": "uds", "path": str(daemon.transport.address), **extra}
    return {"kind": "tcp", "host": "127.0.0.1", "port": int(daemon.transport.address), **extra}


def endpoint(daemon: Daemon) -> str:
    return str(daemon.transport.address) if daemon.transport.kind == "unix" else f"127.0.0.1:{daemon.transport.address}"


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    return wait_until(condition, what, timeout=30.0)


@dataclass
class Setup:
    """One generation's client process connected (through ZEUSD_* variables) to one daemon."""

    gen: str
    zeus: ZeusProcess
    daemon: Daemon
    daemon_nvml: FakeNvml
    auth: bool
    info: dict[str, Any]


@pytest.fixture(params=list(GENERATIONS))
def gen(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[("unix", False), ("tcp", False), ("unix", True), ("tcp", True)], ids=["uds", "tcp", "uds-auth", "tcp-auth"])
def setup(request: pytest.FixtureRequest, node: Node, gen: str) -> Setup:
    transport, auth = request.param
    zeus = node.client(gen)
    daemon = node.daemon(STREAM_FORMAT[gen], transport, auth)
    zeus.run("env", **env_for(daemon, node.tokens["full"] if auth else None))
    info = zeus.run("client", config={"kind": "env"})
    return Setup(gen, zeus, daemon, node.daemon_nvml[(STREAM_FORMAT[gen], transport, auth)], auth, info)


# --------------------------------------------------------------------------- ZeusdClient


def test_discovery_and_capabilities(setup: Setup, node: Node) -> None:
    info = setup.info
    assert info["gpu_ids"] == [0, 1]
    assert info["cpu_ids"] == [0, 1]
    assert info["dram_available"] == [True, False]
    assert {"gpu-control", "gpu-read", "cpu-read"} <= set(info["enabled_api_groups"])
    assert info["auth_required"] is setup.auth
    assert info["auth_error"] is None
    assert info["granted_scopes"] == (["cpu-read", "gpu-control", "gpu-read"] if setup.auth else [])
    assert info["can_read_gpu"] and info["can_control_gpu"] and info["can_read_cpu"]
    if setup.gen == "0.16":
        assert info["gpus"] == [{"id": i, "name": node.fake.gpu(i).name} for i in range(2)]
        assert info["cpus"] == [{"id": 0, "dram_available": True}, {"id": 1, "dram_available": False}]
    assert setup.zeus.run("require", kwargs={"read_gpu": True, "control_gpu": True, "read_cpu": True, "gpu_ids": [0, 1], "cpu_ids": [0, 1]})
    missing = setup.zeus.fails("require", kwargs={"read_gpu": True, "gpu_ids": [0, 7]})
    assert missing["type"] == "ZeusdCapabilityError" and "[7]" in missing["message"]


def test_reads(setup: Setup, node: Node) -> None:
    z, fake, tree = setup.zeus, node.fake, node.tree
    assert z.call("get_gpu_energy", [0, 1]) == {str(i): fake.gpu(i).energy_mj for i in range(2)}
    assert z.call("get_gpu_energy", [1]) == {"1": fake.gpu(1).energy_mj}

    before = time.time() * 1000
    power = z.call("get_gpu_power")
    assert power["power_mw"] == {str(i): fake.gpu(i).power_mw for i in range(2)}
    assert before - 5000 <= power["timestamp_ms"] <= time.time() * 1000 + 5000
    assert z.call("get_gpu_power", [1])["power_mw"] == {"1": fake.gpu(1).power_mw}

    assert z.call("get_cpu_energy", [0, 1]) == {
        "0": {"cpu_energy_uj": tree.energy(0), "dram_energy_uj": tree.energy(0, dram=True)},
        "1": {"cpu_energy_uj": tree.energy(1), "dram_energy_uj": None},
    }
    only_dram = z.call("get_cpu_energy", [0], cpu=False, dram=True)
    assert only_dram["0"]["dram_energy_uj"] == tree.energy(0, dram=True)
    assert only_dram["0"]["cpu_energy_uj"] is None

    cpu_power = z.call("get_cpu_power")
    # The tree's counters stand still, so the measured power is exactly zero; DRAM only where present.
    assert {k: (v["cpu_mw"], v["dram_mw"]) for k, v in cpu_power["power_mw"].items()} == {"0": (0, 0), "1": (0, None)}
    assert z.call("get_cpu_power", [1])["power_mw"] == {"1": {"cpu_mw": 0, "dram_mw": None}}

    assert abs(z.call("get_time") - time.time()) < 5

    if setup.gen == "0.16":
        assert z.call("get_power_limit") == {str(i): fake.gpu(i).power_limit_mw for i in range(2)}
        assert z.call("get_power_limit_constraints", [1]) == {
            "1": [fake.gpu(1).min_power_limit_mw, fake.gpu(1).max_power_limit_mw]
        }
        assert z.call("get_persistence_mode") == {str(i): fake.gpu(i).persistence_mode for i in range(2)}
        # 0.16 omits cpu_ids when none are given: all packages.
        assert set(z.call("get_cpu_energy")) == {"0", "1"}
    else:
        for method in ("get_power_limit", "get_power_limit_constraints", "get_persistence_mode"):
            assert z.fails("call", method=method)["type"] == "AttributeError"  # not in 0.15.1


def test_counters_move(setup: Setup, node: Node) -> None:
    """Reads are live: a changed counter is seen on the next request."""
    z = setup.zeus
    energy = node.fake.gpu(1).energy_mj + fresh(10_000)
    node.fake.set_gpu(1, energy_mj=energy)
    rapl = node.tree.energy(1) + fresh(30_000)  # RAPL counters only grow (a drop reads as a wraparound)
    node.tree.set_energy(1, rapl)
    assert z.call("get_gpu_energy", [1]) == {"1": energy}
    assert z.call("get_cpu_energy", [1])["1"]["cpu_energy_uj"] == rapl


def test_writes_change_the_device(setup: Setup, node: Node) -> None:
    z, fake = setup.zeus, node.fake
    limit = fresh(250_000, unlike={fake.gpu(1).power_limit_mw})
    z.call("set_power_limit", [1], limit)
    assert fake.gpu(1).power_limit_mw == limit
    other = fresh(300_000, 500, unlike={fake.gpu(0).power_limit_mw, limit})
    z.call("set_power_limit", [0, 1], other, block=False)  # answered before NVML is called
    wait_for(lambda: fake.gpu(0).power_limit_mw == other and fake.gpu(1).power_limit_mw == other, "non-blocking limit")

    enabled = not fake.gpu(0).persistence_mode
    z.call("set_persistence_mode", [0], enabled)
    assert fake.gpu(0).persistence_mode is enabled
    if setup.gen == "0.16":
        assert z.call("get_persistence_mode", [0]) == {"0": enabled}
    z.call("set_persistence_mode", [0], not enabled)
    assert fake.gpu(0).persistence_mode is (not enabled)

    assert fake.gpu(0).gpu_locked_clocks is None and fake.gpu(1).mem_locked_clocks is None  # so a lock is a change
    low = fresh(900, 10)
    z.call("set_gpu_locked_clocks", [0], low, low + 500)
    assert fake.gpu(0).gpu_locked_clocks == (low, low + 500)
    z.call("reset_gpu_locked_clocks", [0])
    assert fake.gpu(0).gpu_locked_clocks is None

    z.call("set_mem_locked_clocks", [1], low, low + 100)
    assert fake.gpu(1).mem_locked_clocks == (low, low + 100)
    z.call("reset_mem_locked_clocks", [1])
    assert fake.gpu(1).mem_locked_clocks is None

    # The writes reached NVML in the daemon, through its own stand-in library.
    names = {c.name for c in setup.daemon_nvml.calls()}
    assert {
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceSetPersistenceMode",
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceSetMemoryLockedClocks",
        "nvmlDeviceResetMemoryLockedClocks",
    } <= names


def test_errors_surface_as_zeusd_error(setup: Setup, node: Node) -> None:
    z = setup.zeus
    before = node.fake.gpu(0).power_limit_mw
    top = node.fake.gpu(0).max_power_limit_mw
    too_high = z.fails("call", method="set_power_limit", args=[[0], top + 1])
    assert too_high["type"] == "ZeusdError" and "set_power_limit" in too_high["message"]
    assert "power_limit_mw must be within" in too_high["message"] and f"got {top + 1}" in too_high["message"]  # 400
    assert node.fake.gpu(0).power_limit_mw == before
    unknown = z.fails("call", method="get_gpu_energy", args=[[9]])
    assert unknown["type"] == "ZeusdError" and unknown["message"].endswith('{"error":"GPU index 9 does not exist."}')  # 400
    unknown_cpu = z.fails("call", method="get_cpu_energy", args=[[9]])
    assert unknown_cpu["type"] == "ZeusdError" and unknown_cpu["message"].endswith('{"error":"CPU index 9 does not exist."}')  # 400


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_auth_scopes_and_bad_tokens(node: Node, gen: str, transport: str) -> None:
    z = node.client(gen)
    daemon = node.daemon(STREAM_FORMAT[gen], transport, True)

    z.run("env", **env_for(daemon, node.tokens["gpu-read"]))
    info = z.run("client", config={"kind": "env"})
    assert info["auth_required"] and info["auth_error"] is None
    assert info["granted_scopes"] == ["gpu-read"]
    assert (info["can_read_gpu"], info["can_control_gpu"], info["can_read_cpu"]) == (True, False, False)
    assert z.call("get_gpu_power")["power_mw"] == {str(i): node.fake.gpu(i).power_mw for i in range(2)}
    before = node.fake.gpu(0).power_limit_mw
    denied = z.fails("call", method="set_power_limit", args=[[0], fresh(210_000, unlike={before})])
    assert denied["type"] == "ZeusdError" and "'gpu-control'" in denied["message"]  # 403, naming the scope
    assert node.fake.gpu(0).power_limit_mw == before
    no_cpu = z.fails("call", method="get_cpu_energy", args=[[0]])
    assert no_cpu["type"] == "ZeusdError" and "'cpu-read'" in no_cpu["message"]  # 403
    lacking = z.fails("require", kwargs={"control_gpu": True})
    assert lacking["type"] == "ZeusdCapabilityError" and "gpu-control" in lacking["message"]
    # ZeusdNVIDIAGPU needs gpu-control too: GPU discovery refuses the token.
    refused = z.fails("gpus")
    assert refused["type"] == "ZeusGPUInitError" and "gpu-control" in refused["message"]

    z.run("env", **env_for(daemon, None))
    info = z.run("client", config={"kind": "env"})
    assert info["auth_required"] and "no token" in info["auth_error"]
    assert not (info["can_read_gpu"] or info["can_control_gpu"] or info["can_read_cpu"])
    assert z.fails("require", kwargs={"read_gpu": True})["type"] == "ZeusdAuthError"
    unauthenticated = z.fails("call", method="get_gpu_power")
    assert unauthenticated["type"] == "ZeusdError" and AUTH_REQUIRED_MESSAGE in unauthenticated["message"]  # 401

    z.run("env", **env_for(daemon, node.tokens["foreign"]))
    info = z.run("client", config={"kind": "env"})
    assert info["auth_error"].startswith("Token rejected")
    assert info["granted_scopes"] == []

    # The token also works passed in the config instead of ZEUSD_TOKEN.
    info = z.run("client", config=server_config(daemon, token=node.tokens["full"]))
    assert info["auth_error"] is None and info["can_control_gpu"]


# --------------------------------------------------------------------------- GPU and CPU objects


def test_gpu_objects_relay_privileged_calls(setup: Setup, node: Node) -> None:
    z, fake = setup.zeus, node.fake
    client_nvml = node.client_nvml(setup.gen)
    gpus = z.run("gpus")
    assert gpus["classes"] == ["ZeusdNVIDIAGPU", "ZeusdNVIDIAGPU"]
    assert gpus["names"] == [fake.gpu(i).name for i in range(2)]
    daemon_sets_before = setup.daemon_nvml.count("nvmlDeviceSetPowerManagementLimit")

    # Local reads through the client's own pynvml (the stand-in).
    assert z.run("gpu", index=0, method="get_power_management_limit") == fake.gpu(0).power_limit_mw
    assert z.run("gpu", index=1, method="get_total_energy_consumption") == fake.gpu(1).energy_mj
    assert z.run("gpu", index=1, method="get_instant_power_usage") == fake.gpu(1).power_mw
    assert z.run("gpu", index=0, method="supports_nonblocking_setters") is True

    limit = fresh(220_000, unlike={fake.gpu(0).power_limit_mw, fake.gpu(0).default_power_limit_mw})
    z.run("gpu", index=0, method="set_power_management_limit", args=[limit])
    assert fake.gpu(0).power_limit_mw == limit
    z.run("gpu", index=0, method="reset_power_management_limit")
    assert fake.gpu(0).power_limit_mw == fake.gpu(0).default_power_limit_mw
    limit = fresh(230_000, unlike={fake.gpu(1).power_limit_mw})
    z.run("gpu", index=1, method="set_power_management_limit", args=[limit], kwargs={"block": False})
    wait_for(lambda: fake.gpu(1).power_limit_mw == limit, "non-blocking limit via ZeusdNVIDIAGPU")
    assert setup.daemon_nvml.count("nvmlDeviceSetPowerManagementLimit") >= daemon_sets_before + 3

    enabled = not fake.gpu(1).persistence_mode
    z.run("gpu", index=1, method="set_persistence_mode", args=[enabled])
    assert fake.gpu(1).persistence_mode is enabled
    if setup.gen == "0.16":
        assert z.run("gpu", index=1, method="get_persistence_mode") is enabled

    assert fake.gpu(1).gpu_locked_clocks is None and fake.gpu(0).mem_locked_clocks is None  # so a lock is a change
    low = fresh(1000, 10)
    z.run("gpu", index=1, method="set_gpu_locked_clocks", args=[low, low + 200])
    assert fake.gpu(1).gpu_locked_clocks == (low, low + 200)
    z.run("gpu", index=1, method="reset_gpu_locked_clocks")
    assert fake.gpu(1).gpu_locked_clocks is None
    z.run("gpu", index=0, method="set_memory_locked_clocks", args=[low, low + 50])
    assert fake.gpu(0).mem_locked_clocks == (low, low + 50)
    z.run("gpu", index=0, method="reset_memory_locked_clocks")
    assert fake.gpu(0).mem_locked_clocks is None

    # Nothing privileged was called by the client process itself.
    assert not [c for c in client_nvml.calls() if c.name.startswith(("nvmlDeviceSet", "nvmlDeviceReset"))]


def test_rapl_cpus_read_through_the_daemon(setup: Setup, node: Node) -> None:
    z, tree = setup.zeus, node.tree
    cpus = z.run("cpus", rapl_dir=str(tree.base))
    assert cpus == {"classes": ["ZeusdRAPLCPU", "ZeusdRAPLCPU"], "indices": [0, 1], "dram": [True, False]}
    for index in (0, 1):
        tree.set_energy(index, tree.energy(index) + fresh(40_000, 7))
    tree.set_energy(0, tree.energy(0, dram=True) + fresh(900, 3), dram=True)
    first = z.run("cpu", index=0, method="get_total_energy_consumption")
    assert first == {"cpu_mj": tree.energy(0) / 1000, "dram_mj": tree.energy(0, dram=True) / 1000}
    second = z.run("cpu", index=1, method="get_total_energy_consumption")
    assert second == {"cpu_mj": tree.energy(1) / 1000, "dram_mj": None}
    tree.set_energy(0, tree.energy(0) + 2_500)
    assert z.run("cpu", index=0, method="get_total_energy_consumption")["cpu_mj"] == first["cpu_mj"] + 2.5


# --------------------------------------------------------------------------- PowerStreamingClient


def gpu_watts(fake: FakeNvml) -> dict[str, float]:
    return {str(i): fake.gpu(i).power_mw / 1000 for i in range(fake.num_gpus)}


def test_power_streaming_two_daemons(node: Node, gen: str) -> None:
    z, fake = node.client(gen), node.fake
    fmt = STREAM_FORMAT[gen]
    a, b = node.daemon(fmt, "unix", False), node.daemon(fmt, "tcp", False)
    ea, eb = endpoint(a), endpoint(b)
    started = z.run("stream_start", name="two", servers=[server_config(a), server_config(b)], reconnect_delay_s=0.2)
    assert started["endpoints"] == [ea, eb]
    assert len(started["threads"]) == 4  # GPU and CPU, per daemon
    for offset in started["clock_offsets"].values():
        assert abs(offset) < 2  # same machine, same clock: the /time handshake found ~0

    def readings(want: dict[str, float]) -> Any:
        power = z.run("stream_power", name="two")
        r = power["readings"]
        if all(e in r and r[e]["gpu_power_w"] == want and set(r[e]["cpu_power_w"]) == {"0", "1"} for e in (ea, eb)):
            return power
        return None

    try:
        power = wait_for(lambda: readings(gpu_watts(fake)), "both daemons streaming")
        for e in (ea, eb):
            cpu = power["readings"][e]["cpu_power_w"]
            assert cpu["1"]["dram_w"] is None and cpu["0"]["dram_w"] is not None
            assert power["now"] - 30 < power["readings"][e]["timestamp_s"] < power["now"] + 5
        assert len(power["alive"]) == 4

        # Live: a new GPU power shows up through both streams.
        new = fresh(120_000, 7, unlike={fake.gpu(0).power_mw})
        fake.set_gpu(0, power_mw=new)
        wait_for(lambda: readings(gpu_watts(fake)), "the new power value")

        # The blocking iterator yields snapshots of both endpoints.
        snapshots = z.run("stream_iter", name="two", count=5, timeout=30)
        assert len(snapshots) == 5
        assert all(set(s) == {ea, eb} for s in snapshots)
        stamps = [s[ea]["timestamp_s"] for s in snapshots]
        assert stamps == sorted(stamps)

        # Restart one daemon on the same socket (0.15) or port (0.16): the client reconnects by itself.
        restarted = a if gen == "0.15" else b
        base = "http://localhost" if restarted is a else f"http://{eb}"
        z.run("logs")
        assert restarted.stop() == 0
        restarted.start()
        fake.set_gpu(1, power_mw=fresh(80_000, 11, unlike={fake.gpu(1).power_mw}))
        wait_for(lambda: readings(gpu_watts(fake)), "the restarted daemon's readings")
        power = z.run("stream_power", name="two")
        assert len(power["alive"]) == 4
        # The restarted daemon's GPU and CPU streams connect anew; the other's were never interrupted.
        want = {f"{base}/gpu/stream_power", f"{base}/cpu/stream_power"}

        def reconnected() -> set[str]:
            records = z.run("logs", clear=False)["records"]
            return {r["message"].split()[-1] for r in records if r["message"].startswith("SSE connected to")}

        wait_for(lambda: reconnected() == want, "both streams of the restarted daemon to reconnect")
        fake.set_gpu(0, power_mw=fresh(60_000, 13, unlike={fake.gpu(0).power_mw}))
        wait_for(lambda: readings(gpu_watts(fake)), "readings after the reconnection")
        assert len(z.run("stream_power", name="two")["alive"]) == 4
        assert not z.run("logs")["thread_errors"]
    finally:
        z.run("stream_stop", name="two")


def test_power_streaming_filters_and_auth(node: Node, gen: str) -> None:
    z, fake = node.client(gen), node.fake
    fmt = STREAM_FORMAT[gen]
    open_uds, secured = node.daemon(fmt, "unix", False), node.daemon(fmt, "tcp", True)
    eu, es = endpoint(open_uds), endpoint(secured)
    started = z.run(
        "stream_start",
        name="filtered",
        servers=[
            server_config(open_uds, gpu_indices=[1], cpu_indices=[]),
            # gpu-read only: the CPU stream is skipped silently (indices not explicit).
            server_config(secured, token=node.tokens["gpu-read"], gpu_indices=[0]),
        ],
        reconnect_delay_s=0.2,
    )
    assert set(started["threads"]) == {f"gpu-power-stream-{es}", f"gpu-power-stream-{eu}"}
    try:
        def seen() -> Any:
            r = z.run("stream_power", name="filtered")["readings"]
            return r if eu in r and es in r and r[eu]["gpu_power_w"] and r[es]["gpu_power_w"] else None

        wait_for(seen, "filtered streams")
        for snapshot in z.run("stream_iter", name="filtered", count=4, timeout=30):
            assert snapshot[eu]["gpu_power_w"] == {"1": fake.gpu(1).power_mw / 1000}
            assert snapshot[es]["gpu_power_w"] == {"0": fake.gpu(0).power_mw / 1000}
            assert snapshot[eu]["cpu_power_w"] == {} and snapshot[es]["cpu_power_w"] == {}
    finally:
        z.run("stream_stop", name="filtered")

    cpu_only = z.run("stream_start", name="cpu", servers=[server_config(open_uds, gpu_indices=[], cpu_indices=[1])])
    assert cpu_only["threads"] == [f"cpu-power-stream-{eu}"]
    try:
        r = wait_for(lambda: z.run("stream_power", name="cpu")["readings"].get(eu), "CPU-only stream")
        assert r["cpu_power_w"] == {"1": {"cpu_w": 0.0, "dram_w": None}} and r["gpu_power_w"] == {}
    finally:
        z.run("stream_stop", name="cpu")

    unknown = z.fails("stream_start", name="x", servers=[server_config(open_uds, gpu_indices=[7])])
    assert unknown["type"] == "ValueError"
    no_scope = z.fails("stream_start", name="x", servers=[server_config(secured, token=node.tokens["gpu-read"], cpu_indices=[0])])
    assert no_scope["type"] == "ZeusdCapabilityError"
    assert not z.run("logs")["thread_errors"]


def test_stream_format_mismatch_is_the_documented_difference(node: Node, gen: str) -> None:
    """Neither client negotiates: the other generation's --stream-format breaks GPU streaming
    as the spec (13.3) says; docs/compatibility.md tells operators which flag to use."""
    z = node.client(gen)
    other = "v0.5" if STREAM_FORMAT[gen] == "v0.4" else "v0.4"
    daemon = node.daemon(other, "unix", False)
    e = endpoint(daemon)
    z.run("logs")
    z.run("stream_start", name="mismatch", servers=[server_config(daemon)], reconnect_delay_s=0.2)
    try:
        if gen == "0.15":
            # Per-device GPU events kill 0.15.1's GPU thread; the hybrid CPU events still work.
            errors = wait_for(lambda: z.run("logs", clear=False)["thread_errors"], "the GPU thread to die")
            assert errors[0]["type"] == "AttributeError" and errors[0]["thread"] == f"gpu-power-stream-{e}"
            r = wait_for(lambda: z.run("stream_power", name="mismatch")["readings"].get(e), "CPU readings")
            assert set(r["cpu_power_w"]) == {"0", "1"} and r["gpu_power_w"] == {}
        else:
            # 0.16.0 skips v0.4 snapshot events with a warning: no readings, no crash.
            wait_for(
                lambda: any("Malformed GPU SSE event" in x["message"] for x in z.run("logs", clear=False)["records"]),
                "the malformed-event warning",
            )
            wait_for(
                lambda: any("Malformed CPU SSE event" in x["message"] for x in z.run("logs", clear=False)["records"]),
                "the malformed-event warning for CPUs",
            )
            power = z.run("stream_power", name="mismatch")
            assert power["readings"].get(e, {}).get("gpu_power_w", {}) == {}
            assert power["readings"].get(e, {}).get("cpu_power_w", {}) == {}
            assert len(power["alive"]) == 2
    finally:
        z.run("stream_stop", name="mismatch")
        z.run("logs")


# --------------------------------------------------------------------------- ZeusMonitor


def test_zeus_monitor_window(setup: Setup, node: Node) -> None:
    """ZeusMonitor with a daemon configured: GPU energy locally, CPU and DRAM energy via the daemon."""
    z, fake, tree = setup.zeus, node.fake, node.tree
    begun = z.run("monitor_begin", rapl_dir=str(tree.base), gpu_indices=[0, 1], cpu_indices=[0, 1])
    assert begun == {"gpus": ["ZeusdNVIDIAGPU", "ZeusdNVIDIAGPU"], "cpus": ["ZeusdRAPLCPU", "ZeusdRAPLCPU"]}
    fake.set_gpu(0, energy_mj=fake.gpu(0).energy_mj + 12_345)
    tree.set_energy(0, tree.energy(0) + 2_000_000)
    tree.set_energy(0, tree.energy(0, dram=True) + 250_000, dram=True)
    tree.set_energy(1, tree.energy(1) + 4_000_000)
    measured = z.run("monitor_end")
    assert measured["gpu_energy"] == {"0": pytest.approx(12.345), "1": 0.0}
    assert measured["cpu_energy"] == {"0": pytest.approx(2.0), "1": pytest.approx(4.0)}
    assert measured["dram_energy"] == {"0": pytest.approx(0.25)}
