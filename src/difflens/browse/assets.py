"""The site's scripts and style sheet (`static/*.js`, `static/style.css`, shipped as package data),
written next to the pages by the exporter.

`app.js` holds what every page shares (the embedded data, DOM helpers, the router); `pages.js`
draws the index, feature and compare pages; `playground.js` the playground. A page loads `app.js`
and its own script (PAGE_SCRIPTS).

The scripts never use innerHTML/outerHTML/insertAdjacentHTML/document.write: every string from
the data (explanations, prompts, names) becomes a text node, and attribute values they set are
built from integers and slugs the exporter validated.
"""

from importlib.resources import files


def _static(name: str) -> str:
    return files("difflens.browse").joinpath("static", name).read_text(encoding="utf-8")


STYLE_CSS = _static("style.css")
# the scripts each kind of page loads, in order: app.js first (the others register with it)
PAGE_SCRIPTS = {"index": ("app.js", "pages.js"), "feature": ("app.js", "pages.js"), "compare": ("app.js", "pages.js"),
                "playground": ("app.js", "playground.js")}
SCRIPTS = {name: _static(name) for name in dict.fromkeys(s for names in PAGE_SCRIPTS.values() for s in names)}


def static_files(pages) -> dict[str, str]:
    """File name -> text of the scripts and style sheet that pages of these kinds load."""
    out = {name: SCRIPTS[name] for page in pages for name in PAGE_SCRIPTS[page]}
    out["style.css"] = STYLE_CSS
    return out
