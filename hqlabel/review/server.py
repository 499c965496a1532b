"""``hqlabel review LABELS``: the review web app, a ``ThreadingHTTPServer`` over a labels folder.

``ReviewApp`` holds everything (the ranked items, the decisions store, the segmenter for click fixes) and
answers the JSON API; ``serve`` puts it behind HTTP. Routes (JSON unless said; errors are 4xx with
``{"error": "one line"}``):

    GET  /                                   the review page
    GET  /api/info                           job, classes, signals, counts, random_weights + warning
    GET  /api/items?offset=&limit=&label=&min_score=&max_score=&pending=1
                                             ranked items, least trustworthy first
    GET  /api/items/{image_id}/{instance_id} one item (image_id URL-encoded; it may contain "/")
    GET  /api/overlay.png?image_id=&instance_id=   the image with the item's mask (corrected if fixed)
    POST /api/decisions                      {"image_id","instance_id","decision","label"?, "reviewer"?}
                                             or a list of them (one file); decision accept | reject | relabel
    POST /api/fix                            {"image_id","instance_id","points":[[x,y,1|0],...],"reviewer"?}
                                             re-runs HQ-SAM with the item's box and the points; saves the mask
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from hqlabel.platform import storage
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.storage import StorageOptions
from hqlabel.review.items import ReviewItems
from hqlabel.review.page import PAGE
from hqlabel.review.render import overlay_masks
from hqlabel.review.store import DECISIONS, ReviewStore

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "ReviewApp", "make_server", "serve"]

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this job was labeled with randomly initialised models (preset tiny-random); its masks "
    "and scores are meaningless, and so are click fixes. Review them only to test the tools."
)
MAX_LIMIT = 500
MAX_BODY_BYTES = 1 << 20
MAX_POINTS = 64
MAX_SIDE = 1024  # overlays are downscaled to this longer side
MIN_SIDE = 512  # and enlarged by a whole factor towards this one


class ApiError(Exception):
    """A bad request: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ReviewApp:
    """The review of one labels folder: items, decisions, fixes.

    Args:
        labels: a labeling job's ``--out`` folder (local or ``s3://``).
        reviewer: the name recorded with decisions that do not bring their own.
        images: the job's input, if it moved since labeling.
        device: where the click-fix segmenter runs; None: no click fixes (``/api/fix`` answers 409).
        make_fixer: builds the click fixer from the job's labeler config (``job.json`` ``spec.labeler``)
            instead of a local ``Fixer`` on ``device``: anything with ``Fixer.fix``'s signature, e.g.
            ``hqlabel.jobs.service_client.ServiceFixer`` (``hqlabel review --service``).
    """

    def __init__(
        self,
        labels: str,
        *,
        reviewer: str,
        options: StorageOptions = StorageOptions(),
        images: str | None = None,
        device: str | None = "auto",
        make_fixer: Callable[[dict[str, Any]], Any] | None = None,
    ):
        if not reviewer.strip():
            raise ValueError("--reviewer is empty; give a name, e.g. --reviewer alice")
        self.reviewer = reviewer.strip()
        self.items = ReviewItems(labels, options, images)
        self.store = ReviewStore(storage.join(self.items.folder.uri, "review"), options)
        self.fixer = None
        if make_fixer is not None:
            self.fixer = make_fixer(self.items.spec.get("labeler", {}))
        elif device is not None:
            from hqlabel.review.fix import Fixer

            self.fixer = Fixer(self.items.spec.get("labeler", {}), device)

    # ---- reading ----

    def info(self) -> dict[str, Any]:
        self.store.refresh()
        decided = sum(1 for k, s in self.store.snapshot().items() if s.decision and k in self.items)
        return {
            "labels": self.items.folder.uri,
            "review": self.store.uri,
            "reviewer": self.reviewer,
            "classes": self.items.classes,
            "signals": self.items.signals,
            "models": self.items.models,
            "total": len(self.items),
            "decided": decided,
            "fix": self.fixer is not None,
            **self._weights(),
        }

    def _weights(self) -> dict[str, Any]:
        random = self.items.random_weights
        return {"random_weights": random, "warning": RANDOM_WEIGHTS_WARNING if random else None}

    def item(self, image_id: str, instance_id: int) -> dict[str, Any]:
        key = (image_id, instance_id)
        if key not in self.items:
            raise ApiError(404, f"no instance {instance_id} of image {image_id!r} in {self.items.folder.uri}")
        row = self.items.row(*key)
        state = self.store.state(*key)
        out = {
            k: _json_value(v)
            for k, v in row.items()
            if k not in ("mask", "_row") and not k.startswith("trust_")
        }
        out["height"], out["width"] = (int(v) for v in row["mask"]["size"])
        out["review"] = state.to_json()
        out["overlay"] = "/api/overlay.png?" + urllib.parse.urlencode(
            {
                "image_id": image_id,
                "instance_id": instance_id,
                "v": state.fixed_time.isoformat() if state.fixed_time else 0,
            }
        )
        return out

    def list_items(self, query: dict[str, str]) -> dict[str, Any]:
        offset = _int_param(query, "offset", 0, 0)
        limit = _int_param(query, "limit", 50, 1)
        if limit > MAX_LIMIT:
            raise ApiError(400, f"limit {limit} is over {MAX_LIMIT}; page with offset")
        label = query.get("label") or None
        if label is not None and label not in self.items.classes:
            raise ApiError(
                400, f"label {label!r} is not a class of this job ({', '.join(self.items.classes)})"
            )
        min_score, max_score = _float_param(query, "min_score"), _float_param(query, "max_score")
        pending = query.get("pending", "0") not in ("0", "", "false")
        self.store.refresh()
        states = self.store.snapshot().items() if pending else ()
        decided = [k for k, state in states if state.decision is not None]
        chosen = self.items.select(label, min_score, max_score, exclude=decided)
        page = [self.item(*self.items.key(k)) for k in chosen[offset : offset + limit]]
        return {"total": len(chosen), "offset": offset, "limit": limit, "items": page, **self._weights()}

    def overlay_png(self, image_id: str, instance_id: int) -> bytes:
        self._key({"image_id": image_id, "instance_id": instance_id}, "")  # 404 first
        row = self.items.row(image_id, instance_id)
        state = self.store.state(image_id, instance_id)
        try:
            image = self.items.image(image_id)
        except ValueError as e:
            raise ApiError(410, str(e)) from None
        mask = decode_mask(state.mask if state.corrected else row["mask"], max_pixels=self.items.max_pixels)
        if mask.shape != image.shape[:2]:
            raise ApiError(410, f"image {image_id!r} is {image.shape[:2]} now, {mask.shape} when labeled")
        label = state.label if state.decision == "relabel" else row["label"]
        caption = f"{label} {row['score']:.2f}" + (" (fixed)" if state.corrected else "")
        height, width = image.shape[:2]
        # small images are enlarged (whole pixels, nearest) so that caption and points stay readable; large
        # ones shrink to MAX_SIDE. The page maps clicks through the item's width and height, not this size.
        scale = (
            MAX_SIDE / max(height, width)
            if max(height, width) > MAX_SIDE
            else max(1, MIN_SIDE // max(height, width))
        )
        if scale != 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            up = scale > 1
            image = np.asarray(
                Image.fromarray(image).resize(
                    size, Image.Resampling.NEAREST if up else Image.Resampling.BILINEAR
                )
            )
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        canvas = overlay_masks(
            image,
            [mask],
            boxes=[tuple(float(v) * scale for v in row["box"])],
            captions=[caption],
            points=[(x * scale, y * scale, int(v)) for x, y, v in state.points],
        )
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()

    # ---- writing ----

    def decide(self, body: Any) -> dict[str, Any]:
        entries = body if isinstance(body, list) else [body]
        if not entries:
            raise ApiError(400, "an empty list of decisions; send one object or a non-empty list")
        events = []
        for k, entry in enumerate(entries):
            where = f"decision {k}: " if isinstance(body, list) else ""
            image_id, instance_id = self._key(entry, where)
            decision = entry.get("decision")
            if decision not in DECISIONS:
                raise ApiError(400, f"{where}decision {decision!r} is not one of {', '.join(DECISIONS)}")
            label = entry.get("label")
            if decision == "relabel":
                if not isinstance(label, str) or not label.strip():
                    raise ApiError(400, f'{where}relabel needs a non-empty "label" (the new class)')
                label = label.strip()
            else:
                label = None
            events.append(
                {
                    "image_id": image_id,
                    "instance_id": instance_id,
                    "action": decision,
                    "label": label,
                    "reviewer": self._reviewer(entry, where),
                }
            )
        file = self.store.append(events)
        saved = [self.item(e["image_id"], e["instance_id"]) for e in events]
        return {"saved": len(events), "file": file, "items": saved}

    def fix(self, body: Any) -> dict[str, Any]:
        if self.fixer is None:
            raise ApiError(409, "click fixes are off on this server (started with --no-fix)")
        image_id, instance_id = self._key(body, "")
        points = body.get("points")
        if not isinstance(points, list) or not 1 <= len(points) <= MAX_POINTS:
            raise ApiError(
                400, f"points must be a list of 1 to {MAX_POINTS} [x, y, 1|0] (1 = object, 0 = not)"
            )
        row = self.items.row(image_id, instance_id)
        height, width = (int(v) for v in row["mask"]["size"])
        clean = []
        for point in points:
            ok = isinstance(point, list) and len(point) == 3 and all(_is_number(v) for v in point)
            if not ok or point[2] not in (0, 1) or not (0 <= point[0] <= width and 0 <= point[1] <= height):
                raise ApiError(
                    400, f"point {point!r} is not [x, y, 1|0] inside the {width} x {height} image (pixels)"
                )
            clean.append((float(point[0]), float(point[1]), int(point[2])))
        try:
            image = self.items.image(image_id)
        except ValueError as e:
            raise ApiError(410, str(e)) from None
        rle, area, iou = self.fixer.fix(image_id, image, [float(v) for v in row["box"]], clean)
        self.store.append(
            [
                {
                    "image_id": image_id,
                    "instance_id": instance_id,
                    "action": "fix",
                    "mask": rle,
                    "area": area,
                    "pred_iou": iou,
                    "points": [list(p) for p in clean],
                    "reviewer": self._reviewer(body, ""),
                }
            ]
        )
        return {"area": area, "pred_iou": iou, "item": self.item(image_id, instance_id)}

    def _key(self, entry: Any, where: str) -> tuple[str, int]:
        if not isinstance(entry, dict):
            raise ApiError(
                400, f"{where}expected a JSON object with image_id and instance_id, got {entry!r:.80}"
            )
        image_id, instance_id = entry.get("image_id"), entry.get("instance_id")
        if not isinstance(image_id, str) or isinstance(instance_id, bool) or not isinstance(instance_id, int):
            raise ApiError(400, f"{where}image_id must be a string and instance_id an integer")
        if (image_id, instance_id) not in self.items:
            raise ApiError(
                404, f"{where}no instance {instance_id} of image {image_id!r} in this labels folder"
            )
        return image_id, instance_id

    def _reviewer(self, entry: dict[str, Any], where: str) -> str:
        reviewer = entry.get("reviewer", self.reviewer)
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise ApiError(400, f"{where}reviewer must be a non-empty string (or left out: the server's)")
        return reviewer.strip()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_param(query: dict[str, str], name: str, default: int, lowest: int) -> int:
    text = query.get(name)
    if text in (None, ""):
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name}={text!r} is not an integer") from None
    if value < lowest:
        raise ApiError(400, f"{name}={value} is below {lowest}")
    return value


