"""Causal localisation by activation patching: where (site, stream, step, CFG branch) is a concept decided?

    from difflens.trace import Pair, trace, PixelReadout
    res = trace(adapter, [Pair("a red circle", "a blue circle", seed=0)], PixelReadout(), steps=12)

`difflens trace` runs the grid for the toy world's factors (or for given prompt pairs on any
model) and writes a heatmap, the JSON of every cell and a markdown table. See docs/intervene.md.
"""

from difflens.trace.patching import NO_PATCH, Cell, SourceRun, block_sites, conditioning_sites, patched_generate, record_source
from difflens.trace.readouts import FunctionReadout, PixelReadout, WorldReadout
from difflens.trace.run import Pair, TraceResult, step_windows, trace

__all__ = [
    "NO_PATCH", "Cell", "FunctionReadout", "Pair", "PixelReadout", "SourceRun", "TraceResult", "WorldReadout",
    "block_sites", "conditioning_sites", "patched_generate", "record_source", "step_windows", "trace",
]
