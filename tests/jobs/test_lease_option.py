"""``--lease-ttl``: from the ``label`` command line into ``LabelJobSpec``; not an output field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hqlabel.jobs.cli import build_parser
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.lease import DEFAULT_TTL


def test_lease_ttl_option_and_field():
    args = build_parser().parse_args(["label", "in", "--out", "out", "--lease-ttl", "30"])
    assert args.lease_ttl == 30.0
    assert build_parser().parse_args(["label", "in", "--out", "out"]).lease_ttl is None  # the spec's default
    labeler = LabelerConfig(prompts="boxes", preset="tiny-random")
    assert LabelJobSpec(input="in", out="out", labeler=labeler).lease_ttl == DEFAULT_TTL
    assert LabelJobSpec(input="in", out="out", labeler=labeler, lease_ttl=30).lease_ttl == 30.0
    with pytest.raises(ValidationError, match="lease_ttl"):
        LabelJobSpec(input="in", out="out", labeler=labeler, lease_ttl=0)
    assert "lease_ttl" not in LabelJobSpec.OUTPUT_FIELDS  # a rerun with another ttl still resumes
