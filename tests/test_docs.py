"""The user docs against the code (CPU, source tree only): relative links and their anchors, the README's table of the
``LARGEEP_*`` variables the library reads and their defaults, and the benchmark options the docs name."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from largeep import _env
from largeep.bench import cli, sim

ROOT = Path(__file__).resolve().parents[1]
# the user docs (docs/history.md is a log: its links are of their time)
DOCS = ("README.md", "docs/usage.md", "docs/design.md", "docs/scaling.md", "docs/many_ranks_plan.md")


def _text(name: str) -> str:
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"needs the source tree ({name})")
    return path.read_text()


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (lines kept, so that line numbers hold)."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lowercased, punctuation but '-' and '_' dropped, spaces to
    '-'; a repeated heading gets -1, -2, ..."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchors_follow_github() -> None:
    """The slug rule on headings of the kinds the docs have (an independent list of GitHub's anchors)."""
    text = "# Autograd: largeep.ops\n## torch.compile\n```\n# not a heading\n```\n### A, b (c)\n# Same\n# Same\n"
    assert anchors(text) == {"autograd-largeepops", "torchcompile", "a-b-c", "same", "same-1"}


def broken_links(name: str, text: str) -> list[str]:
    """Each relative link of ``text`` (the file ``name``) whose file, or whose anchor in a markdown file, is
    missing."""
    here = (ROOT / name).parent
    bad = []
    for lineno, line in enumerate(_prose(text).splitlines(), 1):
        for url in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", url):  # (http:, https:, mailto:)
                continue
            path, _, anchor = url.partition("#")
            target = (here / path).resolve() if path else ROOT / name
            if not target.exists():
                bad.append(f"{name}:{lineno}: {url}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
                bad.append(f"{name}:{lineno}: {url}: no such heading")
            elif anchor and target.is_dir():
                bad.append(f"{name}:{lineno}: {url}: an anchor on a folder")
    return bad


def test_broken_links_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself: a missing file, a missing heading and a good link of each kind."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Large groups: calls in rounds\n")
    text = ("[ok](docs/b.md#large-groups-calls-in-rounds) [ok](#top) [ok](https://example.com/x#y)\n"
            "[gone](docs/c.md) [bad](docs/b.md#large-groups)\n```\n[in code](nowhere.md)\n```\n# Top\n")
    (tmp_path / "a.md").write_text(text)
    assert broken_links("a.md", text) == ["a.md:2: docs/c.md: no such file",
                                          "a.md:2: docs/b.md#large-groups: no such heading"]


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(name: str) -> None:
    """Every relative link of the user docs names a file of the repository, and a heading that the file has."""
    text = _text(name)
    if not (ROOT / "bench" / "results").is_dir():
        pytest.skip("needs the repository (the source distribution leaves out bench/results, which the docs cite)")
    assert broken_links(name, text) == []


class _Recording(dict):  # type: ignore[type-arg]
    """An environment that notes each name read."""

    def __init__(self, base: dict[str, str]) -> None:
        super().__init__(base)
        self.read: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def _readme_variables() -> dict[str, str]:
    """README's table of the variables read by the library: name -> default column."""
    text = _text("README.md")
    start = text.index("Read by the library")
    table = text[start:text.index("\n\n", text.index("| variable |", start))]
    rows = re.findall(r"^\| `(LARGEEP_\w+)` \| ([^|]+) \|", table, flags=re.M)
    return {name: default.strip().strip("`") for name, default in rows}


def test_readme_lists_every_variable_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """README's table names each LARGEEP_* variable that _env reads (every reader run with none set), and its
    default column is what the code takes when the variable is unset."""
    env = _Recording({k: v for k, v in os.environ.items() if not k.startswith("LARGEEP_")})
    monkeypatch.setattr(os, "environ", env)
    s = _env.settings()
    got = {"TIMEOUT_S": s.timeout_s, "INIT_TIMEOUT_S": s.init_timeout_s, "LOG_LEVEL": _env.log_level(),
           "CHECK_VALUES": s.check_values, "NVSHMEM_HEAP_MARGIN": s.heap_margin,
           "ZERO_COPY_SLOTS": s.zero_copy_slots, "TUNE": s.tune, "STREAM_PRIORITY": s.high_priority,
           "SEGV_BACKTRACE": _env.fault_backtrace(), "INDUCTOR_ORDER_FIX": _env.inductor_order_fix()}
    readme = _readme_variables()
    assert sorted(readme) == sorted(k for k in env.read if k.startswith("LARGEEP_"))
    flag = {"1": True, "0": False}
    want = {"TIMEOUT_S": float(readme["LARGEEP_TIMEOUT_S"]), "INIT_TIMEOUT_S": float(readme["LARGEEP_INIT_TIMEOUT_S"]),
            "LOG_LEVEL": getattr(logging, readme["LARGEEP_LOG_LEVEL"]),
            "CHECK_VALUES": flag[readme["LARGEEP_CHECK_VALUES"]],
            "NVSHMEM_HEAP_MARGIN": float(readme["LARGEEP_NVSHMEM_HEAP_MARGIN"]),
            "ZERO_COPY_SLOTS": int(readme["LARGEEP_ZERO_COPY_SLOTS"]),
            "TUNE": {k: int(v) for k, v in (item.split("=") for item in readme["LARGEEP_TUNE"].split(","))},
            "STREAM_PRIORITY": readme["LARGEEP_STREAM_PRIORITY"] == "high",
            "SEGV_BACKTRACE": flag[readme["LARGEEP_SEGV_BACKTRACE"]],
            "INDUCTOR_ORDER_FIX": flag[readme["LARGEEP_INDUCTOR_ORDER_FIX"]]}
    assert got == want


def _flags(text: str) -> set[str]:
    """The ``--options`` written in backticks in ``text`` (a prefix such as ``--holdout-*`` left out)."""
    option = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*\b(?!-)")
    return {f for span in re.findall(r"`([^`]+)`", text) for f in option.findall(span)}


def _options(parser: Any) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


def test_benchmark_options_in_the_docs_exist() -> None:
    """The options README gives for ``python -m largeep.bench`` and ``python -m largeep.bench.sim``, and those
    docs/scaling.md gives (the model's, and the benchmark's where it describes records), are the CLIs' own."""
    readme = _text("README.md")
    bench_item = readme[readme.index("- `python -m largeep.bench` (also"):readme.index("\n- `python bench/")]
    sim_item = readme[readme.index("- `python -m largeep.bench.sim"):readme.index("\n- `PYTHONPATH=python")]
    bench, model = _options(cli.build_parser()), _options(sim.build_parser())
    assert _flags(bench_item) - bench == set()
    assert _flags(sim_item) - model == set()
    assert _flags(_text("docs/scaling.md")) - (model | bench) == set()
    assert {"--link-gbps", "--ll-send-weights", "--preset"} <= _flags(bench_item)  # (the parse found them)
