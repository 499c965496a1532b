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


def test_a_second_label_run_into_the_same_out_is_refused_before_it_writes(image_folder, tmp_path, capsys):
    """The real command while another run holds the output's lease: one line naming the holder, and the
    output untouched (no manifest, no listing: a fresh start would have deleted the other run's work)."""
    from hqlabel.jobs.cli import main
    from hqlabel.platform.lease import OutputLease

    out = tmp_path / "out"
    with OutputLease(str(out), what="the other run") as other:
        code = main(
            ["label", str(image_folder), "--classes", "cat", "--preset", "tiny-random", "--out", str(out)]
        )
        err = capsys.readouterr().err
        assert code == 2 and other.run_id in err and "the other run" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == ["_lease.json"]
