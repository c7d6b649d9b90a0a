"""The proxy's ``/metrics``, scraped over HTTP and read with prometheus_client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def _exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def scrape(port: int) -> list[Sample]:
    """Every sample the metrics listener on 127.0.0.1:``port`` exports now."""
    families = text_string_to_metric_families(_exposition(port))
    return [sample for family in families for sample in family.samples]


def exported_names(port: int) -> set[str]:
    """Every metric name the listener on 127.0.0.1:``port`` exports, with the
    suffixes of its samples, whether or not a sample exists yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum")}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(_exposition(port))
        for suffix in ("", *suffixes.get(family.type, ()))
    }


def _matching(samples: list[Sample], name: str, labels: dict[str, str]) -> list[float]:
    wanted = labels.items()
    return [s.value for s in samples if s.name == name and wanted <= s.labels.items()]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none yet)."""
    return sum(_matching(samples, name, labels))


def only(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = _matching(samples, name, labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]
