"""Comparing representations with ITDA dictionaries (Leask et al. 2025), next to CKA and SVCCA.

    from difflens.compare import compare, jaccard, linear_cka, svcca
"""

from difflens.compare.run import CompareConfig, compare
from difflens.compare.similarity import jaccard, linear_cka, svcca

__all__ = ["CompareConfig", "compare", "jaccard", "linear_cka", "svcca"]
