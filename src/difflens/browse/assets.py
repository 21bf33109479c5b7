"""The site's only script and style sheet (`static/app.js`, `static/style.css`, shipped as package
data), written next to the pages by the exporter.

The script never uses innerHTML/outerHTML/insertAdjacentHTML/document.write: every string from
the data (explanations, prompts, names) becomes a text node, and attribute values it sets are
built from integers and slugs the exporter validated.
"""

from importlib.resources import files


def _static(name: str) -> str:
    return files("difflens.browse").joinpath("static", name).read_text(encoding="utf-8")


APP_JS = _static("app.js")
STYLE_CSS = _static("style.css")
