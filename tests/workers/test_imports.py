"""The read/decode/write steps run in task processes that must not pay for importing torch and transformers
(seconds per fresh worker process on a small machine); only the model actor needs them."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_io_steps_do_not_import_torch_and_workers_not_ray():
    code = (
        "import sys\n"
        "from hqlabel.workers import decode_batch, finalize_shard, write_parts\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "from hqlabel.workers import LabelWorker\n"
        "assert 'torch' in sys.modules\n"
        "from hqlabel.workers.labeler import ray_node_id\n"
        "assert ray_node_id() is None and 'ray' not in sys.modules  # outside Ray, never imports it\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_names_still_raise_attribute_error():
    import hqlabel.workers

    with pytest.raises(AttributeError, match="no_such_step"):
        hqlabel.workers.no_such_step  # noqa: B018
