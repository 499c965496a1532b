"""Ray-free measurements: the pipeline's stages called directly, the plain-transformers baseline loop, and
the encoder/decoder cost per box."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

CLASSES = ["circle", "square", "triangle"]


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that wall-clock timers measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Accumulates wall-clock seconds per name (``with timer("decode"): ...``)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._name = ""

    def __call__(self, name: str) -> Timer:
        self._name = name
        return self

    def __enter__(self) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start


def metric(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit}


def source_table(paths: list[Path], shard: str = "00000") -> pa.Table:
    """``SOURCE_SCHEMA`` rows with the images' bytes inline (file reads are not part of the stage timings)."""
    from hqlabel.platform.schema import SOURCE_SCHEMA

    rows = []
    for path in paths:
        row = dict.fromkeys(SOURCE_SCHEMA.names)
        row.update(shard=shard, image_id=path.name, image=path.read_bytes())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def measure_stages(paths: list[Path], detector, segmenter, *, batch_size: int = 8, threads: int = 1) -> dict:
    """Seconds per stage of the pipeline's code path (what a ``LabelWorker`` and the write tasks run), on
    ``paths``, with ``threads`` torch threads (the CPU actor's count on this machine)."""
    from hqlabel.platform.rle import encode_masks, mask_area
    from hqlabel.platform.schema import RESULT_SCHEMA
    from hqlabel.workers.decode import decode_batch
    from hqlabel.workers.writer import finalize_shard, write_parts

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    timer = Timer(segmenter.device)
    source = source_table(paths)
    results, num_boxes = [], 0
    try:
        for start in range(0, len(paths), batch_size):
            with timer("decode"):
                decoded = decode_batch(source.slice(start, batch_size)).to_pylist()
            images = [
                np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3) for r in decoded
            ]
            with timer("detector"):
                detections = detector.detect(images, CLASSES)
            with timer("encoder"):
                embeddings = segmenter.embed(images)
            with timer("decoder"):
                logits = segmenter.predict_boxes(embeddings, [d.boxes for d in detections])
            for row, image, dets, mask_logits in zip(decoded, images, detections, logits, strict=True):
                num_boxes += len(dets.boxes)
                with timer("upsample_rle"):  # as in Labeler.label: masks, RLE and areas
                    rles = []
                    for chunk in segmenter.iter_masks(mask_logits, image.shape[:2]):
                        rles += encode_masks(chunk[:, 0].cpu().numpy())
                    areas = [mask_area(rle) for rle in rles]
                iou = mask_logits.iou_scores[:, 0].float().cpu().tolist()
                out = dict.fromkeys(RESULT_SCHEMA.names)
                out.update({k: row[k] for k in ("shard", "row", "image_id") if k in row})
                out.update(height=row["orig_height"], width=row["orig_width"])
                out["instances"] = [
                    {
                        "instance_id": k,
                        "label": CLASSES[int(dets.labels[k])],
                        "score": float(dets.scores[k]),
                        "box": [float(v) for v in dets.boxes[k]],
                        "mask": rle,
                        "area": areas[k],
                        "pred_iou": iou[k],
                    }
                    for k, rle in enumerate(rles)
                ]
                results.append(out)
        table = pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
        with tempfile.TemporaryDirectory() as out_dir, timer("write"):
            for start in range(0, table.num_rows, max(batch_size, 32)):  # the pipeline's write batch size
                write_parts(table.slice(start, max(batch_size, 32)), out=out_dir)
            marker = finalize_shard(out_dir, "00000", len(paths))
        if marker is None:
            raise RuntimeError("finalize_shard did not complete the benchmark shard")
    finally:
        torch.set_num_threads(previous)
    total = sum(timer.seconds.values())
    n = len(paths)
    out = {
        "images": metric(n, "images"),
        "boxes": metric(num_boxes, "boxes"),
        "torch_threads": metric(threads, "threads"),
        "total": metric(total, "s"),
        "images_per_s": metric(n / total, "images/s"),
    }
    for name, seconds in timer.seconds.items():
        out[f"{name}_s"] = metric(seconds, "s")
        out[f"{name}_s_per_image"] = metric(seconds / n, "s/image")
        out[f"{name}_fraction"] = metric(seconds / total, "fraction of total")
    out["decoder_s_per_box"] = metric(timer.seconds["decoder"] / max(num_boxes, 1), "s/box")
    rle_write = timer.seconds["upsample_rle"] + timer.seconds["write"]
    out["rle_plus_write_fraction"] = metric(rle_write / total, "fraction of total")
    return out


def mask_parity(paths: list[Path], detector, segmenter, *, batch_size: int = 8) -> dict:
    """``iter_masks`` against transformers' own SAM post-processing (``post_process_masks``: bilinear to the
    padded size, crop, bilinear to the output size, threshold) on the benchmark images' boxes: mean and
    minimum mask IoU, and the fraction of pixels that differ."""
    from PIL import Image

    post_process = segmenter.processor.image_processor.post_process_masks
    ious, differing, pixels = [], 0, 0
    for start in range(0, len(paths), batch_size):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]
        detections = detector.detect(images, CLASSES)
        logits = segmenter.predict_boxes(segmenter.embed(images), [d.boxes for d in detections])
        for image, mask_logits in zip(images, logits, strict=True):
            if not len(mask_logits):
                continue
            size = image.shape[:2]
            new = torch.cat(list(segmenter.iter_masks(mask_logits, size)))[:, 0].flatten(1)
            ref = post_process(
                [mask_logits.logits],
                [size],
                [mask_logits.reshaped_size],
                mask_threshold=segmenter.mask_threshold,
            )[0][:, 0].flatten(1)
            union = (new | ref).sum(1)
            iou = torch.where(union > 0, (new & ref).sum(1) / union.clamp(min=1), 1.0)
            ious += iou.tolist()
            differing += int((new ^ ref).sum())
            pixels += new.numel()
    return {
        "masks": metric(len(ious), "masks"),
        "mean_iou": metric(float(np.mean(ious)), "IoU (iter_masks vs transformers post_process_masks)"),
        "min_iou": metric(float(np.min(ious)), "IoU"),
        "differing_pixels": metric(differing / max(pixels, 1), "fraction of mask pixels"),
    }


def baseline_loop(
    paths: list[Path],
    detector,
    segmenter,
    out_file: Path,
    *,
    box_threshold: float = 0.35,
    text_threshold: float = 0.25,
    max_boxes: int | None = None,
) -> dict:
    """The loop a user writes with transformers alone, image by image, with the same models and inputs:
    PIL -> Grounding DINO processor + model -> post-processing -> SAM-HQ processor(boxes) + model ->
    ``post_process_masks`` -> pycocotools RLE -> rows -> one Parquet file at the end. ``max_boxes`` keeps
    each image's best-scored boxes (the pipeline's ``max_detections``): the post-processing threshold is
    lowered to just under the k-th best query's score, so that post-processing handles about k boxes rather
    than all 900 queries."""
    import pyarrow.parquet as pq
    from PIL import Image
    from pycocotools import mask as mask_utils

    det_model, det_proc = detector.model, detector.processor
    sam_model, sam_proc = segmenter.model, segmenter.processor
    device = segmenter.device
    prompt = ". ".join(CLASSES) + "."
    rows = []
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            inputs = det_proc(images=image, text=prompt, return_tensors="pt").to(device)
            outputs = det_model(**inputs)
            threshold = box_threshold
            if max_boxes is not None:  # lower the threshold to just under the k-th best query's score
                best = outputs.logits[0].sigmoid().amax(-1).topk(min(max_boxes, outputs.logits.shape[1]))
                threshold = max(box_threshold, float(best.values[-1]) - 1e-6)
            det = det_proc.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=threshold,
                text_threshold=text_threshold,
                target_sizes=[image.size[::-1]],
            )[0]
            if max_boxes is not None:
                best = det["scores"].argsort(descending=True)[:max_boxes].tolist()
                det = {k: [v[i] for i in best] if isinstance(v, list) else v[best] for k, v in det.items()}
            boxes = det["boxes"].cpu()
            if len(boxes) == 0:
                continue
            sam_inputs = sam_proc(image, input_boxes=[boxes.tolist()], return_tensors="pt").to(device)
            sam_out = sam_model(**sam_inputs, multimask_output=False)
            masks = sam_proc.post_process_masks(
                sam_out.pred_masks.cpu(),
                sam_inputs["original_sizes"].cpu(),
                sam_inputs["reshaped_input_sizes"].cpu(),
            )[0][:, 0]
            rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
            iou = sam_out.iou_scores[0, :, 0].cpu().tolist()
            for k, rle in enumerate(rles):
                rows.append(
                    {
                        "image_id": path.name,
                        "instance_id": k,
                        "label": det["text_labels"][k] if "text_labels" in det else str(det["labels"][k]),
                        "score": float(det["scores"][k]),
                        "box": boxes[k].tolist(),
                        "mask": {"size": list(rle["size"]), "counts": rle["counts"]},
                        "area": int(mask_utils.area(rle)),
                        "pred_iou": iou[k],
                    }
                )
    pq.write_table(pa.Table.from_pylist(rows), out_file)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "images": metric(len(paths), "images"),
        "boxes": metric(len(rows), "boxes"),
        "torch_threads": metric(torch.get_num_threads(), "threads"),
        "seconds": metric(seconds, "s"),
        "images_per_s": metric(len(paths) / seconds, "images/s"),
    }


def _median_seconds(fn: Callable[[], object], repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cost_per_box(
    image: np.ndarray, segmenter, counts=(1, 10, 100), repeats: int = 3, threads: int = 1
) -> dict:
    """Encoder vs decoder seconds on one image for each number of boxes, and how often the encoder ran
    (counted by a forward hook) when ``Labeler.label`` segments all the boxes of that image."""
    from hqlabel.workers.labeler import Labeler

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls = [0]
    hook = segmenter.model.vision_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    labeler = Labeler(None, segmenter, ["object"])
    out: dict = {"torch_threads": metric(threads, "threads"), "repeats": metric(repeats, "runs (median)")}
    try:
        segmenter.embed([image])  # warm-up
        embeddings = segmenter.embed([image])
        encoder = _median_seconds(lambda: segmenter.embed([image]), repeats, segmenter.device)
        out["encoder_s"] = metric(encoder, "s/image")
        for n in counts:
            xy = rng.uniform(0, 1, size=(n, 2, 2)) * np.array([w, h])
            boxes = torch.as_tensor(np.concatenate([xy.min(1), xy.max(1) + 1], 1), dtype=torch.float32)
            decoder = _median_seconds(
                lambda boxes=boxes: segmenter.predict_boxes(embeddings, [boxes]), repeats, segmenter.device
            )
            calls[0] = 0
            start = time.perf_counter()
            labeler.label([image], boxes=[(boxes.tolist(), ["object"] * n)])
            label_s = time.perf_counter() - start
            out[f"boxes_{n}"] = {
                "decoder_s": metric(decoder, "s"),
                "decoder_s_per_box": metric(decoder / n, "s/box"),
                "decoder_over_encoder": metric(decoder / encoder, "ratio"),
                "label_s": metric(label_s, "s (encoder + decoder + upsample + RLE)"),
                "encoder_calls": metric(calls[0], "calls for 1 image"),
            }
    finally:
        hook.remove()
        torch.set_num_threads(previous)
    return out
