"""Heatmaps are drawn once per change: `HeatmapCache` draws a picture once however often (and
however concurrently) it is asked for, and the PNG routes answer a browser that holds the
picture already with a 304 (ETag). Also: the scores of a subset sized by measured quality are
explained, not called "explicit expert ids".

The HTTP tests use the `frontend` server (tiny base, no engine started).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api_harness import ADMIN_KEY, EXAMPLES, Server, assert_error
from emo_serve.plot import Heatmap, HeatmapCache

PNG = b"\x89PNG\r\n\x1a\n"


def heatmap(title: str = "t", scores: list[list[float]] | None = None) -> Heatmap:
    return Heatmap(scores=scores if scores is not None else [[0.1, 0.5, 0.4], [0.2, 0.2, 0.6]],
                   kept=[[0, 1], [1, 2]], shared=[[], []], title=title, experts_per_layer=[3, 3])


# -- the cache, without a server ---------------------------------------------------------------------
def test_an_unchanged_heatmap_is_drawn_once() -> None:
    async def scenario() -> tuple[HeatmapCache, list[bytes]]:
        cache = HeatmapCache()
        first = await cache.png(heatmap())
        again = await cache.png(heatmap())  # equal inputs, another object: the same picture
        changed = await cache.png(heatmap(scores=[[0.1, 0.5, 0.4], [0.2, 0.3, 0.5]]))
        return cache, [first, again, changed]

    cache, (first, again, changed) = asyncio.run(scenario())
    assert first.startswith(PNG) and again is first and changed != first
    assert cache.renders == 2


def test_concurrent_requests_for_one_heatmap_share_a_drawing() -> None:
    async def scenario() -> tuple[HeatmapCache, list[bytes]]:
        cache = HeatmapCache()
        return cache, await asyncio.gather(*(cache.png(heatmap()) for _ in range(5)))

    cache, pngs = asyncio.run(scenario())
    assert cache.renders == 1 and len(set(pngs)) == 1


def test_the_cache_keeps_the_last_pictures_only() -> None:
    async def scenario() -> HeatmapCache:
        cache = HeatmapCache(size=2)
        for title in ("a", "b", "a", "c", "a", "b"):
            await cache.png(heatmap(title))
        return cache

    # a, b drawn; a hit; c evicts b; a hit; b drawn again
    assert asyncio.run(scenario()).renders == 4


def test_etag_names_exactly_what_is_drawn() -> None:
    assert heatmap().etag == heatmap().etag
    others = [heatmap(title="u"), heatmap(scores=[[0.1, 0.5, 0.4], [0.2, 0.2, 0.61]]),
              Heatmap(scores=None, kept=[[0, 1], [1, 2]], shared=[[], []], title="t", experts_per_layer=[3, 3]),
              Heatmap(scores=[[0.1, 0.5, 0.4], [0.2, 0.2, 0.6]], kept=[[0], [1, 2]], shared=[[], []], title="t",
                      experts_per_layer=[3, 3])]
    assert len({heatmap().etag, *(h.etag for h in others)}) == 1 + len(others)


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def admin(frontend: Server) -> httpx.Client:
    return frontend.client(ADMIN_KEY)


@pytest.fixture(scope="module")
def explicit(admin: httpx.Client) -> str:
    r = admin.post("/v1/subsets", json={"name": "heat-a", "experts": [0, 1, 2, 3]})
    assert r.status_code == 201, r.text
    return "heat-a"


@pytest.mark.parametrize("path", ["/v1/subsets/heat-a/scores", "/v1/models/tiny/routing"])
def test_a_heatmap_the_client_holds_is_304(admin: httpx.Client, explicit: str, path: str) -> None:
    first = admin.get(path, params={"format": "png"})
    assert first.status_code == 200 and first.content.startswith(PNG), first.text
    etag = first.headers["etag"]
    assert etag.startswith('"') and "no-cache" in first.headers["cache-control"]
    again = admin.get(path, params={"format": "png"})
    assert again.status_code == 200 and again.headers["etag"] == etag and again.content == first.content
    revalidated = admin.get(path, params={"format": "png"}, headers={"If-None-Match": f'W/"other", {etag}'})
    assert revalidated.status_code == 304 and revalidated.content == b"" and revalidated.headers["etag"] == etag
    stale = admin.get(path, params={"format": "png"}, headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content == first.content


def test_a_new_subset_of_the_same_name_gets_a_new_picture(admin: httpx.Client) -> None:
    assert admin.post("/v1/subsets", json={"name": "heat-b", "experts": [0, 1]}).status_code == 201
    before = admin.get("/v1/subsets/heat-b/scores", params={"format": "png"})
    assert admin.delete("/v1/subsets/heat-b").status_code == 200
    assert admin.post("/v1/subsets", json={"name": "heat-b", "experts": [4, 5, 6]}).status_code == 201
    after = admin.get("/v1/subsets/heat-b/scores", params={"format": "png"},
                      headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200 and after.headers["etag"] != before.headers["etag"]


def test_scores_of_a_subset_sized_by_quality_are_explained(frontend: Server, admin: httpx.Client,
                                                            explicit: str) -> None:
    """A subset sized by `max_loss_increase` was chosen by measured quality, not by explicit ids:
    the 404 says so and where its estimate is; its heatmap still shows its experts."""
    r = admin.post("/v1/subsets", json={"name": "sized", "examples": EXAMPLES, "max_loss_increase": 0.5,
                                        "folds": 2})
    assert r.status_code == 202, r.text
    frontend.wait_until(lambda: admin.get("/v1/subsets/sized").json()["state"] != "profiling", 300, "sizing")
    assert admin.get("/v1/subsets/sized").json()["state"] == "ready"
    error = assert_error(admin.get("/v1/subsets/sized/scores"), 404, param="name",
                         contains="was sized by measured quality (max_loss_increase 0.5")
    assert "explicit" not in error["message"] and "`quality`" in error["message"]
    assert error["code"] == "scores_not_found"
    png = admin.get("/v1/subsets/sized/scores", params={"format": "png"})
    assert png.status_code == 200 and png.content.startswith(PNG)
    by_ids = assert_error(admin.get(f"/v1/subsets/{explicit}/scores"), 404, param="name")
    assert "explicit expert ids" in by_ids["message"]
