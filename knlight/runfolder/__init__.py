"""An attribution run's output folder: its files and line format, its lock, its records (pure Python).

See :mod:`knlight.runfolder.format`, :mod:`knlight.runfolder.lock` and :mod:`knlight.runfolder.records`.
"""

from knlight.runfolder.format import (
    MERGED,
    RUN,
    SCORES,
    SUMMARY,
    RunFolderError,
    item_line,
    line_key,
    tensor_key,
)

__all__ = ["MERGED", "RUN", "SCORES", "SUMMARY", "RunFolderError", "item_line", "line_key", "tensor_key"]
