"""``python -m benchmarks.scale``: what a large job costs the driver.

Two sections, each run against this checkout or, with ``--code DIR``, another checkout of HQLabel (an older
commit, for a before/after comparison):

- ``jobs``: whole ``hqlabel label`` jobs on folders of N zero-byte ``.png`` files (every image becomes a
  decode-error row: the models never run, so the job is all listing, reading, bookkeeping and writing), each
  in a fresh process with its own local Ray (2 CPUs); the driver process's peak RSS (``ru_maxrss``: Ray's
  own processes not counted) and the wall time.
- ``s3_listing``: listing an S3 prefix of N zero-byte ``.png`` keys (``--s3-sizes``) on the loopback server
  into per-shard listing files, in a fresh process: its RSS before (imports done) and its peak RSS during the
  listing (Linux: the peak is reset first through ``/proc/self/clear_refs``), and the wall time.
- ``s3_requests``: a whole job from an S3 folder of ``--request-images`` 8 x 8 PNGs to an S3 output, through
  the counting proxy: storage requests per image and per shard, by kind (input reads, temporary parts, merged
  outputs, bookkeeping).
- ``rle_bytes``: bytes of a compressed COCO RLE mask as HQLabel stores it, for smooth objects (filled
  ellipses of 1-30 % of a 1024 x 768 image) and for the fine structures of ``hqlabel synth-data`` (thin lines,
  rings, lattices at 1024 x 1024: the costly kind).
- ``encoder_flops``: FLOPs of one 1024 x 1024 image through the SAM-HQ image encoder for ViT-B, -L and -H,
  counted by ``FlopCounterMode`` on the meta device (shapes only, no compute; the same counts as
  ``benchmarks.compute_limit`` measures on real tensors: 972 and 2,986 GFLOP for ViT-B and ViT-L).
- ``s3_start``: the start of a job on a Parquet dataset of ``--s3-shards`` one-row files on a loopback S3
  server (moto) behind a proxy that adds ``--latency`` seconds per request (S3's round trips are tens of
  ms, loopback's about one): seconds to list the input and prepare the output, for a fresh run and for a
  resumed one (nothing done yet), and the requests each made.

    python -m benchmarks.scale [--sizes 10000 100000 1000000] [--only jobs s3_start] [--code DIR]
        [--batch-size 64] [--s3-shards 2000] [--latency 0.02] [--out benchmarks/results/NAME.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.run import machine_info

SECTIONS = ("jobs", "s3_listing", "s3_start", "s3_requests", "rle_bytes", "encoder_flops")


def make_folder(root: Path, n: int, per_folder: int = 0) -> Path:
    """``n`` zero-byte ``.png`` files under ``root`` (flat, or ``per_folder`` to a subfolder)."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = root / f"d{i // per_folder:05d}" if per_folder else root
        if per_folder and i % per_folder == 0:
            folder.mkdir(exist_ok=True)
        (folder / f"image-{i:08d}.png").touch()
    marker.touch()
    return root


JOB_CHILD = """
import json, sys
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig

endpoint, data, out, shard_size = sys.argv[1:5]
spec = LabelJobSpec(input=data, out=out, labeler=LabelerConfig(classes="cat", preset="tiny-random"),
                    s3_endpoint=endpoint, num_cpus=2, shard_size=int(shard_size), batch_size=16)
summary = run_label_job(spec, progress=False)
print("RESULT " + json.dumps({"images": summary.images, "instances": summary.instances}))
"""


@contextlib.contextmanager
def s3_server(latency: float = 0.0):
    """A moto S3 server on loopback with a counting (and optionally slowing) proxy in front; yields
    ``(boto3 client of the server, proxy)``."""
    import boto3
    from moto.server import ThreadedMotoServer

    from benchmarks.s3proxy import S3Proxy

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = S3Proxy(f"http://{host}:{port}", latency=latency)
    try:
        yield boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1"), proxy
    finally:
        proxy.close()
        server.stop()


def run_s3_requests(images: int, shard_size: int, code: Path | None) -> dict:
    import numpy as np
    from PIL import Image

    with s3_server() as (client, proxy):
        client.create_bucket(Bucket="requests")
        rng = np.random.default_rng(0)
        for i in range(images):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            client.put_object(Bucket="requests", Key=f"data/{i:06d}.png", Body=buf.getvalue())
        proxy.reset()
        args = [proxy.endpoint, "s3://requests/data", "s3://requests/out", str(shard_size)]
        proc = subprocess.run(
            [sys.executable, "-c", JOB_CHILD, *args],
            capture_output=True,
            text=True,
            env=_child_env(code),
            cwd=code or Path.cwd(),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"s3_requests job failed: {proc.stderr[-2000:]}")
        requests = list(proxy.requests)
    kinds = {
        "input": lambda p: p.startswith("/requests/data"),
        "temporary_parts": lambda p: p.startswith("/requests/out/_tmp"),
        "listing": lambda p: p.startswith("/requests/out/_listing"),
        "outputs": lambda p: p.startswith(
            ("/requests/out/masks", "/requests/out/errors", "/requests/out/images")
        ),
    }
    shards = -(-images // shard_size)
    result: dict = {
        "images": {"value": images, "unit": "images"},
        "shards": {"value": shards, "unit": "shards"},
        "requests": {"value": len(requests), "unit": "requests"},
    }
    counted = 0
    for kind, match in kinds.items():
        n = sum(1 for _, path in requests if match(path))
        counted += n
        result[f"{kind}_requests_per_image"] = {"value": round(n / images, 3), "unit": "requests"}
    result["other_requests_per_shard"] = {
        "value": round((len(requests) - counted) / shards, 1),
        "unit": "requests",
    }
    for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        n = sum(1 for m, _ in requests if m == method)
        result[f"{method.lower()}_per_image"] = {"value": round(n / images, 3), "unit": "requests"}
    return result


def run_rle_bytes(n: int = 200) -> dict:
    import numpy as np
    from PIL import Image, ImageDraw

    from hqlabel.platform.rle import encode_mask
    from hqlabel.training.synthetic import make_fine_structure_image

    rng = np.random.default_rng(0)
    smooth = []
    for _ in range(n):
        canvas = Image.new("L", (1024, 768), 0)
        area = rng.uniform(0.01, 0.30) * 1024 * 768
        w = float(np.sqrt(area * rng.uniform(0.5, 2.0) * 4 / np.pi))
        h = 4 * area / (np.pi * w)
        x, y = rng.uniform(0, 1024 - min(w, 1000)), rng.uniform(0, 768 - min(h, 760))
        ImageDraw.Draw(canvas).ellipse([x, y, x + w, y + h], fill=1)
        smooth.append(len(encode_mask(np.asarray(canvas) > 0)["counts"]))
    fine = [
        len(instance.mask["counts"])
        for k in range(n // 2)
        for instance in make_fine_structure_image(k, size=1024).instances
    ]
    return {
        name: {
            "masks": {"value": len(sizes), "unit": "masks"},
            "median_bytes": {"value": float(np.median(sizes)), "unit": "bytes"},
            "p95_bytes": {"value": float(np.percentile(sizes, 95)), "unit": "bytes"},
        }
        for name, sizes in (("smooth_1024x768", smooth), ("fine_structures_1024", fine))
    }


def run_encoder_flops() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SamHQConfig, SamHQModel

    from benchmarks.compute_limit import _CUSTOM_FLOPS, VITS

    results = {}
    for vit, (hidden, depth, heads, global_attn) in VITS.items():
        vision = dict(
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            global_attn_indexes=global_attn,
        )
        config = SamHQConfig(vision_config=vision, mask_decoder_config=dict(vit_dim=hidden))
        with torch.device("meta"):
            model = SamHQModel(config)
            pixels = torch.empty(1, 3, 1024, 1024)
        counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
        with torch.inference_mode(), counter:
            model.get_image_embeddings(pixels)
        results[f"vit_{vit}"] = {
            "encoder_gflops_per_image": {"value": round(counter.get_total_flops() / 1e9, 1), "unit": "GFLOP"},
            "parameters_m": {
                "value": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "unit": "M",
            },
        }
    return results


CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig

idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
labeler = LabelerConfig(classes="cat", preset="tiny-random")
spec = LabelJobSpec(input=sys.argv[1], out=sys.argv[2], labeler=labeler, num_cpus=2, shard_size=1000,
                    batch_size=int(sys.argv[3]))
start = time.perf_counter()
summary = run_label_job(spec, progress=False)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
print("RESULT " + json.dumps({"wall_s": wall, "driver_peak_rss": peak, "driver_rss_before": idle,
                              "images": summary.images, "errors": summary.errors}))
"""


def _child_env(code: Path | None) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


def run_jobs(sizes: list[int], work: Path, code: Path | None, batch_size: int) -> dict:
    results = {}
    for n in sizes:
        folder = make_folder(work / f"flat-{n}", n)
        out = tempfile.mkdtemp(prefix=f"scale-out-{n}-", dir=work)
        cwd = code or Path.cwd()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), out, str(batch_size)],
            capture_output=True,
            text=True,
            env=_child_env(code),
            cwd=cwd,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results[str(n)] = {"error": proc.stderr[-2000:]}
            print(f"jobs {n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        got = json.loads(lines[-1][len("RESULT ") :])
        results[str(n)] = {
            "wall_s": {"value": round(got["wall_s"], 2), "unit": "s"},
            "driver_peak_rss_mib": {"value": round(got["driver_peak_rss"] / 2**20, 1), "unit": "MiB"},
            "driver_rss_before_mib": {"value": round(got["driver_rss_before"] / 2**20, 1), "unit": "MiB"},
            "images": {"value": got["images"], "unit": "images"},
            "batch_size": {"value": batch_size, "unit": "images"},
            "error_rows": {"value": got["errors"], "unit": "rows"},
        }
        print(f"jobs {n}: {results[str(n)]}", file=sys.stderr)
        subprocess.run(["rm", "-rf", out], check=False)
    return results


def _parquet_bytes(i: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": [f"img-{i}"], "image": [b""]}), buf)
    return buf.getvalue()


S3_CHILD = """
import inspect, json, sys, time
from hqlabel.jobs import label
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig

endpoint, dataset, out = sys.argv[1:4]
spec = LabelJobSpec(input=dataset, out=out, labeler=LabelerConfig(classes="cat", preset="tiny-random"),
                    s3_endpoint=endpoint)
new_api = len(inspect.signature(label.prepare_output).parameters) == 1

def start():
    if new_api:
        return label.prepare_output(spec)[1]
    from hqlabel.platform.readers import list_input
    source = list_input(spec.input, columns=spec.columns, options=spec.storage)
    return label.prepare_output(spec, source)

t = time.perf_counter(); pending = start(); fresh = time.perf_counter() - t
label._write_json(label.storage.join(out, "job.json"), {"spec": spec.model_dump(mode="json")}, spec)
print("MARK", flush=True); sys.stdin.readline()
t = time.perf_counter(); again = start(); resumed = time.perf_counter() - t
print("RESULT " + json.dumps({"fresh_s": fresh, "resume_s": resumed, "shards": len(pending),
                              "pending_after_resume": len(again)}), flush=True)
"""


S3_LISTING_CHILD = """
import json, resource, sys, tempfile, time
from hqlabel.platform.readers import list_input
from hqlabel.platform.storage import StorageOptions

def status(field):  # kB in /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

endpoint, uri = sys.argv[1:3]
import boto3, botocore  # imported before the peak is reset: the listing's cost only
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
start = time.perf_counter()
source = list_input(uri, listing=tempfile.mkdtemp(), options=StorageOptions(s3_endpoint=endpoint))
wall = time.perf_counter() - start
peak = status("VmHWM")
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss": peak, "rss_before": before,
                              "images": source.num_images, "shards": len(source.shards)}))
