"""zeusd.client against real daemons over real UNIX sockets, TCP ports and HTTPS.

The async tests run on the Twisted reactor through pytest-twisted
(``@pytest_twisted.ensureDeferred``); every wait is bounded by ``within`` so
a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.client_helpers import address, within
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, Transport, free_tcp_port, self_signed_cert, terminate, write_signing_key
from zeusd.auth import issue_token
from zeusd.client import (
    CpuEnergy,
    CpuPackagePower,
    DevicePower,
    GpuEnergy,
    MultiPowerStream,
    PersistenceMode,
    PowerLimit,
    PowerLimitConstraints,
    PowerReading,
    ZeusdAuthError,
    ZeusdClient,
    ZeusdConnectionError,
    ZeusdHTTPError,
)


MIN_LIMIT_MW = 200_000  # the simulated GPU's lowest limit: its power then sits exactly on it


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)



def write_key(directory: Path) -> tuple[str, bytes]:
    path = directory / "zeusd.key"
    return str(path), write_signing_key(path)  # the daemon signs with exactly these raw bytes


# --------------------------------------------------------------------------- typed calls


@pytest_twisted.ensureDeferred
async def test_every_read_is_typed_and_matches_the_wire(sim_daemon: Daemon) -> None:
    raw = sim_daemon.client
    async with ZeusdClient(address(sim_daemon), token="") as client:
        d = await within(10, client.discover())
        wire = raw.get("/discover").json()
        assert d.gpu_ids == wire["gpu_ids"] == [0, 1, 2, 3]
        assert d.cpu_ids == wire["cpu_ids"] and d.dram_available == wire["dram_available"] == [True, False]
        assert [g.name for g in d.gpus] == [g["name"] for g in wire["gpus"]]
        assert [g.pci_address for g in d.gpus] == [g["pci_address"] for g in wire["gpus"]]
        assert list(d.enabled_api_groups) == wire["enabled_api_groups"] and d.auth_required is False
        assert client.discovery == d

        before = time.time()
        now_ms = await within(10, client.get_time_ms())
        assert before - 1 <= now_ms / 1000 <= time.time() + 1
        offset = await within(10, client.clock_offset(5))
        assert len(offset.samples) == 5 and abs(offset.offset_s) < 0.5 and 0 < offset.round_trip_s < 2

        power = await within(10, client.get_gpu_power())
        assert sorted(power.power_mw) == [0, 1, 2, 3] and power.errors == {}
        assert all(isinstance(v, int) and 70_000 <= v <= 700_000 for v in power.power_mw.values())
        assert power.watts[0] == power.power_mw[0] / 1000
        assert sorted((await within(10, client.get_gpu_power([2, 0]))).power_mw) == [0, 2]
        assert (await within(10, client.get_gpu_power([]))).power_mw == {}

        cpu = await within(10, client.get_cpu_power())
        assert sorted(cpu.power_mw) == [0, 1]
        assert isinstance(cpu.power_mw[0], CpuPackagePower) and cpu.power_mw[0].dram_mw is not None
        assert cpu.power_mw[1].dram_mw is None and cpu.power_mw[1].cpu_mw > 0
        assert list((await within(10, client.get_cpu_power(1))).power_mw) == [1]

        first = await within(10, client.get_gpu_energy(0))
        await sleep(0.2)
        second = await within(10, client.get_gpu_energy())
        assert list(first) == [0] and sorted(second) == [0, 1, 2, 3]
        assert isinstance(second[0], GpuEnergy) and second[0].energy_mj > first[0].energy_mj

        energy = await within(10, client.get_cpu_energy([0, 1]))
        assert isinstance(energy[0], CpuEnergy) and energy[0].cpu_energy_uj and energy[0].dram_energy_uj
        assert energy[1].dram_energy_uj is None
        assert await within(10, client.get_cpu_energy(0, cpu=False, dram=False)) == {0: CpuEnergy(None, None)}
        assert sorted(await within(10, client.get_cpu_energy(cpu=True, dram=False))) == [0, 1]

        limits = await within(10, client.get_power_limit())
        assert limits == {int(k): PowerLimit(v["power_limit_mw"]) for k, v in raw.get("/gpu/get_power_limit").json().items()}
        assert await within(10, client.get_power_limit_constraints(1)) == {1: PowerLimitConstraints(200_000, 700_000)}
        modes = await within(10, client.get_persistence_mode([0, 3]))
        wire_modes = raw.get("/gpu/get_persistence_mode?gpu_ids=0,3").json()
        assert modes == {int(k): PersistenceMode(v["enabled"]) for k, v in wire_modes.items()}


@pytest_twisted.ensureDeferred
async def test_every_control_call_takes_effect(start_daemon: DaemonFactory, transport_kind: str) -> None:
    daemon = start_daemon("--simulate", transport=transport_kind)
    async with ZeusdClient(address(daemon)) as client:
        await within(10, client.set_power_limit([0, 1], 250_000))
        assert await within(10, client.get_power_limit()) == {
            0: PowerLimit(250_000), 1: PowerLimit(250_000), 2: PowerLimit(700_000), 3: PowerLimit(700_000)
        }
        # Non-blocking: answered once queued; a later blocking read on that GPU runs after it.
        await within(10, client.set_power_limit(2, MIN_LIMIT_MW, block=False))
        assert (await within(10, client.get_power_limit(2)))[2].power_limit_mw == MIN_LIMIT_MW
        assert (await within(10, client.get_gpu_power(2))).power_mw[2] == MIN_LIMIT_MW

        await within(10, client.set_persistence_mode([1, 3], True))
        assert {i: m.enabled for i, m in (await within(10, client.get_persistence_mode())).items()} == {
            0: False, 1: True, 2: False, 3: True
        }
        await within(10, client.set_persistence_mode(3, False, block=True))
        assert (await within(10, client.get_persistence_mode(3)))[3].enabled is False

        # Locking the GPU clock at its floor drops power to near idle; resetting restores it.
        await within(10, client.set_power_limit(0, 700_000))
        await within(10, client.set_gpu_locked_clocks(0, 210, 210))
        assert (await within(10, client.get_gpu_power(0))).power_mw[0] < 100_000
        await within(10, client.reset_gpu_locked_clocks(0))
        assert (await within(10, client.get_gpu_power(0))).power_mw[0] > 200_000
        await within(10, client.set_gpu_locked_clocks(0, 210, 210))
        await within(10, client.set_mem_locked_clocks(0, 405, 810))
        await within(10, client.reset_mem_locked_clocks(0))
        assert (await within(10, client.get_gpu_power(0))).power_mw[0] < 100_000  # GPU clock still locked
        await within(10, client.set_mem_locked_clocks([0, 1], 405, 810, block=False))
        await within(10, client.reset_locked_clocks(0))  # both clocks at once
        assert (await within(10, client.get_gpu_power(0))).power_mw[0] > 200_000


@pytest_twisted.ensureDeferred
async def test_errors_carry_the_daemons_message_and_status(sim_daemon: Daemon, tmp_path: Path) -> None:
    async with ZeusdClient(address(sim_daemon)) as client:
        with pytest.raises(ZeusdHTTPError) as bad_id:
            await within(10, client.set_power_limit(9, 300_000))
        assert bad_id.value.status == 400 and bad_id.value.message == "GPU index 9 does not exist."
        assert "HTTP 400" in str(bad_id.value)

        with pytest.raises(ZeusdHTTPError) as unknown:
            await within(10, client.get_gpu_power([5, 1]))
        assert unknown.value.status == 400
        assert unknown.value.message == "Unknown GPU indices: [5]. Available: {0, 1, 2, 3}"

        with pytest.raises(ZeusdHTTPError) as device:  # per-device failure: the errors map
            await within(10, client.set_gpu_locked_clocks([0, 1], 100, 150))  # below the device's clocks
        assert device.value.status == 400
        assert device.value.errors == {0: "NVML error: a supplied argument was invalid"} | {
            1: "NVML error: a supplied argument was invalid"
        }

        with pytest.raises(ZeusdHTTPError) as whoami:
            await within(10, client.whoami())
        assert whoami.value.status == 404 and whoami.value.message == "Authentication is not enabled on this server."

        with pytest.raises(ZeusdHTTPError) as stream:
            await within(10, client.stream_gpu_power([7]))
        assert stream.value.status == 400 and "Unknown GPU indices: [7]" in stream.value.message

    async with ZeusdClient(f"unix:{tmp_path / 'nobody-here.sock'}") as gone:
        with pytest.raises(ZeusdConnectionError) as refused:
            await within(10, gone.discover())
        assert refused.value.status is None and "unix:" in str(refused.value)


@pytest_twisted.ensureDeferred
async def test_disabled_group_is_a_404_error(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate", "--enable", "gpu-read")
    async with ZeusdClient(address(daemon)) as client:
        assert (await within(10, client.discover())).enabled_api_groups == ("gpu-read",)
        with pytest.raises(ZeusdHTTPError) as e:
            await within(10, client.set_persistence_mode(0, True))
        assert e.value.status == 404 and e.value.message == "API group 'gpu-control' is not enabled on this server."


@pytest_twisted.ensureDeferred
async def test_tokens_from_argument_and_env(
    start_daemon: DaemonFactory, transport_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_path, key = write_key(tmp_path)
    daemon = start_daemon("--simulate", "--signing-key-path", key_path, transport=transport_kind)
    exp = int(time.time()) + 3600
    reader = issue_token(key, "alice", ["gpu-read", "cpu-read"], exp)
    admin = issue_token(key, "root", ["gpu-control", "gpu-read", "cpu-read"], None)

    monkeypatch.delenv("ZEUSD_TOKEN", raising=False)
    async with ZeusdClient(address(daemon)) as anonymous:
        assert (await within(10, anonymous.discover())).auth_required is True  # never needs a token
        with pytest.raises(ZeusdAuthError) as missing:
            await within(10, anonymous.get_gpu_power())
        assert missing.value.status == 401 and "Authentication required" in missing.value.message

    monkeypatch.setenv("ZEUSD_TOKEN", reader)
    async with ZeusdClient(address(daemon)) as client:
        who = await within(10, client.whoami())
        assert (who.sub, who.scopes, who.exp) == ("alice", ("gpu-read", "cpu-read"), exp)
        assert sorted((await within(10, client.get_gpu_power())).power_mw) == [0, 1, 2, 3]
        with pytest.raises(ZeusdAuthError) as scope:
            await within(10, client.set_power_limit(0, 300_000))
        assert scope.value.status == 403 and "lacks required scope 'gpu-control'" in scope.value.message

    async with ZeusdClient(address(daemon), token=admin) as client:  # the argument wins over the env
        assert (await within(10, client.whoami())).sub == "root"
        await within(10, client.set_power_limit(0, 300_000))
        assert (await within(10, client.get_power_limit(0)))[0].power_limit_mw == 300_000

    async with ZeusdClient(address(daemon), token="not-a-jwt") as client:
        with pytest.raises(ZeusdAuthError) as invalid:
            await within(10, client.stream_cpu_power())
        assert invalid.value.status == 401 and invalid.value.message.startswith("Invalid token")


@pytest.fixture
def https_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    """A simulated daemon on HTTPS with a self-signed certificate (the CA file to trust it)."""
    cert, key = self_signed_cert(tmp_path)
    daemon = Daemon(
        Transport("tcp", free_tcp_port()),
        ["--simulate", "--tls-cert", str(cert), "--tls-key", str(key)],
        {},
        tmp_path / "log",
    )
    daemon.start(wait=False)  # wait_ready speaks plain HTTP; the tests poll over HTTPS
    yield daemon, str(cert)
    terminate(daemon)


async def https_client(daemon: Daemon, ca_file: str | None) -> ZeusdClient:
    client = ZeusdClient(f"https://localhost:{daemon.transport.address}", ca_file=ca_file)
    if ca_file is not None:
        for _ in range(150):
            try:
                await within(10, client.discover())
                break
            except ZeusdConnectionError:
                await sleep(0.1)
        else:
            pytest.fail(f"HTTPS daemon never answered:\n{daemon.log()}")
    return client


@pytest_twisted.ensureDeferred
async def test_https_with_a_private_ca(https_daemon: tuple[Daemon, str]) -> None:
    daemon, ca_file = https_daemon
    async with await https_client(daemon, ca_file) as client:
        assert client.discovery is not None and client.discovery.gpu_ids == [0, 1, 2, 3]
        assert sorted((await within(10, client.get_gpu_power([1, 3]))).power_mw) == [1, 3]
        await within(10, client.set_power_limit(0, 300_000))
        assert (await within(10, client.get_power_limit(0)))[0].power_limit_mw == 300_000
    async with await https_client(daemon, None) as untrusted:  # the system's CAs do not know it
        with pytest.raises(ZeusdConnectionError):
            await within(10, untrusted.discover())


@pytest_twisted.ensureDeferred
async def test_connection_errors_say_what_to_do(
    https_daemon: tuple[Daemon, str], start_daemon: DaemonFactory, tmp_path: Path
) -> None:
    """No raw OpenSSL tuples or Twisted reprs: each failure names the server and the fix."""
    daemon, _ = https_daemon
    plain = start_daemon("--simulate", transport="tcp")
    tls_port, plain_port = daemon.transport.address, plain.transport.address
    await (await https_client(daemon, daemon.args[daemon.args.index("--tls-cert") + 1])).close()  # it serves
    expected = {
        f"https://localhost:{tls_port}": "the server's certificate is not trusted (certificate verify failed); "
        "pass the CA that signed it with --ca-file",
        f"127.0.0.1:{tls_port}": f"if the daemon serves HTTPS, use https://127.0.0.1:{tls_port}",
        # A plain daemon refuses the TLS hello at once (its bytes are no HTTP line), or never answers it.
        f"https://127.0.0.1:{plain_port}": f"use 127.0.0.1:{plain_port} instead of https://",
        f"127.0.0.1:{free_tcp_port()}": "connection refused: is zeusd running",
        f"unix:{tmp_path}/nobody.sock": f"no socket at {tmp_path}/nobody.sock: is zeusd running?",
    }
    for server, advice in expected.items():
        async with ZeusdClient(server, timeout_s=2) as client:
            with pytest.raises(ZeusdConnectionError) as e:
                await within(10, client.discover())
        assert str(e.value).startswith(f"{server}: ") and advice in str(e.value), str(e.value)
        assert "SSL routines" not in str(e.value) and "Failure" not in str(e.value)


@pytest_twisted.ensureDeferred
async def test_https_stream(https_daemon: tuple[Daemon, str]) -> None:
    daemon, ca_file = https_daemon
    async with await https_client(daemon, ca_file) as client:
        stream = await within(10, client.stream_gpu_power(1))
        samples = await within(10, take(stream, 3))
        assert [(s.kind, s.index) for s in samples] == [("gpu", 1)] * 3


# --------------------------------------------------------------------------- streams


async def take(stream: Any, count: int) -> list[Any]:
    out = []
    async for item in stream:
        out.append(item)
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("fmt", ["v0.4", "v0.5"])
@pytest_twisted.ensureDeferred
async def test_streams_parse_both_formats(sim_daemon: Daemon, fmt: str) -> None:
    async with ZeusdClient(address(sim_daemon)) as client:
        gpu = await within(10, client.stream_gpu_power(format=fmt))
        samples = await within(20, take(gpu, 40))
        assert {s.index for s in samples} == {0, 1, 2, 3} and all(s.kind == "gpu" for s in samples)
        assert all(70_000 <= s.power_mw <= 700_000 and s.dram_mw is None for s in samples)
        assert abs(samples[-1].timestamp_ms / 1000 - time.time()) < 5
        # v0.4: one snapshot event carries all four GPUs; v0.5: one event per GPU.
        assert gpu.events * (4 if fmt == "v0.4" else 1) >= len(samples) and gpu.malformed == 0
        gpu.close()
        await within(10, take(gpu, 1_000_000))  # closing ends the iteration (no hang, no error)

        filtered = await within(10, client.stream_gpu_power([2], format=fmt))
        assert {s.index for s in await within(20, take(filtered, 5))} == {2}
        filtered.close()

        cpu = await within(10, client.stream_cpu_power(format=fmt))
        packages = await within(20, take(cpu, 6))
        assert {p.index for p in packages} == {0, 1} and all(p.kind == "cpu" and p.power_mw > 0 for p in packages)
        assert all((p.dram_mw is None) == (p.index == 1) for p in packages)
        # Each CPU event yields each package once, whichever format (no double count of the hybrid event).
        assert len(packages) <= cpu.events * (2 if fmt == "v0.4" else 1)
        got: list[DevicePower] = []

        def collect(sample: DevicePower) -> None:
            got.append(sample)
            if len(got) == 4:
                cpu.close()

        await within(20, cpu.run(collect))  # the callback API
        assert len(got) == 4


@pytest_twisted.ensureDeferred
async def test_stream_of_a_killed_daemon_raises(start_daemon: DaemonFactory, transport_kind: str) -> None:
    daemon = start_daemon("--simulate", transport=transport_kind)
    async with ZeusdClient(address(daemon)) as client:
        stream = await within(10, client.stream_gpu_power())
        assert len(await within(20, take(stream, 3))) == 3
        daemon.stop(signal.SIGKILL)  # gone without closing its streams
        with pytest.raises(ZeusdConnectionError, match="stream lost"):
            await within(20, take(stream, 1_000_000))


# --------------------------------------------------------------------------- many daemons


async def collect_until(multi: MultiPowerStream, done: Callable[[], bool], into: list[PowerReading]) -> None:
    if done():
        return
    async for reading in multi:
        into.append(reading)
        if done():
            return


@pytest_twisted.ensureDeferred
async def test_multi_stream_merges_daemons_and_reconnects_after_a_restart(start_daemon: DaemonFactory) -> None:
    a = start_daemon("--simulate", "--simulate-gpus", "2", "--simulate-cpus", "1")
    b = start_daemon("--simulate", "--simulate-gpus", "1", "--simulate-cpus", "0", transport="tcp")
    c = start_daemon("--simulate", "--simulate-gpus", "1", "--simulate-cpus", "1", "--stream-format", "v0.5")
    la, lb, lc = (address(d).label for d in (a, b, c))
    transitions: list[tuple[str, str, float | None]] = []
    multi = MultiPowerStream(
        [address(a), address(b), address(c)],
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        on_status=lambda s: transitions.append((s.server, s.state, s.retry_in_s)),
    )
    readings: list[PowerReading] = []
    devices = {(la, "gpu", 0), (la, "gpu", 1), (la, "cpu", 0), (lb, "gpu", 0), (lc, "gpu", 0), (lc, "cpu", 0)}
    async with multi:
        await within(30, collect_until(multi, lambda: devices <= {(r.server, r.kind, r.index) for r in readings}, readings))
        assert {(r.server, r.kind, r.index) for r in readings} == devices  # nothing else
        for label in (la, lb, lc):
            status = multi.status[label]
            assert status.state == "streaming" and status.connects == 1
            assert status.offset is not None and len(status.offset.samples) == 5 and abs(status.offset.offset_s) < 0.5
        for r in readings:
            offset = multi.status[r.server].offset
            assert offset is not None
            assert r.timestamp == pytest.approx(r.daemon_timestamp_ms / 1000 + offset.offset_s)
            assert abs(r.timestamp - time.time()) < 10
            assert r.kind == "gpu" or r.dram_watts is not None  # simulated package 0 has DRAM
        assert multi.status[lb].kinds == ("gpu",)  # b has no CPU package: no CPU stream

        # Restart daemon a on the same socket; b and c keep streaming meanwhile.
        a.stop()
        killed_at = time.time()
        readings.clear()
        await within(
            30,
            collect_until(
                multi,
                lambda: sum(1 for s, st, _ in transitions if s == la and st == "backoff") >= 4
                and sum(1 for r in readings if r.server == lb) >= 10,
                readings,
            ),
        )
        assert multi.status[la].state in ("backoff", "connecting") and multi.status[la].error
        assert not any(key[0] == la for key in multi.latest)  # a's readings are not shown as current
        delays = [d for s, st, d in transitions if s == la and st == "backoff"]
        assert delays == [0.2, 0.4, 0.8] + [1.0] * (len(delays) - 3)  # doubling, capped
        assert not any(r.server == la and r.daemon_timestamp_ms / 1000 > killed_at + 1 for r in readings)

        a.start(wait=False)
        restarted_at = time.time()
        readings.clear()
        fresh = {(la, "gpu", 0), (la, "gpu", 1), (la, "cpu", 0)}
        await within(
            60,
            collect_until(
                multi,
                lambda: fresh <= {(r.server, r.kind, r.index) for r in readings if r.timestamp > restarted_at},
                readings,
            ),
        )
        assert multi.status[la].state == "streaming" and multi.status[la].connects == 2
        assert multi.status[lb].connects == 1 and multi.status[lc].connects == 1
    assert all(s.state == "stopped" for s in multi.status.values())


@pytest_twisted.ensureDeferred
async def test_clock_offset_corrects_a_daemon_whose_clock_is_off(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    # A node whose wall clock runs an hour behind ours: the daemon reads time through a shifted clock.
    site = tmp_path / "skewed"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import time\n"
        "_time, _time_ns = time.time, time.time_ns\n"
        "time.time = lambda: _time() - 3600.0\n"
        "time.time_ns = lambda: _time_ns() - 3_600_000_000_000\n"
    )
    skewed = start_daemon("--simulate", "--simulate-gpus", "1", env={"PYTHONPATH": str(site)})
    normal = start_daemon("--simulate", "--simulate-gpus", "1", transport="tcp")
    async with ZeusdClient(address(skewed)) as client:
        offset = await within(10, client.clock_offset())
    assert offset.offset_s == pytest.approx(3600, abs=1)

    readings: list[PowerReading] = []
    async with MultiPowerStream([address(skewed), address(normal)], kinds=["gpu"]) as multi:
        await within(
            30,
            collect_until(multi, lambda: len({r.server for r in readings[-20:]}) == 2 and len(readings) > 20, readings),
        )
    for r in readings[-20:]:
        assert abs(r.timestamp - time.time()) < 10, r  # both on our clock after correction
    raw_skewed = [r.daemon_timestamp_ms / 1000 for r in readings if r.server == address(skewed).label]
    assert raw_skewed and all(abs(t + 3600 - time.time()) < 10 for t in raw_skewed)


@pytest_twisted.ensureDeferred
async def test_multi_stream_streams_only_what_the_token_allows(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    key_path, key = write_key(tmp_path)
    daemon = start_daemon("--simulate", "--signing-key-path", key_path, transport="tcp")
    gpu_only = issue_token(key, "bob", ["gpu-read"], None)
    readings: list[PowerReading] = []
    async with MultiPowerStream([address(daemon)], token=gpu_only) as multi:
        await within(30, collect_until(multi, lambda: len(readings) >= 30, readings))
        assert multi.status[address(daemon).label].kinds == ("gpu",)
    assert {r.kind for r in readings} == {"gpu"}

    async with MultiPowerStream([address(daemon)], token="") as anonymous:  # no token: a permanent failure
        label = address(daemon).label
        for _ in range(100):
            if anonymous.status[label].state == "failed":
                break
            await sleep(0.1)
        assert anonymous.status[label].state == "failed" and "token" in (anonymous.status[label].error or "")
