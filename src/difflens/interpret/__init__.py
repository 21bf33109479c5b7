"""Feature analysis and visual automated interpretation (Shabalin et al. 2025), with baselines.

    cache    = build_cache(features, source)          # top/quantile images with token maps, profiles, ...
    report   = run_oracle_pipeline({"sae": path}, store, out)   # toy world, offline
    report   = run_pipeline({"sae": path}, store, out, judge="openai")

Features are dictionary latents (SAE, TIDE, ITDA), MLP neurons or random directions; all go
through the same cache, heatmaps, explainer/judge and report. See docs/interpret.md.
"""

import importlib

# Public name -> the module that defines it; imported on first use, so the CLI can read the
# judge registry (`interpret.judges`) without loading torch and the whole pipeline.
_HOME = {
    "CacheConfig": "cache", "Example": "cache", "FeatureCache": "cache", "build_cache": "cache_build",
    "ChatClient": "client", "ChatResult": "client", "ClientConfig": "client",
    "DictionaryFeatures": "features", "FeatureSource": "features", "NeuronFeatures": "features",
    "RandomDirections": "features", "as_feature_source": "features",
    "feature_grid": "heatmap", "overlay": "heatmap", "write_feature_grids": "heatmap",
    "OracleExplainer": "oracle", "OracleJudge": "oracle", "concept_match": "oracle",
    "render_report": "pipeline", "run_oracle_pipeline": "pipeline", "run_pipeline": "pipeline",
    "Explanation": "scoring", "build_tasks": "scoring", "feature_score": "scoring", "score_features": "scoring",
    "MemorySource": "sources", "SampleSource": "sources", "StoreSource": "sources", "generate_samples": "sources",
    "VLMExplainer": "vlm", "VLMJudge": "vlm", "parse_score": "vlm",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"difflens.interpret.{_HOME[name]}"), name)
    raise AttributeError(f"module 'difflens.interpret' has no attribute {name!r}")


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
    "concept_match",
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
