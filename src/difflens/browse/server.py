"""`difflens browse serve`: the exported site over HTTP, plus the playground's JSON API.

Security model (docs/security.md): binds 127.0.0.1 unless told otherwise; answers only requests whose
`Host` header names the address it serves (a DNS-rebinding page cannot read it); serves files only
from the site folder (the request path is decoded, resolved and must stay inside it — `..`, encoded
`%2e%2e`, absolute paths, NUL bytes and symlinks leading out are refused); sends a
Content-Security-Policy that allows only the site's own script. The API takes POSTs only with
`Content-Type: application/json` and, when the browser sends an `Origin`, only from the served
origin (no cross-site form or text/plain POST can start a generation); small bodies, at most
MAX_JSON_DEPTH levels deep, finite numbers only; every field validated; errors as JSON
`{"error": message}` (no tracebacks). Each connection has a read timeout, so stalled clients do not
hold threads; SIGTERM stops the server like Ctrl-C and removes its temporary site folder.

API:
    GET  /api/interventions                                         -> the registered interventions and their params
    POST /api/generate  {prompt, seed, steps, dict}                 -> image + per step / per token top features
    POST /api/intervene {kind, params, where, prompt, seed, steps, dict} -> image generated with that intervention
        (where: {window, region, region_units, branch}, optional; see `registry.parse_where`)
    POST /api/steer     {prompt, seed, steps, dict, feature, scale} -> /api/intervene with kind "steer" (kept for old clients)
Interventions and their parameters come from `difflens.intervene.registry`; each parameter is
validated by its declared `Param` (type, range, feature ids below the dictionary's width).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import shutil
import signal
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import numpy as np

from difflens.browse.export import CSP, export_site, read_site_manifest
from difflens.errors import DifflensError
from difflens.groundtruth import ground_truth_of
from difflens.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from difflens.models.base import Adapter

MAX_BODY = 64 * 1024
MAX_JSON_DEPTH = 16
READ_TIMEOUT = 15.0  # seconds a connection may stall while sending its request
MAX_PROMPT = 500
MAX_STEPS = 50
TOP_PER_TOKEN = 5
TOP_PER_STEP = 12
ACTIONS = {"/api/generate": "generate", "/api/intervene": "intervene", "/api/steer": "steer"}  # POST route -> Playground method
MIME = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
        ".png": "image/png", ".json": "application/json", ".svg": "image/svg+xml"}


def _png_data_url(img_HW3, scale: int) -> str:
    from PIL import Image

    from difflens.viz import enlarge

    a = np.asarray(img_HW3, np.uint8)
    if scale > 1:
        a = enlarge(a, scale)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Playground:
    """The model (loaded once) and the dictionaries it can encode with; one generation at a time."""

    def __init__(self, adapter: Adapter, dictionaries: dict, *, default_steps: int | None = None):
        self.adapter = adapter
        self.dicts = dictionaries  # slug -> Dictionary
        self.lock = threading.Lock()
        self.default_steps = int(default_steps or adapter.default_steps)  # every Adapter declares its default

    # ---- request validation ----------------------------------------------------------------------------
    def _parse(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise DifflensError("the request body must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DifflensError("prompt is empty: type a prompt")
        if len(prompt) > MAX_PROMPT:
            raise DifflensError(f"prompt is {len(prompt)} characters; keep it under {MAX_PROMPT}")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed) or not 0 <= seed < 2**31:
            raise DifflensError(f"seed must be an integer in 0..{2**31 - 1}, got {seed!r}")
        steps = body.get("steps", self.default_steps)
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or not 1 <= steps <= MAX_STEPS:
            raise DifflensError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        slug = body.get("dict")
        if slug is None and len(self.dicts) == 1:
            slug = next(iter(self.dicts))
        if slug not in self.dicts:
            raise DifflensError(f"unknown dictionary {slug!r}: use one of {', '.join(self.dicts)}")
        return {"prompt": prompt.strip(), "seed": int(seed), "steps": int(steps), "dict": slug}

    # ---- the two actions ------------------------------------------------------------------------------------
    def generate(self, body: dict) -> dict:
        import torch

        from difflens.intervene.run import record_activations

        req = self._parse(body)
        d = self.dicts[req["dict"]]
        site = str(d.cfg.site)
        with self.lock, torch.no_grad():
            rec = record_activations(self.adapter, [req["prompt"]], [req["seed"]], site, steps=req["steps"])
            steps_out = []
            p = next(iter(d.parameters()), None)
            dev = p.device if p is not None else torch.device("cpu")
            for (step, _call), (acts, is_cond, sample_index) in sorted(rec.acts.items()):
                rows = torch.nonzero(is_cond & (sample_index == 0)).flatten()
                if len(rows) == 0:
                    continue
                x = acts[rows[0]].to(dev, torch.float32)  # [tokens, D]
                t = torch.full((x.shape[0],), float(rec.timesteps[step]), device=dev)
                codes = d.encode(x, t).float().cpu()  # [tokens, F]
                k = min(TOP_PER_TOKEN, codes.shape[1])
                v, i = torch.topk(codes, k, dim=1)
                tokens = [[[int(f), round(float(a), 4)] for f, a in zip(ii, vv) if a > 0] for ii, vv in zip(i.tolist(), v.tolist())]
                total = codes.clamp_min(0).sum(0)
                kt = min(TOP_PER_STEP, codes.shape[1])
                tv, ti = torch.topk(total, kt)
                top = [[int(f), round(float(a), 4)] for f, a in zip(ti.tolist(), tv.tolist()) if a > 0]
                steps_out.append({"step": int(step), "timestep": float(rec.timesteps[step]), "top": top, "tokens": tokens})
        img = np.asarray(rec.images[0])
        scale = max(1, 320 // max(img.shape[:2]))
        grid = list(self.adapter.grid_hw())
        return {"image": _png_data_url(img, scale), "grid_hw": grid, "steps": steps_out, "slug": req["dict"],
                "prompt": req["prompt"], "seed": req["seed"]}

    def interventions(self) -> list[dict]:
        """The registered interventions the playground offers, with their parameters (`Param.to_json`)."""
        from difflens.intervene.registry import playground_specs

        return [s.to_json() for s in playground_specs()]

    def intervene(self, body: dict) -> dict:
        """{kind, params, where, prompt, seed, steps, dict}: generate with the registered intervention
        `kind` built from its validated params, acting in `where` (step window, region, CFG branch);
        the changed image and any extra ones (a transfer's reference)."""
        import torch

        from difflens.intervene.registry import get_intervention, parse_where
        from difflens.intervene.run import generate_with

        req = self._parse(body)
        spec = get_intervention(body.get("kind"), playground=True)
        d = self.dicts[req["dict"]]
        params = spec.parse_params(body.get("params"), d)
        where = parse_where(body.get("where"))
        with self.lock, torch.no_grad():
            iv = spec.from_request(params, d, where)
            gen = generate_with(self.adapter, [req["prompt"]], [req["seed"]], [iv], steps=req["steps"])
            extra = list(spec.extra_images(iv)) if spec.extra_images else []
        img = np.asarray(gen.images[0])
        scale = max(1, 320 // max(img.shape[:2]))
        return {"kind": spec.name, "params": params, "image": _png_data_url(img, scale), "slug": req["dict"],
                "intervention": iv.describe(), "steps_applied": iv.steps_applied(),
                "extra": [{"label": lab, "image": _png_data_url(np.asarray(im), scale)} for lab, im in extra]}

    def steer(self, body: dict) -> dict:
        """/api/steer {feature, scale, ...}: the registered steer intervention, answered as before."""
        if not isinstance(body, dict):
            raise DifflensError("the request body must be a JSON object")
        params = {k: body[k] for k in ("feature", "scale") if k in body}
        out = self.intervene({**body, "kind": "steer", "params": params})
        return {**out, **out["params"]}


def resolve_in_site(root: Path, url_path: str) -> Path | None:
    """The file a URL path names inside `root`, or None when it would leave it (or is odd)."""
    path = unquote(urlsplit(url_path).path, errors="strict")
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    rel = "/".join(parts) or "index.html"
    root = root.resolve()
    target = (root / rel).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        return None
    if target.is_dir():
        target = target / "index.html"
    return target


def json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (bounded work: one pass over a small body)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes):
    """The request body as JSON: UTF-8, shallow, finite numbers only; ValueError with the reason otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the body is not UTF-8") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("the body is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"the body is not valid JSON ({e})") from None

    def finite(v) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        if isinstance(v, list):
            return all(finite(x) for x in v)
        return True

    if not finite(body):  # e.g. 1e999 parses to inf
        raise ValueError("the body holds a number out of range (inf)")
    return body


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values that name this server (loopback aliases when bound to loopback)."""
    names = {host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    if ":" in host and not host.startswith("["):
        names.add(f"[{host}]")
    return {f"{n}:{port}" for n in names}


def _make_handler(root: Path, playground: Playground | None, quiet: bool):
    class Handler(BaseHTTPRequestHandler):
        server_version = "difflens-browse"
        sys_version = ""
        timeout = READ_TIMEOUT  # socket timeout for each connection: a stalled client is dropped

        def _host_ok(self) -> bool:
            return (self.headers.get("Host") or "").lower() in self.server.allowed_hosts

        def _origin_ok(self) -> bool:
            origin = self.headers.get("Origin")
            if origin is None:  # not a browser request (browsers send Origin on every POST)
                return True
            return origin.lower() in {f"http://{h}" for h in self.server.allowed_hosts}

        def log_message(self, fmt, *args):  # noqa: A003 - stdlib name
            if not quiet:
                super().log_message(fmt, *args)

        def _headers(self, status: int, ctype: str, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def _send(self, status: int, body: bytes, ctype: str, head: bool = False) -> None:
            self._headers(status, ctype, len(body))
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json")

        def _error(self, status: int, message: str, head: bool = False) -> None:
            self._send(status, (message + "\n").encode("utf-8"), "text/plain; charset=utf-8", head)

        def _file(self, head: bool) -> None:
            raw = self.path
            if not raw.startswith("/"):  # absolute-form or odd request targets
                return self._error(403, "forbidden", head)
            try:
                target = resolve_in_site(root, raw)
            except UnicodeDecodeError:
                target = None
            if target is None:
                return self._error(403, "forbidden", head)
            if not target.is_file():
                return self._error(404, "not found", head)
            ctype = MIME.get(target.suffix.lower())
            if ctype is None:
                return self._error(404, "not found", head)
            self._send(200, target.read_bytes(), ctype, head)

        def do_GET(self):  # noqa: N802 - stdlib name
            if not self._host_ok():
                return self._error(421, "misdirected request: unknown Host")
            if urlsplit(self.path).path == "/api/interventions":
                if playground is None:
                    return self._json(503, {"error": "the playground is off (served with --no-playground)"})
                return self._json(200, {"interventions": playground.interventions()})
            self._file(head=False)

        def do_HEAD(self):  # noqa: N802
            if not self._host_ok():
                return self._error(421, "misdirected request: unknown Host", head=True)
            self._file(head=True)

        def do_POST(self):  # noqa: N802
            if not self._host_ok():
                return self._json(421, {"error": "misdirected request: unknown Host"})
            if not self._origin_ok():
                return self._json(403, {"error": "cross-origin requests are refused"})
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return self._json(415, {"error": "send the body as Content-Type: application/json"})
            route = urlsplit(self.path).path
            if route not in ACTIONS:
                return self._json(404, {"error": f"no API endpoint {route}"})
            if playground is None:
                return self._json(503, {"error": "the playground is off (served with --no-playground)"})
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if not 0 < n <= MAX_BODY:
                return self._json(400, {"error": f"send a JSON body of at most {MAX_BODY} bytes"})
            try:
                body = parse_body(self.rfile.read(n))
            except ValueError as e:
                return self._json(400, {"error": str(e)})
            try:
                out = getattr(playground, ACTIONS[route])(body)
            except DifflensError as e:
                return self._json(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - answer, never dump a traceback to the client
                self.log_error("playground failed: %r", e)
                return self._json(500, {"error": f"generation failed ({type(e).__name__}); see the server log"})
            self._json(200, out)

    return Handler


def make_server(site: str | Path, *, host: str = "127.0.0.1", port: int = 0, playground: Playground | None = None,
                quiet: bool = False) -> ThreadingHTTPServer:
    """An HTTP server (not started) over an exported site folder; `server.server_address` has the port."""
    root = Path(site)
    read_site_manifest(root)
    try:
        httpd = ThreadingHTTPServer((host, int(port)), _make_handler(root.resolve(), playground, quiet))
    except OSError as e:
        raise DifflensError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port (0 = any free one)") from None
    httpd.daemon_threads = True
    h, p = httpd.server_address[:2]
    httpd.allowed_hosts = allowed_hosts(str(h) if host not in ("localhost",) else host, int(p))
    return httpd


def build_playground(dict_paths, model: str = DEFAULT_MODEL, device: str = "cpu", adapter: Adapter | None = None):
    """(Playground, page config) for the dictionaries that fit the model's sites."""
    import difflens
    from difflens.browse.data import resolve_inputs

    if adapter is None:
        from difflens.models import load_adapter

        adapter = load_adapter(model, device=device)
    inputs = resolve_inputs(dict_paths)
    dicts, notes = {}, []
    sites = set(adapter.site_bindings())
    for e in inputs.dicts:
        if e.site not in sites:
            notes.append(f"{e.name}: site {e.site} is not a site of the model; not in the playground")
            continue
        if int(e.cfg.get("d_in") or 0) != adapter.site_dim(e.site):
            notes.append(f"{e.name}: d_in {e.cfg.get('d_in')} does not match the model's width at {e.site}; not in the playground")
            continue
        dicts[e.slug] = difflens.load(e.path).eval()
    if not dicts:
        raise DifflensError("no dictionary fits the playground's model (site and width must match): pass --model with the "
                            "model the dictionaries were trained on, or --no-playground")
    pg = Playground(adapter, dicts)
    truth = ground_truth_of(adapter)  # a model trained on a world knows only its prompt grammar
    example = truth.sample_prompts(1, 0)[0][0] if truth is not None else ""
    hint = f"This model knows only its world's prompt grammar (e.g. '{example}')." if truth is not None else ""
    config = {"model": adapter.model_id, "slugs": list(dicts), "default_steps": pg.default_steps,
              "max_steps": MAX_STEPS, "hint": hint, "notes": notes, "example_prompt": example,
              "interventions": pg.interventions()}
    return pg, config


def playground_page_extras(site_rows: dict, slugs) -> dict:
    """Which features have pages (links) and their explanations, for the playground's lists."""
    pages, expl = {}, {}
    for s in slugs:
        rows = site_rows.get(s, [])
        pages[s] = [r["f"] for r in rows]
        expl[s] = {str(r["f"]): r["expl"] for r in rows if r.get("expl")}
    return {"pages": pages, "explanations": expl}


def serve(dicts, *, host: str = "127.0.0.1", port: int = 8000, out=None, interp=None, evaluation=None, store=None,
          neighbours: int = 8, max_features: int | None = None, title: str = "difflens feature browser",
          model: str | None = DEFAULT_MODEL, device: str = "cpu", adapter: Adapter | None = None) -> None:
    """Export (into `out` or a temporary folder), load the model once (or use `adapter`), serve until Ctrl-C."""
    from difflens.browse.data import resolve_inputs
    from difflens.browse.export import feature_rows

    pg, config = (None, None)
    if model is not None:
        pg, config = build_playground(dicts, model=model, device=device, adapter=adapter)
        inputs = resolve_inputs(dicts, interp=interp, evaluation=evaluation, store=store)
        rows = {e.slug: feature_rows(e, max_features) for e in inputs.dicts}
        config.update(playground_page_extras(rows, config["slugs"]))
    with _sigterm_as_interrupt():
        tmp = None
        if out is None:
            tmp = Path(tempfile.mkdtemp(prefix="difflens-site-"))
            out = tmp / "site"
        try:
            site = export_site(dicts, out, interp=interp, evaluation=evaluation, store=store, neighbours=neighbours,
                               max_features=max_features, playground=config, title=title)
            httpd = make_server(site, host=host, port=port, playground=pg)
            h, p = httpd.server_address[:2]
            shown = f"[{h}]" if ":" in str(h) else h
            print(f"serving {site} at http://{shown}:{p}/ (Ctrl-C to stop)", flush=True)
            if host not in ("127.0.0.1", "localhost", "::1"):
                print(f"warning: listening on {host}: anyone who can reach this address can use the playground", flush=True)
            try:
                httpd.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                httpd.server_close()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a service manager, `kill`) stops the server like Ctrl-C, so the finally blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
