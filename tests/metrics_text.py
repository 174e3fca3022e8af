"""Reading a /metrics answer the way Prometheus does (its own text parser), for the tests that check values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.daemon import Client

class Scrape:
    """One parsed scrape: samples by name, with label lookups."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[str, list[Sample]] = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples.setdefault(s.name, []).append(s)

    def all(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.all(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {found}"
        return float(found[0].value)

    def value_or(self, name: str, default: float, **labels: str) -> float:
        found = self.all(name, **labels)
        return float(found[0].value) if found else default

    def by_gpu(self, name: str) -> dict[int, float]:
        return {int(s.labels["gpu"]): float(s.value) for s in self.samples.get(name, [])}


def scrape(client: Client, token: str | None = None) -> Scrape:
    r = client.get("/metrics", token=token)
    assert r.status == 200, r.body[:500]
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.body.decode())
