"""Neuron-restricted knowledge editing, the pure-torch part: what each evaluation row measures.

The Lightning side (:class:`knlight.tasks.editing.EditingModule`) plans the rows and runs the forwards; the
measures of one row under one method are defined here (:func:`row_measures`), so they can be checked on
hand-made scores. Pure torch, no Lightning.
"""

from knlight.editing.measures import RowScore, row_measures

__all__ = ["RowScore", "row_measures"]
