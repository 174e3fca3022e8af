"""zeusd.client driven in memory (treq.testing.StubTreq) against the daemon's real resource tree.

Time is a ``MemoryReactorClock``: stream ticks, timeouts and reconnection
delays happen exactly when a test advances the clock (tests/inmemory.py).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import treq
from twisted.internet.defer import ensureDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.inmemory import Node, simulated_node
from zeusd.auth import issue_token
from zeusd.client import (
    CpuEnergy,
    DevicePower,
    MultiPowerStream,
    PersistenceMode,
    PowerLimit,
    PowerLimitConstraints,
    PowerReading,
    ServerStatus,
    ZeusdAuthError,
    ZeusdConnectionError,
    ZeusdHTTPError,
)

KEY = b"in-memory-signing-key-of-32-bytes-or-more\n"
GPU_PERIOD = 1 / 20  # the default --gpu-power-poll-hz


@pytest.fixture
def node() -> Iterator[Node]:
    node = simulated_node()
    yield node
    node.close()


def wire(node: Node, path: str, token: str | None = None) -> tuple[int, dict[str, str], Any]:
    """The raw answer, read with treq itself: status, headers, parsed JSON body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = node.resolve(node.http.request("GET", f"http://node.test:4938{path}", headers=headers))
    body = node.resolve(treq.content(response))
    flat = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, flat, json.loads(body) if body else None


# --------------------------------------------------------------------------- one-shot calls


def test_reads_are_typed_and_match_the_wire(node: Node) -> None:
    client = node.client()
    discovery = node.resolve(client.discover())
    _, _, raw = wire(node, "/discover")
    assert discovery.gpu_ids == raw["gpu_ids"] == [0, 1, 2, 3] and discovery.cpu_ids == raw["cpu_ids"] == [0, 1]
    assert [g.name for g in discovery.gpus] == [g["name"] for g in raw["gpus"]]
    assert discovery.dram_available == [True, False] and discovery.auth_required is False

    power = node.resolve(client.get_gpu_power([2, 0]))
    assert sorted(power.power_mw) == [0, 2] and power.errors == {}
    assert all(70_000 <= mw <= 700_000 for mw in power.power_mw.values())
    assert node.resolve(client.get_power_limit()) == {
        int(k): PowerLimit(v["power_limit_mw"]) for k, v in wire(node, "/gpu/get_power_limit")[2].items()
    }
    assert node.resolve(client.get_power_limit_constraints(1)) == {1: PowerLimitConstraints(200_000, 700_000)}
    assert node.resolve(client.get_persistence_mode(3)) == {3: PersistenceMode(False)}
    energy = node.resolve(client.get_cpu_energy(1))
    assert energy[1].cpu_energy_uj and energy[1].dram_energy_uj is None
    assert node.resolve(client.get_cpu_energy(0, cpu=False, dram=False)) == {0: CpuEnergy(None, None)}


def test_cpu_power_is_measured_over_the_window(node: Node) -> None:
    client = node.client()
    d = ensureDeferred(client.get_cpu_power(0))
    window_end = node.reactor.seconds() + 0.1  # 1 / the default --cpu-power-poll-hz
    node.run_until(lambda: any(c.getTime() == window_end for c in node.reactor.getDelayedCalls()))
    node.advance(0.099)
    assert not d.called  # the first sample is in; the answer waits for the window ...
    node.advance(0.001)
    cpu = node.resolve(d)  # ... and comes with the second sample
    assert list(cpu.power_mw) == [0] and cpu.power_mw[0].cpu_mw > 0 and cpu.power_mw[0].dram_mw is not None


def test_control_calls_take_effect_and_errors_carry_the_daemons_words(node: Node) -> None:
    client = node.client()
    node.resolve(client.set_power_limit([0, 1], 250_000))
    node.resolve(client.set_persistence_mode(3, True))
    assert node.resolve(client.get_power_limit([0, 1, 2])) == {
        0: PowerLimit(250_000), 1: PowerLimit(250_000), 2: PowerLimit(700_000)
    }
    assert node.resolve(client.get_persistence_mode(3)) == {3: PersistenceMode(True)}

    with pytest.raises(ZeusdHTTPError) as bad_id:
        node.resolve(client.set_power_limit(9, 300_000))
    assert (bad_id.value.status, bad_id.value.message) == (400, "GPU index 9 does not exist.")
    with pytest.raises(ZeusdHTTPError) as per_device:
        node.resolve(client.set_gpu_locked_clocks([0, 1], 100, 150))  # below the device's clocks
    assert per_device.value.status == 400
    assert per_device.value.errors == dict.fromkeys((0, 1), "NVML error: a supplied argument was invalid")
    with pytest.raises(ZeusdHTTPError) as whoami:
        node.resolve(client.whoami())
    assert (whoami.value.status, whoami.value.message) == (404, "Authentication is not enabled on this server.")


def test_a_silent_daemon_is_a_timeout_on_the_clock(node: Node) -> None:
    node.gate.inner = Quiet(headers=False)  # takes the request, never answers
    client = node.client(timeout_s=2.0)
    d = ensureDeferred(client.get_time_ms())
    node.settle()
    node.advance(1.9)
    assert not d.called
    node.advance(0.1)
    with pytest.raises(ZeusdConnectionError, match=r"node\.test:4938: GET /time: no answer within 2 s"):
        node.resolve(d)


class Quiet(Resource):
    """Takes a request and then says nothing: no answer at all, or a 200 and an open, silent body."""

    isLeaf = True

    def __init__(self, headers: bool) -> None:
        super().__init__()
        self.headers = headers

    def render(self, request: Any) -> Any:
        if self.headers:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b": hello\n\n")
        return NOT_DONE_YET


