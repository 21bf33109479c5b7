"""Feature analysis and visual automated interpretation (Shabalin et al. 2025), with baselines.

    cache    = build_cache(features, source)          # top/quantile images with token maps, profiles, ...
    report   = run_oracle_pipeline({"sae": path}, store, out)   # toy world, offline
    report   = run_pipeline({"sae": path}, store, out, judge="openai")

Features are dictionary latents (SAE, TIDE, ITDA), MLP neurons or random directions; all go
through the same cache, heatmaps, explainer/judge and report. See docs/interpret.md.
"""

from difflens.interpret.cache import CacheConfig, Example, FeatureCache, build_cache
from difflens.interpret.client import ChatClient, ChatResult, ClientConfig
from difflens.interpret.features import (
    DictionaryFeatures,
    FeatureSource,
    NeuronFeatures,
    RandomDirections,
    as_feature_source,
)
from difflens.interpret.heatmap import feature_grid, overlay, write_feature_grids
from difflens.interpret.oracle import OracleExplainer, OracleJudge
from difflens.interpret.pipeline import render_report, run_oracle_pipeline, run_pipeline
from difflens.interpret.scoring import Explanation, build_tasks, feature_score, score_features
from difflens.interpret.sources import MemorySource, SampleSource, StoreSource, generate_samples
from difflens.interpret.vlm import VLMExplainer, VLMJudge, parse_score

__all__ = [
    "CacheConfig",
    "ChatClient",
    "ChatResult",
    "ClientConfig",
    "DictionaryFeatures",
    "Example",
    "Explanation",
    "FeatureCache",
    "FeatureSource",
    "MemorySource",
    "NeuronFeatures",
    "OracleExplainer",
    "OracleJudge",
    "RandomDirections",
    "SampleSource",
    "StoreSource",
    "VLMExplainer",
    "VLMJudge",
    "as_feature_source",
    "build_cache",
    "build_tasks",
    "feature_grid",
    "feature_score",
    "generate_samples",
    "overlay",
    "parse_score",
    "render_report",
    "run_oracle_pipeline",
    "run_pipeline",
    "score_features",
    "write_feature_grids",
]
