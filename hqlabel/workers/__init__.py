"""Pipeline steps and the thin worker classes that hold models.

Everything here is Ray-free: Ray Data runs these callables in tasks and actor pools (``hqlabel.jobs``
decides placement and resources), and tests call them directly.
"""

from hqlabel.workers.decode import decode_batch
from hqlabel.workers.labeler import Labeler, LabelWorker
from hqlabel.workers.writer import finalize_shard, write_parts

__all__ = ["LabelWorker", "Labeler", "decode_batch", "finalize_shard", "write_parts"]
