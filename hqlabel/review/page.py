"""The review page: one self-contained HTML document (no external resources) talking to the JSON API.

Keys: ``a`` accept, ``r`` reject, ``l`` relabel (then a digit or a click picks the class, Esc cancels),
``n`` / right arrow skip, ``p`` / left arrow back. Click on the image: left click adds a positive point,
shift-click or right click a negative one; each click re-runs HQ-SAM on the server and saves the corrected
mask. The next item's data and overlay are fetched while the current one is shown (prefetch).
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hqlabel review</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }
header { background: #222; color: #eee; padding: .5em 1em; display: flex; gap: 1em; align-items: center;
  flex-wrap: wrap; font-size: 14px; }
header input { width: 4.5em; } header label { white-space: nowrap; }
.warning { background: #fff3cd; border: 3px solid #d39e00; padding: .7em 1em; font-weight: bold; margin: 0; }
main { display: flex; gap: 1.5em; padding: 1em; align-items: flex-start; }
#view { position: relative; background: #111; padding: 6px; }
#overlay { display: block; width: 512px; image-rendering: pixelated; cursor: crosshair; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
#relabel { display: none; margin-top: .8em; } #relabel.open { display: block; }
#relabel button { margin: 2px; }
.keys { font-size: 13px; color: #555; margin-top: .8em; line-height: 1.6; }
kbd { background: #fff; border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; }
#message { font-weight: bold; min-height: 1.2em; }
.accept { color: #1a7f37; } .reject { color: #c62828; } .relabel { color: #8250df; }
</style></head>
<body>
<p class="warning" id="random-weights" hidden></p>
<header>
  <strong>hqlabel review</strong>
  <label>class <select id="label"><option value="">all</option></select></label>
  <label>score &ge; <input id="min-score" type="number" step="0.05" min="0" max="1"></label>
  <label>score &le; <input id="max-score" type="number" step="0.05" min="0" max="1"></label>
  <label><input id="pending" type="checkbox" checked> undecided only</label>
  <button id="apply">filter</button>
  <span id="position"></span>
</header>
<main>
  <div id="view"><img id="overlay" alt="the instance's mask over its image"></div>
  <div>
    <table id="details"></table>
    <div id="relabel"><div>new class: press its number, or click</div><div id="classes"></div></div>
    <p id="message"></p>
    <div class="keys"><kbd>a</kbd> accept &nbsp; <kbd>r</kbd> reject &nbsp; <kbd>l</kbd> relabel &nbsp;
      <kbd>n</kbd>/<kbd>&rarr;</kbd> skip &nbsp; <kbd>p</kbd>/<kbd>&larr;</kbd> back<br>
      click: add a point (object) &nbsp; shift-click / right click: a point (not the object)<br>
      each click re-runs HQ-SAM with the box and the points, and saves the corrected mask</div>
  </div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const review = { info: null, queue: [], pos: 0, offset: 0, skipped: 0, done: 0, pending: 0,
  prefetched: new Map(), relabeling: false, errors: [] };
window.review = review;
const key = (item) => item.image_id + "\u0000" + item.instance_id;
const current = () => review.queue[review.pos];
review.current = current;

async function api(path, body) {
  const init = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || response.statusText);
  return value;
}

function say(text, cls) { $("message").textContent = text; $("message").className = cls || ""; }

function overlayBlob(item) {  // the overlay PNG as an object URL, fetched once (prefetch shares it)
  const k = key(item) + "@" + item.overlay;
  if (!review.prefetched.has(k)) {
    review.prefetched.set(k, fetch(item.overlay).then((r) => {
      if (!r.ok) throw new Error("overlay " + r.status);
      return r.blob();
    }).then((b) => URL.createObjectURL(b)));
  }
  return review.prefetched.get(k);
}

function query() {
  const p = new URLSearchParams({ limit: "50" });
  if ($("label").value) p.set("label", $("label").value);
  if ($("min-score").value) p.set("min_score", $("min-score").value);
  if ($("max-score").value) p.set("max_score", $("max-score").value);
  if ($("pending").checked) p.set("pending", "1");
  return p;
}

async function fetchPage(offset) {
  const p = query(); p.set("offset", String(offset));
  return api("/api/items?" + p.toString());
}

async function reload() {
  review.offset = 0; review.skipped = 0;
  const page = await fetchPage(0);
  review.queue = page.items; review.pos = 0; review.total = page.total;
  await show();
}

async function more() {  // the next page of the ranking, after the last queued item
  const offset = $("pending").checked ? review.skipped : review.offset + review.queue.length;
  const page = await fetchPage(offset);
  const seen = new Set(review.queue.map(key));
  const fresh = page.items.filter((i) => !seen.has(key(i)));
  review.offset = offset; review.total = page.total;
  review.queue.push(...fresh);
  return fresh.length;
}

function details(item) {
  const rows = [["image", item.image_id], ["instance", item.instance_id], ["class", item.label],
    ["score", item.score.toFixed(3)], ["trust (lowest signal)", item.trust.toFixed(3)]];
  for (const s of review.info.signals) {
    if (s !== "score" && item[s] != null) rows.push([s, Number(item[s]).toFixed(3)]);
  }
  rows.push(["size", item.width + " x " + item.height], ["area", item.area]);
  const r = item.review;
  const decided = r.decision + (r.label ? " → " + r.label : "") + " by " + r.reviewer;
  rows.push(["decision", r.decision ? decided : "none"]);
  const fixed = "corrected (" + r.points.length + " points, by " + r.fixed_by + ")";
  rows.push(["mask", r.corrected ? fixed : "as labeled"]);
  const table = $("details"); table.replaceChildren();
  for (const [k, v] of rows) {
    const tr = table.insertRow(); const th = document.createElement("th"); th.textContent = k;
    tr.appendChild(th); tr.insertCell().textContent = String(v);
  }
}

async function show() {
  closeRelabel();
  const item = current();
  const where = `${review.pos + 1} of ${review.queue.length} queued, ${review.total} matching`;
  $("position").textContent = item ? where : "";
  if (!item) {
    $("overlay").removeAttribute("src"); $("details").replaceChildren();
    say("nothing left to review here"); return;
  }
  details(item);
  $("overlay").src = await overlayBlob(item);
  review.shown = key(item);
  prefetch();
}

async function prefetch() {  // the next item: its data (the next page if needed) and its overlay
  try {
    if (review.pos + 1 >= review.queue.length) await more();
    const next = review.queue[review.pos + 1];
    if (next) await overlayBlob(next);
  } catch (e) { review.errors.push(String(e)); }
}

async function next(skip) {
  if (skip && $("pending").checked) review.skipped += 1;
  if (review.pos + 1 >= review.queue.length) await more();
  if (review.pos + 1 < review.queue.length) review.pos += 1; else review.pos = review.queue.length;
  await show();
}

async function decide(decision, label) {
  const item = current(); if (!item) return;
  review.pending += 1;
  try {
    const body = { image_id: item.image_id, instance_id: item.instance_id, decision };
    if (label) body.label = label;
    const saved = await api("/api/decisions", body);
    review.queue[review.pos] = saved.items[0];
    say(decision + (label ? " → " + label : "") + ": " + item.image_id + " #" + item.instance_id, decision);
    review.done += 1;
    await next(false);
  } catch (e) { say(String(e.message || e), "reject"); review.errors.push(String(e)); }
  finally { review.pending -= 1; }
}

function openRelabel() {
  review.relabeling = true; $("relabel").className = "open";
  const box = $("classes"); box.replaceChildren();
  review.info.classes.forEach((name, k) => {
    const b = document.createElement("button");
    b.textContent = (k < 9 ? (k + 1) + " " : "") + name;
    b.onclick = () => { closeRelabel(); decide("relabel", name); };
    box.appendChild(b);
  });
}
function closeRelabel() { review.relabeling = false; $("relabel").className = ""; }

async function clickFix(event) {
  event.preventDefault();
  const item = current(); if (!item || !review.info.fix) return;
  const img = $("overlay"); const rect = img.getBoundingClientRect();
  const x = (event.clientX - rect.left) / rect.width * item.width;
  const y = (event.clientY - rect.top) / rect.height * item.height;
  const positive = event.button === 0 && !event.shiftKey;
  const points = item.review.points.concat([[x, y, positive ? 1 : 0]]);
  review.pending += 1;
  try {
    const fixed = await api("/api/fix", { image_id: item.image_id, instance_id: item.instance_id, points });
    review.queue[review.pos] = fixed.item;
    const iou = fixed.pred_iou.toFixed(3);
    say(`fixed: ${points.length} point(s), area ${fixed.area}, predicted IoU ${iou}`, "accept");
    review.fixes = (review.fixes || 0) + 1;
    await show();
  } catch (e) { say(String(e.message || e), "reject"); review.errors.push(String(e)); }
  finally { review.pending -= 1; }
}

function back() { if (review.pos > 0) { review.pos -= 1; show(); } }

document.addEventListener("keydown", (event) => {
  const typing = event.target.tagName === "INPUT" || event.target.tagName === "SELECT";
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  if (review.relabeling) {
    const k = Number(event.key);
    if (Number.isInteger(k) && k >= 1 && k <= Math.min(9, review.info.classes.length)) {
      closeRelabel(); decide("relabel", review.info.classes[k - 1]);
    } else if (event.key === "Escape") closeRelabel();
    event.preventDefault(); return;
  }
  const actions = { a: () => decide("accept"), r: () => decide("reject"), l: openRelabel,
    n: () => next(true), ArrowRight: () => next(true),
    p: back, ArrowLeft: back };
  if (actions[event.key]) { event.preventDefault(); actions[event.key](); }
});

$("overlay").addEventListener("click", clickFix);
$("overlay").addEventListener("contextmenu", clickFix);
$("apply").addEventListener("click", () => { $("apply").blur(); reload(); });

(async () => {
  try {
    review.info = await api("/api/info");
    if (review.info.random_weights) {
      $("random-weights").textContent = review.info.warning; $("random-weights").hidden = false;
    }
    for (const c of review.info.classes) {
      const o = document.createElement("option"); o.value = o.textContent = c; $("label").appendChild(o);
    }
    document.title = "hqlabel review: " + review.info.labels;
    await reload();
    review.ready = true;
  } catch (e) { say(String(e.message || e), "reject"); review.errors.push(String(e)); }
})();
</script>
</body></html>
"""