"""


def run_s3_listing(sizes: list[int], code: Path | None) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    results = {}
    with s3_server() as (client, proxy):
        client.create_bucket(Bucket="listing")
        done = 0
        for n in sorted(sizes):
            with ThreadPoolExecutor(16) as pool:
                keys = [f"data/image-{i:08d}.png" for i in range(done, n)]
                list(pool.map(lambda key: client.put_object(Bucket="listing", Key=key, Body=b""), keys))
            done = n
            proc = subprocess.run(
                [sys.executable, "-c", S3_LISTING_CHILD, proxy.endpoint, "s3://listing/data"],
                capture_output=True,
                text=True,
                env=_child_env(code),
                cwd=code or Path.cwd(),
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"s3_listing child failed: {proc.stderr[-2000:]}")
            got = json.loads(lines[-1][len("RESULT ") :])
            results[str(n)] = {
                "wall_s": {"value": round(got["wall_s"], 2), "unit": "s"},
                "peak_rss_mib": {"value": round(got["peak_rss"] / 2**20, 1), "unit": "MiB"},
                "rss_before_mib": {"value": round(got["rss_before"] / 2**20, 1), "unit": "MiB"},
                "images": {"value": got["images"], "unit": "images"},
                "shards": {"value": got["shards"], "unit": "shards"},
            }
            print(f"s3_listing {n}: {results[str(n)]}", file=sys.stderr)
    return results


def run_s3_start(shards: int, latency: float, code: Path | None) -> dict:
    with s3_server(latency) as (client, proxy):
        client.create_bucket(Bucket="scale")
        for i in range(shards):
            client.put_object(Bucket="scale", Key=f"dataset/part-{i:05d}.parquet", Body=_parquet_bytes(i))
        proxy.reset()
        proc = subprocess.Popen(
            [sys.executable, "-c", S3_CHILD, proxy.endpoint, "s3://scale/dataset", "s3://scale/out"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(code),
            cwd=code or Path.cwd(),
        )
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        fresh_requests = len(proxy.requests)
        if not line.startswith("MARK"):
            raise RuntimeError(f"s3_start child failed: {line}{proc.stderr.read()[-2000:]}")
        proxy.reset()
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=3600)
        resume_requests = len(proxy.requests)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"s3_start child failed: {err[-2000:]}")
        got = json.loads(lines[-1][len("RESULT ") :])
    return {
        "shards": {"value": shards, "unit": "shards"},
        "latency_per_request_ms": {"value": latency * 1000, "unit": "ms"},
        "fresh_start_s": {"value": round(got["fresh_s"], 2), "unit": "s"},
        "fresh_start_requests": {"value": fresh_requests, "unit": "requests"},
        "resume_start_s": {"value": round(got["resume_s"], 2), "unit": "s"},
        "resume_start_requests": {"value": resume_requests, "unit": "requests"},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--code", type=Path, help="another HQLabel checkout to measure (default: this one)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hqlabel-scale")
    parser.add_argument("--batch-size", type=int, default=64, help="jobs: images per batch")
    parser.add_argument("--s3-shards", type=int, default=2000)
    parser.add_argument("--s3-sizes", type=int, nargs="+", default=[10_000, 100_000], help="s3_listing")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added per S3 request")
    parser.add_argument("--request-images", type=int, default=2000, help="s3_requests: images in the job")
    parser.add_argument("--request-shard-size", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    code = args.code.resolve() if args.code else None
    report: dict = {"machine": machine_info("cpu"), "code": str(code or Path.cwd()), "results": {}}
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(code or Path.cwd()), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        report["commit"] = commit
    if "jobs" in args.only:
        report["results"]["jobs"] = run_jobs(args.sizes, args.work, code, args.batch_size)
    if "encoder_flops" in args.only:
        report["results"]["encoder_flops"] = run_encoder_flops()
    if "rle_bytes" in args.only:
        report["results"]["rle_bytes"] = run_rle_bytes()
    if "s3_listing" in args.only:
        report["results"]["s3_listing"] = run_s3_listing(args.s3_sizes, code)
    if "s3_requests" in args.only:
        report["results"]["s3_requests"] = run_s3_requests(args.request_images, args.request_shard_size, code)
    if "s3_start" in args.only:
        report["results"]["s3_start"] = run_s3_start(args.s3_shards, args.latency, code)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