# --------------------------------------------------------------------------- auth through the web layer


def test_auth_failures_map_to_401_and_403_with_the_auth_texts() -> None:
    node = simulated_node(signing_key=KEY)
    try:
        status, headers, body = wire(node, "/gpu/get_power")
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="zeusd"'
        assert body == {"error": "Authentication required. Provide an Authorization: Bearer <token> header."}
        status, headers, body = wire(node, "/gpu/get_power", token=issue_token(KEY, "a", ["gpu-read"], 1))
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="zeusd"'
        assert body == {"error": "Token has expired."}
        status, headers, body = wire(node, "/cpu/get_power", token=issue_token(KEY, "bob", ["gpu-read"], None))
        assert status == 403 and "www-authenticate" not in headers
        assert body == {"error": "Token for user 'bob' lacks required scope 'cpu-read'. Token scopes: ['gpu-read']"}

        with pytest.raises(ZeusdAuthError) as missing:
            node.resolve(node.client().get_gpu_power())
        assert missing.value.status == 401
        reader = node.client(token=issue_token(KEY, "alice", ["gpu-read"], None))
        assert node.resolve(reader.whoami()).scopes == ("gpu-read",)
        with pytest.raises(ZeusdAuthError) as scope:
            node.resolve(reader.set_power_limit(0, 300_000))
        assert scope.value.status == 403 and "lacks required scope 'gpu-control'" in scope.value.message
    finally:
        node.close()


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("fmt", ["v0.4", "v0.5"])
def test_stream_yields_one_sample_per_device_per_tick(node: Node, fmt: str) -> None:
    client = node.client()
    stream = node.resolve(client.stream_gpu_power([1, 3], format=fmt))
    samples: list[DevicePower] = []
    reader = ensureDeferred(stream.run(samples.append))
    node.run_until(lambda: len(samples) == 2)  # the first tick runs at once
    for ticks in range(2, 5):
        node.advance(GPU_PERIOD)
        node.run_until(lambda: len(samples) == 2 * ticks)
    assert [s.index for s in samples] == [1, 3] * 4 and stream.malformed == 0
    assert stream.events == (4 if fmt == "v0.4" else 8)  # one snapshot per tick, or one event per GPU
    stream.close()
    node.resolve(reader)  # closing ends the iteration cleanly
    assert stream.ended and client._streams == set()


def test_a_stream_that_goes_silent_fails_after_the_idle_timeout(node: Node) -> None:
    node.gate.inner = Quiet(headers=True)
    client = node.client()
    stream = node.resolve(client.stream_gpu_power([0], idle_timeout_s=3.0))
    pending = ensureDeferred(stream.__anext__())
    node.settle()
    node.advance(2.9)
    assert not pending.called
    node.advance(0.1)
    with pytest.raises(ZeusdConnectionError, match="gpu stream silent for 3 s"):
        node.resolve(pending)
    assert stream.ended


# --------------------------------------------------------------------------- many daemons


def test_multi_stream_backs_off_exactly_and_resumes(node: Node) -> None:
    transitions: list[tuple[float, str]] = []

    def seen(status: ServerStatus) -> None:
        transitions.append((node.reactor.seconds(), status.state))

    readings: list[PowerReading] = []
    multi = MultiPowerStream(
        ["node.test:4938"], token="", reactor=node.reactor, http=lambda _: node.http, kinds=["gpu"],
        backoff_initial_s=0.5, backoff_max_s=2.0, idle_timeout_s=None, on_status=seen, on_reading=readings.append,
    )
    label = "node.test:4938"
    multi.start()
    node.run_until(lambda: len(readings) >= 4)
    assert multi.status[label].state == "streaming" and multi.status[label].connects == 1
    assert {r.index for r in readings} == {0, 1, 2, 3} and all(r.server == label for r in readings)

    node.gate.down = "restarting"  # the daemon goes away: its streams end, new requests fail
    for hub in node.hubs:
        hub.close_all()
    node.run_until(lambda: multi.status[label].state == "backoff")
    assert (label, "gpu", 0) not in multi.latest  # no stale reading shown as current
    went_down = node.reactor.seconds()
    for delay in (0.5, 1.0, 2.0, 2.0):  # doubling, capped, while nothing flows
        assert multi.status[label].retry_in_s == delay
        node.advance(delay - 0.01)
        assert multi.status[label].state == "backoff"
        node.advance(0.01)
        node.run_until(lambda: transitions[-1][1] == "backoff")
    attempts = [t - went_down for t, state in transitions if state == "connecting" and t > went_down]
    assert attempts == pytest.approx([0.5, 1.5, 3.5, 5.5])
    assert "HTTP 503: restarting" in (multi.status[label].error or "")

    node.gate.down = None
    readings.clear()
    node.advance(2.0)
    node.run_until(lambda: len(readings) >= 4)
    assert multi.status[label].state == "streaming" and multi.status[label].connects == 2
    node.resolve(multi.stop())
    assert multi.status[label].state == "stopped"


def test_multi_stream_stops_for_good_on_an_auth_failure() -> None:
    node = simulated_node(signing_key=KEY)
    try:
        multi = MultiPowerStream(["node.test:4938"], token="", reactor=node.reactor, http=lambda _: node.http)
        daemon_timers = set(node.reactor.getDelayedCalls())  # the daemon's own (the RAPL wraparound guard)
        multi.start()
        node.run_until(lambda: multi.status["node.test:4938"].state == "failed")
        assert "token" in (multi.status["node.test:4938"].error or "")
        assert set(node.reactor.getDelayedCalls()) == daemon_timers  # no retry is scheduled
        node.resolve(multi.stop())
    finally:
        node.close()
