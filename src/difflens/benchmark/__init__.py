"""A benchmark for dictionaries on diffusion transformers: reconstruction, sparse probing, feature
absorption, spatial coherence, localisation, causal editing and autointerp, against ground truth
where the model's world has it. See docs/benchmark.md.

    result = run_benchmark({"topk": "runs/topk", "tide": "runs/tide"}, "runs/store", "runs/bench")
"""

from difflens.benchmark.absorption import absorption, hierarchy
from difflens.benchmark.causal import causal_editing
from difflens.benchmark.probing import sparse_probe
from difflens.benchmark.run import run_benchmark
from difflens.benchmark.spatial import SpatialAccumulator, iou, morans_i

__all__ = ["SpatialAccumulator", "absorption", "causal_editing", "hierarchy", "iou", "morans_i", "run_benchmark",
           "sparse_probe"]
