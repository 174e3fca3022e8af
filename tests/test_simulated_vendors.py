"""``--simulate-vendor nvidia|amd`` through the web and client layers.

A simulated node behaves like the vendor's real backend where the API shows
it: the operations AMD GPUs do not have (persistence mode, resetting a single
clock domain) answer 400 naming the operation, and device errors carry the
vendor's texts (the same texts tests/test_gpu_daemon.py expects from the real
backends on their stand-in libraries). The HTTP answers are checked on the
wire, then through zeusd.client's typed calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import pytest_twisted

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until
from tests.stand_ins import AMD_PERSISTENCE_UNSUPPORTED, AMD_SINGLE_DOMAIN_RESET, AmdSmiStandIn, NvmlStandIn
from tests.client_helpers import address, within
from tests.metrics_text import scrape
from zeusd.client import PersistenceMode, PowerLimit, PowerLimitConstraints, ZeusdAuthError, ZeusdClient, ZeusdHTTPError


@dataclass(frozen=True)
class Vendor:
    """What a simulated GPU of the vendor answers."""

    name: str
    invalid: str
    #: The 400 answers for operations the vendor does not have (None: it has them).
    no_persistence: str | None
    no_single_domain_reset: str | None


VENDORS = {
    "nvidia": Vendor("Simulated NVIDIA H100 80GB HBM3", NvmlStandIn.failures["invalid"].text, None, None),
    "amd": Vendor(
        "Simulated AMD Instinct MI300X",
        AmdSmiStandIn.failures["invalid"].text,
        AMD_PERSISTENCE_UNSUPPORTED,
        AMD_SINGLE_DOMAIN_RESET,
    ),
}


@pytest.fixture(params=sorted(VENDORS))
def vendor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node(start_daemon: DaemonFactory, vendor: str) -> Daemon:
    return start_daemon("--simulate", "--simulate-vendor", vendor)


def test_what_amd_gpus_lack_answers_400_naming_it_and_works_on_nvidia(node: Daemon, vendor: str) -> None:
    v, c = VENDORS[vendor], node.client
    answers = {
        path: c.request(method, path)
        for method, path in (
            ("POST", "/gpu/set_persistence_mode?gpu_ids=0,2&enabled=true&block=true"),
            ("GET", "/gpu/get_persistence_mode?gpu_ids=0,2"),
            ("POST", "/gpu/reset_gpu_locked_clocks?gpu_ids=0,2&block=true"),
            ("POST", "/gpu/reset_mem_locked_clocks?gpu_ids=0,2&block=true"),
        )
    }
    expected = [v.no_persistence, v.no_persistence, v.no_single_domain_reset, v.no_single_domain_reset]
    for (path, r), refused in zip(answers.items(), expected):
        if refused is None:
            assert r.status == 200, (path, r.body)
        else:
            assert (r.status, r.json()) == (400, {"errors": {"0": refused, "2": refused}}), path
    if v.no_persistence is None:
        assert answers["/gpu/get_persistence_mode?gpu_ids=0,2"].json() == {"0": {"enabled": True}, "2": {"enabled": True}}

    # Not waited for, the refusal is answered 200 like any queued command and logged.
    r = c.post("/gpu/set_persistence_mode?gpu_ids=1&enabled=false&block=false")
    assert (r.status, r.body) == (200, b"")
    if v.no_persistence is not None:
        line = f"GPU 1: Persistence mode disabled failed: {v.no_persistence}"
        wait_until(lambda: line in node.log(), what="the refusal to be logged")


def test_reset_locked_clocks_and_device_errors_on_either_vendor(node: Daemon, vendor: str) -> None:
    v, c = VENDORS[vendor], node.client
    # Locking the GPU clock at its floor drops power to near idle; resetting both domains restores it.
    assert c.post("/gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=210&max_clock_mhz=210&block=true").status == 200
    assert c.post("/gpu/set_mem_locked_clocks?gpu_ids=0&min_clock_mhz=405&max_clock_mhz=810&block=true").status == 200
    assert c.get("/gpu/get_power?gpu_ids=0").json()["power_mw"]["0"] < 100_000
    assert c.post("/gpu/reset_locked_clocks?gpu_ids=0&block=true").status == 200
    assert c.get("/gpu/get_power?gpu_ids=0").json()["power_mw"]["0"] > 200_000
    # A range the device refuses (below its clocks) is its error, in the vendor's words.
    r = c.post("/gpu/set_gpu_locked_clocks?gpu_ids=1,3&min_clock_mhz=100&max_clock_mhz=150&block=true")
    assert (r.status, r.json()) == (400, {"errors": {"1": v.invalid, "3": v.invalid}})


def test_scrapes_do_not_count_what_the_gpu_does_not_have_as_failures(node: Daemon, vendor: str) -> None:
    first = scrape(node.client)
    second = scrape(node.client)
    for m in (first, second):
        assert m.by_gpu("zeusd_gpu_up") == {0: 1, 1: 1, 2: 1, 3: 1}
        assert m.all("zeusd_device_read_errors_total") == []
        assert {s.labels["name"] for s in m.all("zeusd_gpu_info", backend="simulated")} == {VENDORS[vendor].name}
    persistence = second.by_gpu("zeusd_gpu_persistence_mode_enabled")
    assert persistence == ({} if VENDORS[vendor].no_persistence else {0: 0, 1: 0, 2: 0, 3: 0})


@pytest_twisted.ensureDeferred
async def test_client_typed_calls_on_either_vendor(node: Daemon, vendor: str) -> None:
    v = VENDORS[vendor]
    async with ZeusdClient(address(node)) as client:
        d = await within(10, client.discover())
        assert [g.name for g in d.gpus] == [v.name] * 4
        assert all(g.pci_address and g.pci_address.endswith("." + ("1" if vendor == "amd" else "0")) for g in d.gpus)

        await within(10, client.set_power_limit([0, 1], 250_000))
        assert await within(10, client.get_power_limit([0, 1, 2])) == {
            0: PowerLimit(250_000), 1: PowerLimit(250_000), 2: PowerLimit(700_000)
        }
        assert await within(10, client.get_power_limit_constraints(1)) == {1: PowerLimitConstraints(200_000, 700_000)}
        await within(10, client.set_gpu_locked_clocks(0, 210, 210))
        await within(10, client.set_mem_locked_clocks(0, 405, 810, block=False))
        await within(10, client.reset_locked_clocks([0, 1]))

        with pytest.raises(ZeusdHTTPError) as device:
            await within(10, client.set_gpu_locked_clocks([0, 1], 100, 150))
        assert (device.value.status, device.value.errors) == (400, {0: v.invalid, 1: v.invalid})

        if v.no_persistence is None:
            await within(10, client.set_persistence_mode([0, 1], True))
            assert await within(10, client.get_persistence_mode([0, 1, 2])) == {
                0: PersistenceMode(True), 1: PersistenceMode(True), 2: PersistenceMode(False)
            }
            await within(10, client.reset_gpu_locked_clocks(0))
            await within(10, client.reset_mem_locked_clocks(0))
            return
        assert v.no_single_domain_reset is not None
        calls = (
            (lambda: client.set_persistence_mode([0, 1], True), v.no_persistence),
            (lambda: client.get_persistence_mode([0, 1]), v.no_persistence),
            (lambda: client.reset_gpu_locked_clocks([0, 1]), v.no_single_domain_reset),
            (lambda: client.reset_mem_locked_clocks([0, 1]), v.no_single_domain_reset),
        )
        for call, refused in calls:
            with pytest.raises(ZeusdHTTPError) as caught:
                await within(10, call())
            error = caught.value
            assert not isinstance(error, ZeusdAuthError)  # a 400 is not an authorisation problem
            assert (error.status, error.errors) == (400, {0: refused, 1: refused})
            assert error.message == f"0: {refused}; 1: {refused}"
