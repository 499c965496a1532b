"""``hqlabel review``'s server and JSON API on a real (tiny, random-weight) labeling job: ranking, filters,
errors, decisions from many clients at once, a restart, click fixes; decisions read back from the Parquet
files of LABELS/review."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from reviewing import api, copy_labels, make_labels, running

from hqlabel.jobs.cli import build_parser
from hqlabel.platform.rle import decode_mask
from hqlabel.review.items import SIGNALS
from hqlabel.review.server import ReviewApp
from hqlabel.review.store import read_review

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def labels(ray_session, tmp_path_factory) -> Path:
    return make_labels(tmp_path_factory.mktemp("review"), classes=("cat", "dog"))


@pytest.fixture(scope="module")
def served(labels, tmp_path_factory):
    """One server (with the click-fix model) over a copy of the labels: ``(app, base URL, labels copy)``."""
    folder = copy_labels(labels, tmp_path_factory.mktemp("served") / "labels")
    app = ReviewApp(str(folder), reviewer="ann", device="cpu")
    with running(app) as base:
        yield app, base, folder


def _events(folder: Path) -> list[dict]:
    files = sorted((folder / "review").glob("part-*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_items_ranked_least_trustworthy_first_with_filters(served, labels):
    _app, base, _ = served
    status, info = api(base, "/api/info")
    assert status == 200 and info["random_weights"] is True and "RANDOM WEIGHTS" in info["warning"]
    assert info["classes"] == ["cat", "dog"] and info["signals"] == list(SIGNALS)  # a labeling job writes all
    rows = pq.read_table(labels / "masks").to_pylist()
    assert info["total"] == len(rows) > 10
    status, page = api(base, "/api/items?limit=500")
    assert status == 200 and page["random_weights"] is True and page["total"] == len(rows)
    trusts = [item["trust"] for item in page["items"]]
    assert trusts == sorted(trusts)  # least trustworthy first
    for item in page["items"]:
        assert item["trust"] == pytest.approx(min(item[s] for s in SIGNALS if item[s] is not None))
    first, second = api(base, "/api/items?offset=0&limit=3")[1], api(base, "/api/items?offset=3&limit=3")[1]
    assert [i["instance_id"] for i in first["items"] + second["items"]] == [
        i["instance_id"] for i in page["items"][:6]
    ]
    for label in ("cat", "dog"):
        chosen = api(base, f"/api/items?limit=500&label={label}")[1]
        assert chosen["total"] == sum(r["label"] == label for r in rows)
        assert {i["label"] for i in chosen["items"]} <= {label}
    scores = sorted(r["score"] for r in rows)
    low, high = scores[len(scores) // 4], scores[3 * len(scores) // 4]
    band = api(base, f"/api/items?limit=500&min_score={low}&max_score={high}")[1]
    assert band["total"] == sum(low <= r["score"] <= high for r in rows) > 0
    assert all(low <= i["score"] <= high for i in band["items"])


def test_one_item_its_overlay_and_bad_requests(served):
    _app, base, _ = served
    status, item = api(base, "/api/items/sub%2Fc.png/0")
    assert status == 200 and item["image_id"] == "sub/c.png" and (item["height"], item["width"]) == (40, 40)
    assert api(base, "/api/items/sub/c.png/0")[1]["image_id"] == "sub/c.png"  # a raw slash works too
    with urllib.request.urlopen(base + item["overlay"]) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert Image.open(response).size == (480, 480)  # 40 x 40, enlarged 12 times (whole pixels)
    bad = [
        ("/api/items/nope.png/0", None, 404),
        ("/api/items/a.png/x", None, 400),
        ("/api/items?limit=0", None, 400),
        ("/api/items?limit=501", None, 400),
        ("/api/items?label=horse", None, 400),
        ("/api/items?min_score=high", None, 400),
        ("/api/nothing", None, 404),
        ("/api/decisions", {"image_id": "a.png", "instance_id": 0, "decision": "maybe"}, 400),
        ("/api/decisions", {"image_id": "a.png", "instance_id": 0, "decision": "relabel"}, 400),
        ("/api/decisions", {"image_id": "a.png", "instance_id": "0", "decision": "accept"}, 400),
        ("/api/decisions", {"image_id": "a.png", "instance_id": 999, "decision": "accept"}, 404),
        ("/api/decisions", [], 400),
        ("/api/fix", {"image_id": "a.png", "instance_id": 0, "points": []}, 400),
        ("/api/fix", {"image_id": "a.png", "instance_id": 0, "points": [[500, 5, 1]]}, 400),
        ("/api/fix", {"image_id": "a.png", "instance_id": 0, "points": [[5, 5, 2]]}, 400),
    ]
    for path, body, expected in bad:
        status, answer = api(base, path, body)
        assert status == expected, (path, body, answer)
        assert set(answer) == {"error"} and "\n" not in answer["error"] and answer["error"]
    assert api(base, "/api/decisions", raw=b"{not json")[0] == 400
    assert _events(served[2]) == []  # nothing bad was written


def test_many_clients_at_once_lose_no_decision_and_a_restart_keeps_them(labels, tmp_path):
    """8 clients on 2 servers over one labels folder post at once: every decision is in the Parquet files,
    and a third server started afterwards (a restart) serves the latest decision of each instance."""
    folder = copy_labels(labels, tmp_path / "labels")
    apps = [ReviewApp(str(folder), reviewer=f"server{k}", device=None) for k in range(2)]
    keys = [(i["image_id"], i["instance_id"]) for i in apps[0].list_items({"limit": "500"})["items"]]
    clients, per_client = 8, 6
    with running(apps[0]) as first, running(apps[1]) as second:
        barrier, failures = threading.Barrier(clients), []

        def client(k: int) -> None:
            base = (first, second)[k % 2]
            barrier.wait()
            for j in range(per_client):
                image_id, instance_id = keys[(k * per_client + j) % len(keys)]
                body = {"image_id": image_id, "instance_id": instance_id, "reviewer": f"r{k}"}
                body |= {"decision": "relabel", "label": "dog"} if j % 3 == 2 else {"decision": "accept"}
                if j % 3 == 1:
                    body["decision"] = "reject"
                status, answer = api(base, "/api/decisions", body)
                if status != 200:
                    failures.append(answer)
            # every client also decides the same instance: one of them wins, none is lost
            api(
                base,
                "/api/decisions",
                {"image_id": keys[0][0], "instance_id": keys[0][1], "decision": "reject"},
            )

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    events = _events(folder)
    assert len(events) == clients * (per_client + 1)  # one file per post, none lost, none doubled
    assert len(list((folder / "review").glob("part-*.parquet"))) == len(events)
    assert {e["reviewer"] for e in events} == {f"r{k}" for k in range(clients)} | {"server0", "server1"}
    assert all(e["time"].tzinfo is not None for e in events)

    restarted = ReviewApp(str(folder), reviewer="later", device=None)
    expected = {}
    for k in range(clients):
        for j in range(per_client):
            key = keys[(k * per_client + j) % len(keys)]
            expected[key] = ("accept", "reject", "relabel")[j % 3]
    expected[keys[0]] = "reject"
    for (image_id, instance_id), decision in expected.items():
        review = restarted.item(image_id, instance_id)["review"]
        assert review["decision"] == decision, (image_id, instance_id)
        assert review["label"] == ("dog" if decision == "relabel" else None)
    pending = restarted.list_items({"limit": "500", "pending": "1"})
    assert pending["total"] == len(keys) - len(expected)
    assert not {(i["image_id"], i["instance_id"]) for i in pending["items"]} & set(expected)
    assert {k: s.decision for k, s in read_review(str(folder / "review")).items()} == expected


def test_click_fix_reruns_hq_sam_and_saves_the_mask(served):
    app, base, folder = served
    item = api(base, "/api/items?limit=1")[1]["items"][0]
    key = {"image_id": item["image_id"], "instance_id": item["instance_id"]}
    height, width = item["height"], item["width"]
    original = decode_mask(app.items.row(item["image_id"], item["instance_id"])["mask"])
    masks = []
    for points in ([[width / 2, height / 2, 1]], [[width / 2, height / 2, 1], [2.0, 2.0, 0]]):
        status, fixed = api(base, "/api/fix", key | {"points": points})
        assert status == 200, fixed
        assert fixed["item"]["review"]["corrected"] and fixed["item"]["review"]["points"] == points
        state = read_review(str(folder / "review"))[(item["image_id"], item["instance_id"])]
        mask = decode_mask(state.mask)
        assert mask.shape == (height, width) and int(mask.sum()) == state.area == fixed["area"]
        assert state.points == points and state.fixed_by == "ann" and state.decision is None
        # the same model, prompts and image directly: the server saved what HQ-SAM returns
        image = app.items.image(item["image_id"])
        rle, _, _ = app.fixer.fix(item["image_id"], image, item["box"], [tuple(p) for p in points])
        assert (decode_mask(rle) == mask).all()
        masks.append(mask)
    assert not (masks[0] == original).all() or not (masks[1] == original).all()
    fixes = [e for e in _events(folder) if e["action"] == "fix"]
    assert len(fixes) == 2 and fixes[-1]["points"] == [[width / 2, height / 2, 1], [2.0, 2.0, 0]]


def test_review_cli_options():
    args = build_parser().parse_args(["review", "labels", "--port", "0", "--reviewer", "bo"])
    assert (args.host, args.port, args.reviewer, args.device, args.no_fix) == (
        "127.0.0.1",
        0,
        "bo",
        "auto",
        False,
    )


def test_the_review_command_serves_until_stopped(labels, tmp_path):
    """``hqlabel review`` itself: binds loopback, prints its address and the random-weights warning, serves
    the page and the API (here without the click-fix model), and keeps what it saved after it stops."""
    folder = copy_labels(labels, tmp_path / "labels")
    command = [sys.executable, "-m", "hqlabel", "review", str(folder), "--port", "0", "--reviewer", "cli"]
    process = subprocess.Popen([*command, "--no-fix"], stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith(f"reviewing {folder} (") and "at http://127.0.0.1:" in first, first
        assert process.stdout.readline().startswith("WARNING: RANDOM WEIGHTS")
        base = first.split(" at ")[1].split("/;")[0]
        with urllib.request.urlopen(base + "/") as response:
            page = response.read().decode()
        assert "<title>hqlabel review</title>" in page and 'id="random-weights"' in page
        item = api(base, "/api/items?limit=1")[1]["items"][0]
        key = {"image_id": item["image_id"], "instance_id": item["instance_id"]}
        assert api(base, "/api/decisions", key | {"decision": "reject"})[0] == 200
        status, answer = api(base, "/api/fix", key | {"points": [[1, 1, 1]]})
        assert status == 409 and "--no-fix" in answer["error"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    state = read_review(str(folder / "review"))[(item["image_id"], item["instance_id"])]
    assert (state.decision, state.reviewer) == ("reject", "cli")


def test_ranking_uses_the_quality_columns_a_labels_folder_has(labels, tmp_path):
    """Outputs with only some signal columns (``stability`` / ``box_iou`` here, as an output of an older
    version has only ``pred_iou`` / ``score``) rank by the lowest signal they have, nulls skipped."""
    folder = copy_labels(labels, tmp_path / "labels")
    for path in (folder / "masks").glob("*.parquet"):
        table = pq.read_table(path).drop_columns(["stability", "hq_sam_iou", "box_iou"])
        n = table.num_rows
        stability = [None if k % 5 == 0 else -1 + 0.01 * ((k * 37) % 100) for k in range(n)]  # < pred_iou
        table = table.append_column("stability", pa.array(stability, pa.float32()))
        table = table.append_column("box_iou", pa.array([0.99] * n, pa.float32()))
        pq.write_table(table, path)
    app = ReviewApp(str(folder), reviewer="ann", device=None)
    assert app.items.signals == ["stability", "box_iou", "pred_iou", "score"]
    items = app.list_items({"limit": "500"})["items"]
    for item in items:
        present = [item[s] for s in ("stability", "box_iou", "pred_iou", "score") if item[s] is not None]
        assert item["trust"] == pytest.approx(min(present))
    assert [i["trust"] for i in items] == sorted(i["trust"] for i in items)
    assert any(i["stability"] is None for i in items)
    unstable = [i for i in items if i["stability"] is not None]
    assert items[: len(unstable)] == unstable  # the lowest signal decides: these come first
    assert all(i["trust"] == pytest.approx(i["stability"]) for i in unstable)


def test_repeated_ids_keep_the_first_shards_masks_and_ranking_matches_a_plain_sort(labels, tmp_path, caplog):
    """An image id in two shards keeps the first shard's masks, a key repeated within a shard its first row
    (a warning counts the rest); the ranking equals sorting the kept rows by (min signal, mean, key)."""
    from hqlabel.review.items import ReviewItems

    folder = copy_labels(labels, tmp_path / "labels")
    first, second = sorted((folder / "masks").glob("*.parquet"))
    one, two = pq.read_table(first), pq.read_table(second)
    taken = one["image_id"][0].as_py()  # shard 2's first image now claims shard 1's id
    renamed = two["image_id"][0].as_py()
    moved = pc.equal(two["image_id"], renamed)
    two = two.set_column(
        two.column_names.index("image_id"), "image_id", pc.if_else(moved, taken, two["image_id"])
    )
    pq.write_table(pa.concat_tables([two, two.slice(two.num_rows - 1, 1)]), second)  # last row twice
    left_out = pc.sum(moved).as_py() + 1
    with caplog.at_level("WARNING"):
        items = ReviewItems(str(folder))
    assert f"left out {left_out} mask(s)" in caplog.text
    assert len(items) == one.num_rows + two.num_rows + 1 - left_out
    kept = one.to_pylist() + [r for r in two.to_pylist() if r["image_id"] != taken]
    assert sorted(items.key(k) for k in range(len(items))) == sorted(
        (r["image_id"], r["instance_id"]) for r in kept
    )
    for r in one.to_pylist():
        if r["image_id"] == taken:
            assert items.row(taken, r["instance_id"])["mask"] == r["mask"]  # shard 1's, not shard 2's

    def trust(row):
        values = [row[s] for s in SIGNALS if row.get(s) is not None]
        return min(values), sum(values) / len(values)

    expected = sorted(kept, key=lambda r: (*trust(r), r["image_id"], r["instance_id"]))
    assert [items.key(k) for k in items.select()] == [(r["image_id"], r["instance_id"]) for r in expected]
    assert (renamed, 0) not in items and items.position(renamed, 0) is None
    with pytest.raises(KeyError):
        items.row(renamed, 0)


def test_masks_tables_without_rows_give_an_empty_review(labels, tmp_path):
    folder = copy_labels(labels, tmp_path / "labels")
    for path in (folder / "masks").glob("*.parquet"):
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    app = ReviewApp(str(folder), reviewer="ann", device=None)
    assert len(app.items) == 0 and ("a.png", 0) not in app.items
    assert app.list_items({"pending": "1"})["total"] == 0 and app.items.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--service", "--no-fix"], "give one of them"),
        (["--service", "--device", "cpu"], "drop --device or --service"),
        (["--address", "127.0.0.1:1"], "add --service, or drop --address"),
    ],
)
def test_review_service_options_in_one_line(tmp_path, capsys, extra, message):
    from hqlabel.jobs.cli import main

    assert main(["review", str(tmp_path), "--port", "0", *extra]) == 2
    assert message in capsys.readouterr().err
