"""``hqlabel status`` text: images that failed are not counted as labeled."""

from hqlabel.jobs.status import JobStatus


def test_failed_images_are_not_counted_as_labeled():
    status = JobStatus("out", 3, 3, 11, 11, 20, errors_by_stage={"decode": 3, "read": 1})
    text = str(status)
    assert "images:    11/11 done: 7 labeled, 4 failed" in text and "errors:    4 (decode 3, read 1)" in text
    assert "images:    5/11 labeled" in str(JobStatus("out", 3, 1, 11, 5, 2))  # no failures
