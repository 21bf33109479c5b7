"""Explainers and judges behind two small protocols, with one registry the CLI reads its choices from.

An *explainer* names the pattern of each feature from its cache; a *judge* scores held-out
examples against an explanation. A backend ("oracle", "openai", ...) provides both and says
what it needs: ground truth (token labels) or a chat client. Adding one is one
`register_backend(Backend(...))` call below; the CLI's --judge/--explainer choices and the
pipeline pick it up from `BACKENDS` (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from difflens.errors import DifflensError


class Explainer(Protocol):
    def explain_many(self, cache, tasks: Sequence) -> list:
        """One `scoring.Explanation` per task."""


class Judge(Protocol):
    def judge_many(self, cache, tasks: Sequence, explanations: Sequence) -> dict:
        """{feature: [score of each of its task's test items]} (None where it cannot say)."""


@dataclass
class BackendContext:
    """What a backend may build its explainer and judge from."""

    truth: Any = None  # scoring.Truth: token labels per sample, or None
    image_of: Callable | None = None  # sample id -> uint8 image
    client: Any = None  # a chat client, when the backend asked for one
    out_dir: str | Path | None = None
    explainer_prompt: str | Path | None = None
    judge_prompt: str | Path | None = None
    evidence: str = "split"


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    make_explainer: Callable[[BackendContext], Explainer]
    make_judge: Callable[[BackendContext], Judge]
    needs_truth: bool = False
    needs_client: bool = False
    # permutation controls per test item when the caller names none: "all" pairs for a judge whose
    # calls cost nothing, one for a judge that is paid per call (scoring.py)
    chance_controls: int | str = 1
    uses_evidence: bool = False  # the explainer reads `evidence` ("split" or "top")


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in BACKENDS and BACKENDS[backend.name] != backend:
        raise DifflensError(f"explainer/judge backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


# ---- the built-in backends --------------------------------------------------------------------------
def _oracle_explainer(ctx: BackendContext):
    from difflens.interpret.oracle import OracleExplainer

    return OracleExplainer(ctx.truth, evidence=ctx.evidence)


def _oracle_judge(ctx: BackendContext):
    from difflens.interpret.oracle import OracleJudge

    return OracleJudge(ctx.truth)


def _vlm_explainer(ctx: BackendContext):
    from difflens.interpret.vlm import EXPLAINER_PROMPT, VLMExplainer, load_template

    return VLMExplainer(ctx.client, ctx.image_of, template=load_template(ctx.explainer_prompt, EXPLAINER_PROMPT, ("{n_images}",)))


def _vlm_judge(ctx: BackendContext):
    from difflens.interpret.vlm import JUDGE_PROMPT, VLMJudge, load_template

    return VLMJudge(ctx.client, ctx.image_of, template=load_template(ctx.judge_prompt, JUDGE_PROMPT, ("{explanation}",)))


register_backend(Backend("oracle", "ground-truth oracle (toy world, offline)", _oracle_explainer, _oracle_judge, needs_truth=True,
                         chance_controls="all", uses_evidence=True))
register_backend(Backend("openai", "a VLM behind an OpenAI-compatible API", _vlm_explainer, _vlm_judge, needs_client=True))


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def get_backend(name: str, role: str = "judge") -> Backend:
    if name not in BACKENDS:
        raise DifflensError(f"--{role} must be one of {', '.join(backend_names())}, got {name!r}")
    return BACKENDS[name]


def make_backends(judge: str, explainer: str | None, *, truth, image_of, client_config=None, out_dir=None,
                  explainer_prompt=None, judge_prompt=None, vlm_cache=None, evidence: str = "split"):
    """(explainer, judge, client) for registered backend names; the explainer defaults to the judge's."""
    explainer = explainer or judge
    ex_b, ju_b = get_backend(explainer, "explainer"), get_backend(judge, "judge")
    for b in (ex_b, ju_b):
        if b.needs_truth and truth is None:
            raise DifflensError(f"the {b.name} backend needs ground truth (token_labels in the samples): use a store "
                                "of a model with a ground-truth world (the toy model), or another --judge")
    client = None
    if ex_b.needs_client or ju_b.needs_client:
        from difflens.interpret.client import ChatClient, ClientConfig  # the HTTP client only when asked for

        cfg = client_config or ClientConfig.from_env()
        cache_dir = vlm_cache or (Path(out_dir) / "vlm_cache" if out_dir else None)
        client = ChatClient(cfg, cache_dir=cache_dir, log_path=Path(out_dir) / "vlm_requests.jsonl" if out_dir else None)
    ctx = BackendContext(truth=truth, image_of=image_of, client=client, out_dir=out_dir,
                         explainer_prompt=explainer_prompt, judge_prompt=judge_prompt, evidence=evidence)
    return ex_b.make_explainer(ctx), ju_b.make_judge(ctx), client
