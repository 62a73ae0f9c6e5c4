"""Building the output pyramid from a slide source: the base level copied or re-encoded, lower
levels derived in exact 2x steps, streamed to a writer in bounded memory."""

from wsi.pyramid.builder import Progress, PyramidBuilder, PyramidSettings, plan_pyramid

__all__ = ["Progress", "PyramidBuilder", "PyramidSettings", "plan_pyramid"]
