"""Adaptive retention: the pure policy's properties, then the policy in the served path under a burst."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from pruning import build_pruner
from service.api.app import create_app
from service.engine import OcrOptions
from service.engine.options import PageKnobs
from service.inputs import Document
from service.scheduler.adaptive import RetentionPolicy
from service.settings import ServiceSettings
from tests.helpers import png_bytes, text_page

waits = st.floats(min_value=0, max_value=600, allow_nan=False)
gaps = st.floats(min_value=0, max_value=60, allow_nan=False)
policies = st.builds(
    RetentionPolicy,
    target_wait_s=st.floats(min_value=0.01, max_value=60),
    floor=st.floats(min_value=0.05, max_value=1.0),
    step=st.floats(min_value=0.01, max_value=0.5),
    hold_s=st.floats(min_value=0.01, max_value=5),
)
knobs = st.builds(
    PageKnobs,
    retention=st.one_of(st.just("auto"), st.floats(min_value=0.01, max_value=1.0)),
    pruner=st.sampled_from(["rtprune", "none", "norm", "random", "divprune"]),
    adapt=st.booleans(),
)


@given(policies, st.lists(st.tuples(waits, gaps), max_size=50))
def test_the_level_stays_between_the_floor_and_one(policy, history):
    level = 1.0
    for wait, gap in history:
        level = policy.next_level(level, wait, gap)
        assert policy.floor - 1e-9 <= level <= 1.0


@given(policies, st.floats(min_value=0.05, max_value=1.0), waits, waits, gaps)
def test_a_longer_wait_never_gives_a_higher_level(policy, level, wait_a, wait_b, gap):
    level = max(level, policy.floor)
    shorter, longer = sorted((wait_a, wait_b))
    assert policy.next_level(level, longer, gap) <= policy.next_level(level, shorter, gap)


@given(policies, st.floats(min_value=0.05, max_value=1.0), knobs)
def test_a_cap_is_never_below_the_floor_and_never_touches_a_pinned_page(policy, level, page):
    cap = policy.cap(max(level, policy.floor), page)
    if not page.adapt or page.pruner == "none":
        assert cap is None  # pinned, or it asked for every token
    if cap is not None:
        assert policy.floor <= cap < 1.0
        assert page.retention == "auto" or page.retention > cap  # a fixed retention under the cap stays


@given(policies, st.floats(min_value=0.05, max_value=1.0))
def test_an_idle_queue_returns_to_the_requested_level(policy, level):
    level = max(level, policy.floor)
    idle = policy.hold_s * (1 + 1.0 / policy.step) + 1.0  # long enough for every step back up
    assert policy.next_level(level, 0.0, idle) == 1.0
    assert policy.cap(1.0, PageKnobs(retention=0.9)) is None  # at rest: pages run as they asked


def test_the_cap_keeps_the_dynamic_ratio_below_it_and_lowers_only_what_is_above():
    import torch

    torch.manual_seed(0)
    features, image = torch.randn(64, 16), torch.rand(3, 64, 64) * 2 - 1
    free = build_pruner("rtprune", None)(features, None, None, image)
    capped = build_pruner("rtprune", None).capped(free.keep_ratio / 2)(features, None, None, image)
    assert capped.keep_ratio == pytest.approx(free.keep_ratio / 2) and capped.n_kept_prunable < free.n_kept_prunable
    assert (capped.r_sim, capped.r_txt) == (free.r_sim, free.r_txt)  # the page's own terms, reported as ever
    loose = build_pruner("norm", None).capped(1.0)(features, None, None, image)
    assert loose.keep_ratio == pytest.approx(free.keep_ratio)  # a cap above the ratio changes nothing
    assert build_pruner("norm", 0.3).capped(0.5).keep_ratio == 0.3


def test_a_queue_building_up_lowers_the_level_before_its_pages_are_admitted_and_one_long_wait_does_not():
    """The median of admitted waits lags a burst by the time the burst's pages take to be admitted; three
    pages already waiting past the target lead it. One page waiting long alone is not load."""
    from service.scheduler.adaptive import AdaptiveRetention
    from service.scheduler.queue import PageQueue, PageRequest

    queue = PageQueue(capacity=20)
    for accepted, pages in ((100.0, 1), (101.0, 2), (103.0, 1), (104.0, 1)):
        request = PageRequest(Document([1] * pages), OcrOptions(), deadline=1e9, accepted_at=accepted)
        queue.put(request, retry_after_s=1)
    assert queue.oldest_waits(now=105.0, n=3) == [5.0, 4.0, 4.0]  # the second request's two pages
    assert queue.oldest_waits(now=105.0, n=9) == [5.0, 4.0, 4.0, 2.0, 1.0]

    page = PageKnobs(retention=1.0)
    building = AdaptiveRetention(RetentionPolicy(target_wait_s=2.0), now=0.0)
    cap = building.admit(page, wait_s=0.1, now=1.0, still_waiting=queue.oldest_waits(105.0, 3))
    assert building.level == pytest.approx(0.9) and cap.cap == pytest.approx(0.9) and building.signal_s == 4.0
    alone = AdaptiveRetention(RetentionPolicy(target_wait_s=2.0), now=0.0)
    alone.admit(page, wait_s=0.1, now=1.0, still_waiting=[30.0, 0.5])
    assert alone.level == 1.0 and alone.signal_s == pytest.approx(0.1)


# --- in the served path ---------------------------------------------------------------------------------------

PAGE = png_bytes(text_page((600, 800)))


def burst(client, n: int, **form) -> list[dict]:
    data = {"mode": "tiny", "max_new_tokens": "24", "ngram_size": "0", **form}

    def one(_):
        response = client.post("/v1/ocr", files={"file": ("p.png", PAGE)}, data=data)
        assert response.status_code == 200, response.text
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_burst_lowers_retention_says_so_and_a_quiet_queue_does_not(tiny_engine):
    settings = ServiceSettings(
        model="tiny", log_json=False, warmup=False, max_batch_size=1, adaptive_target_wait_s=0.3, adaptive_floor=0.4
    )
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        quiet = burst(client, 1)[0]["pages"][0]["stats"]
        assert quiet["adaptation"]["adapted"] is False and quiet["adaptation"]["cap"] == 1.0  # no queue, no cap
        time.sleep(1.1)  # the policy changes at most once per hold (0.5 s)
        answers = burst(client, 8, retention="1.0")  # auto pages whose own ratio is under the cap keep it
        pages = [a["pages"][0]["stats"] for a in answers]
        adapted = [p for p in pages if p["adaptation"]["adapted"]]
        assert adapted, [p["adaptation"] for p in pages]
        for page in adapted:
            assert page["retention"] <= page["adaptation"]["cap"] + 0.01 and page["adaptation"]["cap"] >= 0.4
        assert max(p["adaptation"]["queue_wait_s"] for p in adapted) > 0.3  # the signal that lowered it
        assert any("retention lowered to" in w for a in answers for w in a["warnings"])
        metrics = client.get("/metrics").text
        assert 'rtprune_pages_adapted_total{mode="tiny"}' in metrics
        assert "rtprune_adaptive_retention_level" in metrics
        pinned = burst(client, 6, adapt="false", retention="0.9")
        assert all(a["pages"][0]["stats"]["adaptation"] is None for a in pinned)  # pinned: never changed
        assert all(a["pages"][0]["stats"]["retention"] > 0.85 for a in pinned)


def test_the_policy_is_off_by_default(tiny_engine):
    settings = ServiceSettings(model="tiny", log_json=False, warmup=False, max_batch_size=1)
    assert settings.adaptive_target_wait_s is None
    with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)
        answers = burst(client, 4)
    assert all(a["pages"][0]["stats"]["adaptation"] is None for a in answers)


@pytest.mark.parametrize("rows", [1, 8])
def test_turning_the_policy_on_leaves_the_waiting_room_where_it_was(tiny_engine, rows):
    """Off, up to ``max_batch_size`` pages wait prepared beside the queue; on, at most two do (the rest wait
    in the queue, to be admitted at the current level), so the queue holds the difference: the point where
    requests get 503 does not move, and /v1/info says how many pages may wait."""
    waiting_room = {}
    for target in (None, 2.0):
        settings = ServiceSettings(
            model="tiny", log_json=False, warmup=False, max_batch_size=rows, queue_size=12,
            max_pdf_pages=12, adaptive_target_wait_s=target,
        )  # fmt: skip
        with TestClient(create_app(settings, load_engine=lambda: tiny_engine)) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.02)
            queued = client.get("/v1/info").json()["limits"]["queue_size"]
        waiting_room[target] = queued + (rows if target is None else min(rows, 2))
    assert waiting_room[None] == waiting_room[2.0] == 12 + rows