def _float_param(query: dict[str, str], name: str) -> float | None:
    text = query.get(name)
    if text in (None, ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ApiError(400, f"{name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ApiError(400, f"{name}={text!r} is not a finite number")
    return value


class _Handler(BaseHTTPRequestHandler):
    app: ReviewApp  # set on the subclass that make_server builds
    server_version = "hqlabel-review"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        path = url.path
        try:
            if method == "GET" and path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif method == "GET" and path == "/api/info":
                self._json(200, self.app.info())
            elif method == "GET" and path == "/api/items":
                self._json(200, self.app.list_items(query))
            elif method == "GET" and path.startswith("/api/items/"):
                image_id, _, instance = path.removeprefix("/api/items/").rpartition("/")
                self.app.store.refresh()  # what other servers and scripts wrote since
                self._json(200, self.app.item(urllib.parse.unquote(image_id), _instance(instance)))
            elif method == "GET" and path == "/api/overlay.png":
                key = (query.get("image_id", ""), _instance(query.get("instance_id", "")))
                self._send(200, self.app.overlay_png(*key), "image/png")
            elif method == "POST" and path == "/api/decisions":
                self._json(200, self.app.decide(self._body()))
            elif method == "POST" and path == "/api/fix":
                self._json(200, self.app.fix(self._body()))
            else:
                raise ApiError(404, f"no route {method} {path}; see the API in README.md (section Review)")
        except ApiError as e:
            self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # the server keeps serving; the client hears what broke, the log has the trace
            logger.exception("review: %s %s failed", method, self.path)
            self._json(500, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length is not an integer") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(
                413, f"request body of {length} bytes is over {MAX_BODY_BYTES}; send smaller batches"
            )
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e})") from None

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


def _instance(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"instance_id {text!r} is not an integer") from None


def make_server(app: ReviewApp, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A threading HTTP server for ``app`` bound to ``host:port`` (port 0: any free port; see
    ``server.server_address``); not yet serving (call ``serve_forever``)."""
    handler = type("ReviewHandler", (_Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(app: ReviewApp, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve ``app`` until interrupted (Ctrl-C)."""
    server = make_server(app, host, port)
    address = f"http://{host}:{server.server_address[1]}/"
    print(f"reviewing {app.items.folder.uri} ({len(app.items)} masks) at {address}; Ctrl-C stops", flush=True)
    if app.items.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread
