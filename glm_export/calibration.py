"""qdq-int8's calibration data: real text in the model's language run through the parent's own context passes
and decode steps (glm_export.compare's calls), recorded as feeds, and checked against the graph's IO table.
In: the parent session, its tokenizer, calibration text (default: the held-out half the accuracy report never
reads), a file, or prepared feeds. Out: feeds for ONNX Runtime's static quantizer and a record of their source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_export.compare import blank_calls, heldout_text, run_calls, strip_provenance, text_windows
from glm_export.derive import QuantizeError
from glm_runtime.iotable import required_inputs
from glm_runtime.manifest import sha256_file
from glm_runtime.prefix import prefix_length

MIN_CALIBRATION_TOKENS = 256  # fewer real tokens than this gives scales from a handful of activations
MIN_CALIBRATION_CALLS = 8
CALIBRATION_WINDOW = 32  # tokens per calibration window: half context pass, half span (multi-token + decode steps)


class FeedReader:
    """onnxruntime CalibrationDataReader over prepared feed dicts (get_next -> feeds or None)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self.feeds, self.pos = list(feeds), 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return dict(self.feeds[self.pos - 1])

    def rewind(self) -> None:
        self.pos = 0


def calibration_feeds(parent: Any, tok: Any, text: str, source: str) -> list[dict[str, np.ndarray]]:
    """Real text through the model's own IO (glm_export.compare's calls on the parent session): per window, a
    context pass (past empty), a multi-token span call and two single-token decode steps (past non-empty),
    each past made by the fp32 parent itself."""
    chunks = text_windows(tok, text, parent.config.vocab_size, CALIBRATION_WINDOW, 64)
    tokens = len(chunks) * CALIBRATION_WINDOW
    if tokens < MIN_CALIBRATION_TOKENS:
        raise QuantizeError(
            f"calibration text {source} gives {tokens} tokens in whole windows; qdq-int8 needs at "
            f"least {MIN_CALIBRATION_TOKENS} tokens of real text (pass a longer --calibration file)"
        )
    feeds: list[dict[str, np.ndarray]] = []
    for chunk in chunks:
        (context, span), _ = blank_calls(tok, chunk)
        t = span.input_ids.shape[1]
        pieces = [(0, t - 2), (t - 2, t - 1), (t - 1, t)]  # a multi-token chunk, then two decode steps
        calls = [context] + [
            type(span)(
                span.input_ids[:, lo:hi],
                span.position_ids[:, :, lo:hi],
                span.block[:, lo:hi, lo:hi],
                span.keep[:, lo:hi],
            )
            for lo, hi in pieces
        ]
        run_calls(parent, calls, record=feeds)
    return feeds


def check_calibration_feeds(feeds: Sequence[Mapping[str, Any]], io: Mapping[str, Any], prefix: int = 0) -> None:
    """Every feed must match the IO table (names, dtypes, ranks, fixed dims, total = past + seq), and the set
    must cover both a context pass (past 0, or `prefix`: a P-tuning prefix's slots) and a decode step (more)."""
    if len(feeds) < MIN_CALIBRATION_CALLS:
        raise QuantizeError(
            f"calibration has {len(feeds)} feeds; qdq-int8 needs at least {MIN_CALIBRATION_CALLS} "
            f"(context passes and decode steps of real text)"
        )
    entries = {e["name"]: e for e in io["inputs"]}
    required = {e["name"] for e in required_inputs(io)}  # logits_start is optional
    pasts = set()
    for k, feed in enumerate(feeds):
        if not required <= set(feed) <= set(entries):
            diff = sorted((required - set(feed)) | (set(feed) - set(entries)))
            raise QuantizeError(f"calibration feed {k}: names differ from the graph inputs at {diff[:3]}")
        dims: dict[str, int] = {}
        for name, entry in entries.items():
            if name not in feed:
                continue
            value = np.asarray(feed[name])
            if value.dtype.name != entry["dtype"] or value.ndim != len(entry["shape"]):
                raise QuantizeError(
                    f"calibration feed {k}: {name} is {value.dtype.name} of shape {list(value.shape)}, "
                    f"the graph takes {entry['dtype']} {entry['shape']}"
                )
            for want, got in zip(entry["shape"], value.shape):
                if isinstance(want, int) and want != got or dims.setdefault(str(want), got) != got:
                    raise QuantizeError(
                        f"calibration feed {k}: {name} has shape {list(value.shape)}, which does "
                        f"not fit {entry['shape']} (dims so far {dims})"
                    )
        if dims["total_seq"] != dims["past_seq"] + dims["seq"]:
            raise QuantizeError(
                f"calibration feed {k}: attention_mask covers {dims['total_seq']} keys, not "
                f"past {dims['past_seq']} + seq {dims['seq']}"
            )
        pasts.add(dims["past_seq"] > prefix)
    if pasts != {False, True}:
        raise QuantizeError(
            f"calibration feeds must include context passes (past_seq {prefix}) and decode steps "
            f"(past_seq > {prefix}), so the scales cover both shapes"
        )


def calibration_data(parent: Any, tok: Any, calibration) -> tuple[list[dict], dict[str, Any]]:
    if calibration is None:
        text, record = heldout_text(tok.kind, half=0)  # the half the accuracy report never reads
        feeds = calibration_feeds(parent, tok, text, record["source"])
    elif isinstance(calibration, (str, Path)):
        path = Path(calibration)
        if not path.is_file():
            raise QuantizeError(f"calibration file {path} does not exist; pass a text file of real text")
        try:
            text = strip_provenance(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise QuantizeError(
                f"calibration file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
            ) from None
        if not text.strip():
            raise QuantizeError(f"calibration file {path} is empty: qdq-int8 will not invent scales without data")
        feeds = calibration_feeds(parent, tok, text, str(path))
        record = {"source": str(path), "sha256": sha256_file(path)}
    else:
        feeds = list(calibration)
        record = {"source": "feeds given by the caller"}
    if not feeds:
        raise QuantizeError("no calibration data: qdq-int8 needs real text (a file) or feeds, never random scales")
    check_calibration_feeds(feeds, parent.io, prefix_length(parent))
    record.update(calls=len(feeds), tokens=int(sum(f["input_ids"].size for f in feeds)))
    return feeds, record
