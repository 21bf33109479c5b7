"""Dictionaries over DiT activations: TopK / BatchTopK / ReLU / JumpReLU / Matryoshka SAEs, TIDE, ITDA.

    from difflens.dictionaries import DictConfig, build
    sae = build(DictConfig(arch="topk", d_in=3072, width=65536, k=64, site="transformer_blocks.18:img"))
    sae.init_from_data(x_BD, t_B)
    out = sae(x_BD, t_B)            # out.x_hat, out.loss, out.losses, out.codes
"""

from difflens.dictionaries import io
from difflens.dictionaries.base import ARCHITECTURES, Dictionary, DictOutput, architecture, register
from difflens.dictionaries.config import DictConfig, config_class
from difflens.dictionaries.itda import ITDA
from difflens.dictionaries.jumprelu import JumpReLUSAE
from difflens.dictionaries.matryoshka import MatryoshkaSAE
from difflens.dictionaries.sae import BatchTopKSAE, ReLUSAE, TopKSAE
from difflens.dictionaries.temporal import TIDESAE


def build(cfg: DictConfig | dict, **kwargs) -> Dictionary:
    """A fresh dictionary for `cfg` (a DictConfig or its dict form). kwargs: ``fast=False`` selects
    the dense reference path of the SAEs."""
    if isinstance(cfg, dict):
        cfg = DictConfig.from_dict(cfg)
    cls = architecture(cfg.arch)
    if not cls.has_fast_path:
        kwargs.pop("fast", None)
    return cls(cfg, **kwargs)


load = io.load
save = io.save

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "DictConfig",
    "DictOutput",
    "Dictionary",
    "ITDA",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "TIDESAE",
    "TopKSAE",
    "architecture",
    "build",
    "config_class",
    "io",
    "load",
    "register",
    "save",
]
