"""Placement: data locality, capacity, least loaded, labels; a pure function, tested as one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labgate.backends.base import Resources
from labgate.errors import BadRequest, Conflict
from labgate.scheduler.placement import Placement, SiteView, Usage, choose_site
from labgate.tools.catalog import ProcessSpec, Tool

GiB = 1024**3
TOOL = Tool(name="demo", title="Demo", process=ProcessSpec(command=["{python}"]))
SMALL = Resources(cpu=1, memory=GiB)


def site(name: str, **kw: object) -> SiteView:
    return SiteView(name=name, backend=str(kw.pop("backend", "process")), **kw)  # type: ignore[arg-type]


def place(sites: list[SiteView], **kw: object) -> str:
    return choose_site(sites, Placement(tool=TOOL, resources=SMALL, **kw))  # type: ignore[arg-type]


def test_the_least_loaded_site_wins() -> None:
    east = site("east", capacity=Usage(cpu=8), used=Usage(cpu=6, instances=3))
    west = site("west", capacity=Usage(cpu=16), used=Usage(cpu=6, instances=3))
    assert place([east, west]) == "west"  # 7/16 beats 7/8


def test_unlimited_sites_tie_break_on_instances_then_name() -> None:
    assert place([site("b", used=Usage(instances=2)), site("a", used=Usage(instances=2))]) == "a"
    assert place([site("a", used=Usage(instances=3)), site("b", used=Usage(instances=1))]) == "b"


def test_data_locality_comes_before_load() -> None:
    busy = site("east", capacity=Usage(cpu=4), used=Usage(cpu=3, instances=3))
    idle = site("west", capacity=Usage(cpu=64))
    assert place([busy, idle], holders={"east"}) == "east"


def test_capacity_is_honoured_and_the_error_says_why() -> None:
    full = site("east", capacity=Usage(instances=2), used=Usage(instances=2))
    tight = site("west", capacity=Usage(memory=2 * GiB), used=Usage(memory=int(1.5 * GiB)))
    with pytest.raises(Conflict) as caught:
        place([full, tight])
    assert caught.value.code == "no_capacity"
    assert "east: full (2 of 2 instances)" in caught.value.detail
    assert "west: not enough memory" in caught.value.detail


def test_a_full_holder_is_not_replaced_by_an_empty_non_holder() -> None:
    full = site("east", capacity=Usage(cpu=1), used=Usage(cpu=1))
    with pytest.raises(Conflict) as caught:
        place([full, site("west")], holders={"east"})
    assert caught.value.code == "no_capacity"
    assert "west: holds no live replica" in caught.value.detail


def test_no_holder_among_the_candidates() -> None:
    with pytest.raises(Conflict) as caught:
        place([site("east"), site("west")], holders={"gone"})
    assert caught.value.code == "dataset_unavailable"


def test_labels_must_all_match() -> None:
    gpu = site("gpu", labels={"gpu": "a100", "zone": "eu"})
    cpu = site("cpu", labels={"zone": "eu"})
    assert place([gpu, cpu], labels={"gpu": "a100"}) == "gpu"
    with pytest.raises(Conflict) as caught:
        place([gpu, cpu], labels={"gpu": "h100"})
    assert caught.value.code == "no_matching_site"
    assert "lacks the labels gpu=h100" in caught.value.detail


def test_a_wanted_site_is_the_only_candidate() -> None:
    sites = [site("east"), site("west", used=Usage(instances=9))]
    assert place(sites, wanted="west") == "west"
    with pytest.raises(BadRequest) as caught:
        place(sites, wanted="north")
    assert caught.value.code == "unknown_site"
    with pytest.raises(Conflict) as conflict:
        place(sites, wanted="west", holders={"east"})
    assert conflict.value.code == "dataset_unavailable"


def test_sites_that_are_down_or_cannot_run_the_tool_are_skipped() -> None:
    down = site("east", live=False)
    other = site("west", backend="containers")  # the demo tool has no [container] section
    with pytest.raises(Conflict) as caught:
        place([down, other])
    assert caught.value.code == "tool_unavailable"
    assert "east: not reachable" in caught.value.detail
    assert "west: no [container] section" in caught.value.detail
    with pytest.raises(Conflict) as only_down:
        place([down])
    assert only_down.value.code == "site_unavailable"


sites_strategy = st.lists(
    st.builds(
        lambda i, live, cap, used, lab: SiteView(
            name=f"s{i}",
            backend="process",
            live=live,
            labels={"zone": lab},
            capacity=Usage(cpu=cap, instances=cap),
            used=Usage(cpu=min(used, cap or used), instances=min(used, cap or used)),
        ),
        st.integers(0, 50),
        st.booleans(),
        st.integers(0, 6),
        st.integers(0, 6),
        st.sampled_from(["eu", "us"]),
    ),
    max_size=6,
    unique_by=lambda s: s.name,
)


@given(sites_strategy, st.sets(st.sampled_from([f"s{i}" for i in range(8)])) | st.none())
def test_the_choice_always_fits_and_is_least_loaded(
    sites: list[SiteView], holders: set[str] | None
) -> None:
    placement = Placement(tool=TOOL, resources=SMALL, labels={"zone": "eu"}, holders=holders)

    def eligible(s: SiteView) -> bool:
        return (
            s.live
            and s.labels.get("zone") == "eu"
            and (holders is None or s.name in holders)
            and s.shortage(SMALL) is None
        )

    try:
        chosen = choose_site(sites, placement)
    except Conflict:
        assert not any(eligible(s) for s in sites)
        return
    best = next(s for s in sites if s.name == chosen)
    assert eligible(best)
    assert all(best.load_after(SMALL) <= s.load_after(SMALL) for s in sites if eligible(s))
