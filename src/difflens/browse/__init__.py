"""The feature browser: a static site over dictionaries, their interpretation and evaluation, and a
local server that adds a playground (generate, see active features per token and step, steer).

    from difflens.browse import export_site, make_server
    export_site(["runs/demo/dicts/topk"], "site")          # -> site/index.html
"""

from difflens.browse.export import export_site

__all__ = ["export_site", "make_server"]


def __getattr__(name):  # the server pulls in torch/models only when asked for
    if name == "make_server":
        from difflens.browse.server import make_server

        return make_server
    raise AttributeError(name)
