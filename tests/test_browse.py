"""Feature browser: discovery, the static export (content, escaping, atomic replace), the server
(path traversal, API validation, generation and steering), the CLI, and headless Chromium
(Debian's chromium + chromedriver driven by Selenium) on the exported site and the server.

The browser tests are skipped, with the reason, when chromium, chromedriver or selenium is
missing (`make test` tries to install them). One module, so the tiny world is built once."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

SITE = "transformer_blocks.1:img"
XSS_SCRIPT = "<script>window.__pwned=1</script>"
XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS = f"{XSS_SCRIPT} red {XSS_IMG}"
PLANTED = 1  # the topk feature whose explanation carries the XSS payload


def _harvest(toy: Path, out: Path, n: int = 8, steps: int = 2):
    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.world.prompts import world_prompts
    from difflens.models.toy.adapter import ToyAdapter

    adapter = ToyAdapter.load(folder=toy)
    prompts, scenes = world_prompts(n, seed=3)
    harvest(out, HarvestConfig(model=str(toy), sites=[SITE], steps=steps, batch_size=n), prompts, scenes=scenes,
            adapter=adapter)
    return adapter


def _reseal(store: Path, samples_file: Path) -> None:
    """Update the unit record's checksum of a samples file (readers check it)."""
    import hashlib

    sha = hashlib.sha256(samples_file.read_bytes()).hexdigest()
    unit = samples_file.name[: -len(".jsonl")]
    rec_path = store / "units" / f"{unit}.json"
    rec = json.loads(rec_path.read_text())
    rec["samples_sha256"] = sha
    rec_path.write_text(json.dumps(rec))
    m = json.loads((store / "manifest.json").read_text())
    for js in m["shards"]:
        if js["unit_id"] == unit:
            js["samples_sha256"] = sha
    (store / "manifest.json").write_text(json.dumps(m))


def _plant_prompt(store: Path, sid: int, text: str) -> None:
    """Put `text` into the store's record of sample `sid` (prompts are data the browser must escape)."""
    for f in sorted((store / "samples").rglob("*")):
        if not f.is_file():
            continue
        lines = f.read_text(encoding="utf-8").splitlines()
        out, hit = [], False
        for line in lines:
            if line.strip():
                rec = json.loads(line)
                if int(rec["sample_id"]) == sid:
                    rec["prompt"], hit = text, True
                line = json.dumps(rec)
            out.append(line)
        if hit:
            f.write_text("\n".join(out) + "\n", encoding="utf-8")
            _reseal(store, f)  # as a prompt written at harvest time would be: the checksum matches
            return
    raise AssertionError(f"sample {sid} not found in {store}")


def _dicts(store: Path, root: Path, d: int):
    """A random TopK SAE and an ITDA built from the store's rows (with provenance), saved as folders."""
    from difflens.dictionaries import ITDA, DictConfig, TopKSAE, save
    from difflens.store import Store

    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=24, k=4, site=SITE, normalization="none", init_seed=0))
    save(sae, root / "topk")
    st = Store(store)
    m = st.meta(SITE, ["sample_id", "step", "token", "timestep"])
    x = st.read_rows(SITE, np.arange(st.num_rows(SITE)))
    itda = ITDA(DictConfig(arch="itda", d_in=d, width=64, k=3, site=SITE, normalization="none", itda_tau=0.5))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(x.shape[0], generator=g)[:64]
    itda.partial_fit(x[pick], torch.as_tensor(m["timestep"][pick.numpy()], dtype=torch.float32),
                     provenance={k: torch.as_tensor(m[k][pick.numpy()], dtype=torch.long) for k in ("sample_id", "step", "token")})
    assert itda.num_atoms > 0
    save(itda, root / "itda")
    return [root / "topk", root / "itda"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A demo-shaped folder: toy model, store, dicts/{topk,itda}, interpret/ (oracle), with XSS planted."""
    from toy_fixtures import make_tiny_toy

    from difflens.interpret import CacheConfig, run_oracle_pipeline

    root = tmp_path_factory.mktemp("browse")
    toy = make_tiny_toy(root / "toy")
    adapter = _harvest(toy, root / "store")
    dicts = _dicts(root / "store", root / "dicts", adapter.site_dim(SITE))
    run_oracle_pipeline({"topk": dicts[0], "itda": dicts[1]}, root / "store", root / "interpret", baselines=(),
                        n_features=6, cache_config=CacheConfig(top_n=4, n_quantiles=2, min_tokens=2), grids=True)
    # plant markup in an explanation (index + feature page) and in a prompt
    idx_path = root / "interpret" / "topk" / "features" / "index.json"
    idx = json.loads(idx_path.read_text())
    row = next(r for r in idx["features"] if r["feature"] == PLANTED)
    row["explanation"], row["score"] = XSS, 0.75
    idx_path.write_text(json.dumps(idx))
    fpath = root / "interpret" / "topk" / "features" / f"{PLANTED}.json"
    feat = json.loads(fpath.read_text())
    feat["explanation"], feat["score"] = XSS, 0.75
    fpath.write_text(json.dumps(feat))
    xss_sid = int(feat["top"][0]["sample_id"])
    _plant_prompt(root / "store", xss_sid, f"prompt {XSS}")
    from difflens.store import Store

    run_path = root / "interpret" / "run.json"  # the planted prompt changed the store's fingerprint
    run = json.loads(run_path.read_text())
    run["data"]["fingerprint"] = Store(root / "store").fingerprint()
    run_path.write_text(json.dumps(run))
    return {"root": root, "toy": toy, "adapter": adapter, "dicts": dicts, "xss_sid": xss_sid}


@pytest.fixture(scope="session")
def site(world, tmp_path_factory):
    from difflens.browse import export_site

    out = tmp_path_factory.mktemp("site") / "site"
    return export_site(world["dicts"], out, show_progress=False)


def page_data(path: Path) -> dict:
    m = re.search(r'<script type="application/json" id="difflens-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)
    assert m, path
    return json.loads(m.group(1))


# ---- export ----------------------------------------------------------------------------------------------------
def test_export_discovers_and_writes_pages(world, site):
    man = json.loads((site / "site.json").read_text())
    assert [d["name"] for d in man["dictionaries"]] == ["topk", "itda"]
    # interpretation, store found by the demo layout (dicts/<name> next to interpret/, store/)
    assert all(d["interp"] for d in man["dictionaries"]) and man["store"] and man["images"] > 0
    for f in ("index.html", "compare.html", "app.js", "pages.js", "style.css"):
        assert (site / f).is_file()
    assert not (site / "playground.html").exists() and not (site / "playground.js").exists()  # static export: no playground
    # every page loads app.js first, then its own script, all files of the site, and nothing else
    srcs = {}
    for page in [site / "index.html", site / "compare.html", *site.glob("features/*/*.html")]:
        srcs[page] = re.findall(r'<script src="([^"]+)"></script>', page.read_text(encoding="utf-8"))
        assert [Path(s).name for s in srcs[page]] == ["app.js", "pages.js"], page
        assert all((page.parent / s).resolve().is_file() for s in srcs[page])
    assert {p.name for p in site.glob("*.js")} == {"app.js", "pages.js"} and set(man["files"]) >= {"app.js", "pages.js"}
    idx = page_data(site / "index.html")
    rows = idx["rows"]["topk"]
    live = json.loads((world["root"] / "interpret/topk/features/index.json").read_text())["features"]
    assert [r["f"] for r in rows] == [r["feature"] for r in live]  # every live feature is listed
    assert any(r["expl"] == XSS for r in rows)
    # a feature page with its images, histogram, profile, neighbours
    fp = page_data(site / "features" / "topk" / f"{PLANTED}.html")
    assert fp["explanation"] == XSS and fp["top"] and all(t["img"] for t in fp["top"])
    for t in fp["top"]:
        assert (site / "img" / f"{t['sid']}.png").is_file()
        assert len(np.frombuffer(__import__("base64").b64decode(t["map"]["b"]), np.uint8)) == 256
    assert fp["histogram"]["counts"] and len(fp["profile_mean"]) == 2
    # neighbours: same dictionary, by decoder cosine, best first, never itself
    from difflens import load

    W = load(world["dicts"][0]).decoder_directions()
    W = W / W.norm(dim=1, keepdim=True)
    own = [n for n in fp["neighbours"] if n["slug"] == "topk"]
    cos = (W @ W[PLANTED]).numpy()
    cos[PLANTED] = -np.inf
    assert own[0]["feature"] == int(np.argmax(cos)) and own[0]["cos"] == pytest.approx(float(cos.max()), abs=1e-3)
    assert PLANTED not in [n["feature"] for n in own]
    assert [n["cos"] for n in own] == sorted([n["cos"] for n in own], reverse=True)
    # ITDA atoms show where they came from
    itda_pages = sorted((site / "features" / "itda").glob("*.html"))
    provs = [page_data(p).get("provenance") for p in itda_pages]
    assert any(p and p["img"] and isinstance(p["token"], int) for p in provs)
    # ... at the timestep the store recorded for that harvest step, not just the step index
    from difflens.store import Store

    m = Store(world["root"] / "store").meta(SITE, ["step", "timestep"])
    for p in filter(None, provs):
        assert p["timestep"] == pytest.approx(float(m["timestep"][m["step"] == p["step"]][0]), abs=0.01)
    comp = page_data(site / "compare.html")
    assert [d["name"] for d in comp["dicts"]] == ["topk", "itda"] and comp["interp"]["rows"]


def test_export_escapes_planted_markup(world, site):
    """No data string reaches the HTML unescaped: the raw payload never appears in any page."""
    for page in [site / "index.html", site / "compare.html", *site.glob("features/*/*.html")]:
        text = page.read_text(encoding="utf-8")
        assert "<script>window" not in text and "onerror=" not in text.replace("onerror=\\", "")  # noqa: B005
        assert "<img" not in text
    # the JSON still round-trips to the exact planted strings
    fp = page_data(site / "features" / "topk" / f"{PLANTED}.html")
    assert fp["explanation"] == XSS
    assert any((t["prompt"] or "").endswith(XSS) for t in fp["top"])
    scripts = sorted(site.glob("*.js"))
    assert len(scripts) >= 2
    for f in scripts:
        js = f.read_text()
        assert "innerHTML" not in js and "document.write" not in js and "eval(" not in js, f.name
        assert "http://" not in js.replace("http://www.w3.org/2000/svg", "") and "https://" not in js, f.name
    assert "https://" not in (site / "style.css").read_text() and "@import" not in (site / "style.css").read_text()


def test_json_for_script_cannot_close_the_element():
    from difflens.browse.export import json_for_script, page_html

    s = json_for_script({"x": "</script><!-- & \u2028"})
    assert "<" not in s and ">" not in s and "&" not in s and json.loads(s)["x"] == "</script><!-- & \u2028"
    page = page_html("<b>t</b>", "index", {})
    assert "<title>&lt;b&gt;t&lt;/b&gt;</title>" in page


def test_export_replaces_only_previous_sites(world, tmp_path):
    from difflens.browse import export_site
    from difflens.errors import DifflensError

    out = tmp_path / "s"
    export_site(world["dicts"][:1], out, show_progress=False, max_features=3, neighbours=2)
    assert len(list((out / "features" / "topk").glob("*.html"))) == 3
    (out / "stale.txt").write_text("x")  # a file the export did not write: refused, never deleted
    with pytest.raises(DifflensError, match="did not write.*stale.txt"):
        export_site(world["dicts"][:1], out, show_progress=False, max_features=2)
    assert (out / "stale.txt").read_text() == "x"
    (out / "stale.txt").unlink()
    export_site(world["dicts"][:1], out, show_progress=False, max_features=2)  # a re-export replaces the old site
    assert len(list((out / "features" / "topk").glob("*.html"))) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(DifflensError, match="not a site exported by difflens"):
        export_site(world["dicts"][:1], user, show_progress=False)
    assert (user / "notes.txt").read_text() == "keep me"
    with pytest.raises(DifflensError, match="no cfg.json"):
        export_site([tmp_path], tmp_path / "x", show_progress=False)
    with pytest.raises(DifflensError, match="--interp"):
        export_site(world["dicts"][:1], tmp_path / "y", interp=tmp_path, show_progress=False)


def test_cli_export(world, tmp_path, capsys):
    from difflens.cli import main

    out = tmp_path / "cli_site"
    rc = main(["browse", "export", "--dict", str(world["dicts"][1]), "--interp", str(world["root"] / "interpret"),
               "--data", str(world["root"] / "store"), "--out", str(out), "--max-features", "4"])
    assert rc == 0
    assert f"site: {(out / 'index.html').resolve()}" in capsys.readouterr().err
    assert len(list((out / "features" / "itda").glob("*.html"))) == 4
    assert main(["browse", "export", "--dict", str(tmp_path / "nope"), "--out", str(tmp_path / "z")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_export_warns_when_a_dictionary_has_no_interpretation(world, tmp_path, capsys):
    import shutil

    from difflens.cli import main

    lone = tmp_path / "elsewhere" / "topk"  # no interpret/ folder beside it to discover
    shutil.copytree(world["dicts"][0], lone)
    rc = main(["browse", "export", "--dict", str(lone), "--data", str(world["root"] / "store"),
               "--out", str(tmp_path / "bare"), "--max-features", "3"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: topk: no interpretation, so its 3 feature pages say '(no explanation)'" in err
    assert f"difflens interpret --dict {lone}" in err and "--interp INTERP" in err
    rc = main(["browse", "export", "--dict", str(world["dicts"][0]), "--interp", str(world["root"] / "interpret"),
               "--data", str(world["root"] / "store"), "--out", str(tmp_path / "full"), "--max-features", "3"])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_neuronpedia_export_one_json_per_feature(world, tmp_path, capsys):
    from difflens.cli import main
    from difflens.store import Store

    interp = world["root"] / "interpret"
    out = tmp_path / "np"
    rc = main(["browse", "neuronpedia", "--interp", str(interp), "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["sources"]) == {"topk", "itda"}
    prompts = {s["sample_id"]: s["prompt"] for s in Store(world["root"] / "store").samples()}
    for name in ("topk", "itda"):
        index = json.loads((interp / name / "features" / "index.json").read_text())
        mine = json.loads((out / name / "index.json").read_text())
        assert [r["index"] for r in mine["features"]] == [r["feature"] for r in index["features"]]
        assert summary["sources"][name]["features"] == len(index["features"])
        for row in index["features"]:
            rec = json.loads((out / name / f"{row['feature']}.json").read_text())
            assert rec["schema"] == "difflens.feature/1" and rec["index"] == row["feature"] and rec["layer"] == SITE
            assert rec["frac_nonzero"] == row["frequency"] and rec["maxActApprox"] == row["max"]
            assert [e["description"] for e in rec["explanations"]] == ([] if row["explanation"] is None else [row["explanation"]])
            src = interp / name / "features" / f"{row['feature']}.json"
            if not src.exists():
                assert rec["activations"] == []
                continue
            detail = json.loads(src.read_text())
            assert len(rec["activations"]) == len(detail["top"])
            for a, e in zip(rec["activations"], detail["top"]):
                h, w = a["grid_hw"]
                assert len(a["values"]) == h * w and a["maxValue"] == e["value"]
                assert a["values"][a["maxValueTokenIndex"]] == max(a["values"])
                assert a["prompt"] == prompts[a["sample_id"]] and (out / "img" / f"{a['sample_id']}.png").is_file()
    assert main(["browse", "neuronpedia", "--interp", str(interp), "--out", str(out), "--source", "topk"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert main(["browse", "neuronpedia", "--interp", str(interp), "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    assert main(["browse", "neuronpedia", "--interp", str(interp), "--source", "nope", "--out", str(tmp_path / "n")]) == 2
    assert "it holds itda, topk" in capsys.readouterr().err


# ---- server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def served(world, tmp_path_factory):
    """The site (with playground) served on a free port by a background thread."""
    from difflens.browse.export import export_site, feature_rows
    from difflens.browse.data import resolve_inputs
    from difflens.browse.server import build_playground, make_server, playground_page_extras

    pg, config = build_playground(world["dicts"], adapter=world["adapter"])
    truth = world["adapter"].ground_truth()  # the example prompt comes from the model's world, not its name
    assert pg.default_steps == world["adapter"].default_steps
    assert config["example_prompt"] and truth.knows([config["example_prompt"]]) and config["example_prompt"] in config["hint"]
    inputs = resolve_inputs(world["dicts"])
    config.update(playground_page_extras({e.slug: feature_rows(e, None) for e in inputs.dicts}, config["slugs"]))
    config["default_steps"] = 2
    site = export_site(world["dicts"], tmp_path_factory.mktemp("served") / "site", playground=config, show_progress=False)
    (site.parent / "secret.txt").write_text("outside the site")
    httpd = make_server(site, port=0, playground=pg, quiet=True)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield {"httpd": httpd, "port": httpd.server_address[1], "site": site, "pg": pg}
    httpd.shutdown()
    httpd.server_close()


def _request(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=None if body is None else json.dumps(body).encode(),
              headers={"Content-Type": "application/json"} if body is not None else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Content-Type"), data


def test_server_binds_localhost_and_serves_only_its_files(served):
    port = served["port"]
    assert served["httpd"].server_address[0] == "127.0.0.1"
    st, ct, body = _request(port, "GET", "/")
    assert st == 200 and ct.startswith("text/html") and b'data-page="index"' in body
    assert _request(port, "GET", "/features/topk/0.html")[0] == 200
    st, _, body = _request(port, "GET", "/playground.html")
    assert st == 200 and re.findall(rb'<script src="([^"]+)"></script>', body) == [b"app.js", b"playground.js"]
    for js in ("/app.js", "/playground.js", "/pages.js"):  # the playground page's scripts and the other pages'
        st, ct, body = _request(port, "GET", js)
        assert st == 200 and ct.startswith("text/javascript") and b"register" in body, js
    for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/%2e%2e/etc/passwd", "/features/../../secret.txt",
                "/..%2fsecret.txt", "//etc/passwd", "/%2fetc%2fpasswd", "/img/%00.png"):
        st, _, body = _request(port, "GET", bad)
        assert st in (403, 404), bad
        assert b"outside the site" not in body and b"root:" not in body
    # an absolute-form request target is refused too
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.putrequest("GET", "http://example.org/../secret.txt", skip_host=True)
    c.endheaders()
    r = c.getresponse()
    assert r.status in (403, 421) and b"outside" not in r.read()  # 421: no Host header naming this server
    c.close()


def test_resolve_in_site_rejects_symlinks_out(tmp_path):
    from difflens.browse.server import resolve_in_site

    root = tmp_path / "site"
    root.mkdir()
    (tmp_path / "secret").write_text("x")
    (root / "link").symlink_to(tmp_path / "secret")
    assert resolve_in_site(root, "/link") is None
    assert resolve_in_site(root, "/a/b.html") == (root / "a" / "b.html").resolve()


def test_api_generate_steer_and_intervene(served, world):
    port = served["port"]
    prompt = "a large red circle in the center on a black plain background"
    st, _, body = _request(port, "POST", "/api/generate", {"prompt": prompt, "seed": 1, "steps": 2, "dict": "topk"})
    assert st == 200, body
    out = json.loads(body)
    assert out["image"].startswith("data:image/png;base64,") and len(out["steps"]) == 2
    step = out["steps"][-1]
    assert len(step["tokens"]) == 256 and step["top"]
    # the per-token features agree with encoding the recorded activation directly
    from difflens.intervene.run import record_activations

    rec = record_activations(world["adapter"], [prompt], [1], SITE, steps=2)
    d = served["pg"].dicts["topk"]
    acts, is_cond, _ = rec.acts[(1, 0)]
    x = acts[torch.nonzero(is_cond).flatten()[0]]
    codes = d.encode(x, torch.full((x.shape[0],), rec.timesteps[1]))
    tok = int(np.argmax([sum(v for _, v in t) for t in step["tokens"]]))
    want = torch.topk(codes[tok], len(step["tokens"][tok])).indices.tolist()
    assert [f for f, _ in step["tokens"][tok]] == want
    st, _, body = _request(port, "POST", "/api/steer", {"prompt": prompt, "seed": 1, "steps": 2, "dict": "topk",
                                                        "feature": 3, "scale": 4.0})
    assert st == 200, body
    steered = json.loads(body)
    assert steered["image"] != out["image"] and (steered["feature"], steered["scale"]) == (3, 4.0)  # steering changed the picture
    # bad inputs: a 400 with the message, not a traceback
    for req, msg in (({"prompt": f"a red {XSS_SCRIPT}", "steps": 2, "dict": "topk"}, "word"),
                     ({"prompt": prompt, "steps": 0, "dict": "topk"}, "steps"),
                     ({"prompt": prompt, "steps": 2, "dict": "nope"}, "unknown dictionary"),
                     ({"prompt": prompt, "steps": 2, "dict": "topk", "feature": 10**6, "scale": 1}, "feature")):
        path = "/api/steer" if "feature" in req else "/api/generate"
        st, ct, body = _request(port, "POST", path, req)
        assert st == 400 and ct == "application/json", body
        assert msg in json.loads(body)["error"] and "Traceback" not in body.decode()
    # the generic route: the same steering through /api/intervene, and the registry's specs over GET
    st, _, body = _request(port, "POST", "/api/intervene", {"prompt": prompt, "seed": 1, "steps": 2, "dict": "topk",
                                                            "kind": "steer", "params": {"feature": 3, "scale": 4.0}})
    assert st == 200, body
    assert json.loads(body)["image"] == steered["image"] and json.loads(body)["params"] == {"feature": 3, "scale": 4.0}
    st, ct, body = _request(port, "GET", "/api/interventions")
    specs = {s["name"]: s for s in json.loads(body)["interventions"]}
    assert st == 200 and ct == "application/json" and {"steer", "edit", "transfer"} <= set(specs)
    assert [p["name"] for p in specs["steer"]["params"]] == ["feature", "scale"]
    for req, msg in (({"kind": "steer", "params": {"feature": 64 * 99}}, "feature must be an integer in 0.."),
                     ({"kind": "edit", "params": {"features": "1,x"}}, "features must be feature ids"),
                     ({"kind": "edit", "params": {"features": [1], "op": "drop"}}, "op must be one of ablate, clamp, scale"),
                     ({"kind": "transfer", "params": {}}, "reference_prompt is missing"),
                     ({"kind": "nope", "params": {}}, "unknown intervention 'nope'")):
        st, ct, body = _request(port, "POST", "/api/intervene", {"prompt": prompt, "steps": 2, "dict": "topk", **req})
        assert st == 400 and ct == "application/json", body
        assert msg in json.loads(body)["error"], body
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/api/generate", body=b"{not json", headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 400 and "JSON" in json.loads(r.read())["error"]
    c.close()


def test_playground_where_window_region_and_branch(served, world):
    """/api/intervene's "where" (step window, region in tokens, CFG branch) builds the same intervention
    as the Python API with those keywords: the same image; bad values are refused by name."""
    from difflens.intervene.region import Region, Window
    from difflens.intervene.run import generate_with
    from difflens.intervene.steer import Steer

    port = served["port"]
    prompt = "a large red circle in the center on a black plain background"
    req = {"prompt": prompt, "seed": 1, "steps": 2, "dict": "topk", "kind": "steer", "params": {"feature": 3, "scale": 4.0}}
    st, _, body = _request(port, "POST", "/api/intervene", req)
    everywhere = json.loads(body)
    where = {"window": "0:1", "region": [0, 0, 8, 16], "region_units": "tokens", "branch": "cond"}
    st, _, body = _request(port, "POST", "/api/intervene", {**req, "where": where})
    assert st == 200, body
    out = json.loads(body)
    assert out["steps_applied"] == [0] and everywhere["steps_applied"] == [0, 1]
    assert "box 0,0,8,16 (tokens)" in out["intervention"] and "cond branch" in out["intervention"]
    assert out["image"] != everywhere["image"]
    d = served["pg"].dicts["topk"]
    iv = Steer(d, [3], 4.0, mode="token-norm", window=Window.parse("0:1"), branch="cond",
               region=Region(box=(0, 0, 8, 16), units="tokens"))
    gen = generate_with(world["adapter"], [prompt], [1], [iv], steps=2)
    from difflens.browse.server import _png_data_url

    img = np.asarray(gen.images[0])
    assert out["image"] == _png_data_url(img, max(1, 320 // max(img.shape[:2])))
    # the region as the CLI writes it, in pixels: the same tokens (toy tokens are 2x2 px)
    st, _, body = _request(port, "POST", "/api/intervene", {**req, "where": {**where, "region": "0,0,16,32", "region_units": "px"}})
    assert st == 200 and json.loads(body)["image"] == out["image"], body
    for bad, msg in (({"window": "3:1"}, "window '3:1': need a < b"),
                     ({"window": "5:9"}, "selects none of this run's 2 steps"),
                     ({"window": 3}, "window must be text"),
                     ({"region": [1, 2, 3]}, "region must be four numbers"),
                     ({"region": [4, 0, 2, 8]}, "is empty"),
                     ({"region_units": "cm"}, "region_units must be one of px, tokens"),
                     ({"branch": "left"}, "branch must be one of both, cond, uncond"),
                     ({"steps": "0:1"}, "where has no key 'steps'"),
                     ("0:1", "where must be a JSON object")):
        st, ct, body = _request(port, "POST", "/api/intervene", {**req, "where": bad})
        assert st == 400 and ct == "application/json", body
        assert msg in json.loads(body)["error"], (bad, body)


def test_a_registered_intervention_reaches_the_playground_api(served, monkeypatch):
    """An intervention declared only in a test file (tests/test_intervene_cli.py) is listed and runs."""
    from test_intervene_cli import zero_tokens_spec

    from difflens.intervene.registry import INTERVENTIONS, intervention_specs

    intervention_specs()
    monkeypatch.setitem(INTERVENTIONS, "zero-tokens", zero_tokens_spec())
    port = served["port"]
    st, _, body = _request(port, "GET", "/api/interventions")
    assert "zero-tokens" in {s["name"] for s in json.loads(body)["interventions"]}
    req = {"prompt": "a large red circle in the center on a black plain background", "seed": 1, "steps": 2, "dict": "topk",
           "kind": "zero-tokens"}
    st, _, body = _request(port, "POST", "/api/intervene", {**req, "params": {"token": 120}})
    assert st == 200 and json.loads(body)["steps_applied"] == [0, 1], body
    st, _, body = _request(port, "POST", "/api/intervene", {**req, "params": {"token": -1}})
    assert st == 400 and "token must be an integer in 0..255" in json.loads(body)["error"]


# ---- headless Chromium ------------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("DIFFLENS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DIFFLENS_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 90  # seconds; the CI machine may be busy


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        return f"chromium not found at {CHROMIUM} (Debian: apt-get install chromium chromium-driver; `make test` tries this as root)"
    if not (Path(CHROMEDRIVER).is_file() or shutil.which("chromedriver")):
        return f"chromedriver not found at {CHROMEDRIVER} (Debian: apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; it is in the dev extras)"
    return None


@pytest.fixture(scope="module")
def driver():
    why = _missing()
    if why:
        pytest.skip(f"browser tests skipped: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="difflens-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver"))
    try:
        drv = webdriver.Chrome(service=service, options=opts)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is an environment problem
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"browser tests skipped: chromium did not start ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    drv.set_page_load_timeout(WAIT)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(drv, cond, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, WAIT, poll_frequency=0.2).until(lambda d: cond(d), message=what)


def _severe(drv, allow=()) -> list[str]:
    logs = drv.get_log("browser")
    return [e["message"] for e in logs if e["level"] == "SEVERE" and not any(a in e["message"] for a in allow)]


def _rendered(drv):
    _wait(drv, lambda d: d.execute_script("return document.body.getAttribute('data-rendered')") == "1", "page rendered")


def _check_index_and_feature(drv, base: str):
    from selenium.webdriver.common.by import By

    drv.get(base + "index.html")
    _rendered(drv)
    rows = drv.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    n_all = len(rows)
    assert n_all > 5
    # search filters: the planted explanation matches a word only it has
    box = drv.find_element(By.ID, "search")
    box.send_keys("__pwned")
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == 1, "search filters to one row")
    row = drv.find_element(By.CSS_SELECTOR, "#features tbody tr")
    assert row.find_element(By.CSS_SELECTOR, "td.expl").text == XSS  # shown literally, not run
    assert drv.execute_script("return typeof window.__pwned") == "undefined"
    box.clear()
    box.send_keys("zzz-no-such-feature")
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == 0, "search shows nothing")
    box.clear()
    box.send_keys(" ")
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#features tbody tr")) == n_all, "search cleared")
    # sorting by feature id, ascending
    drv.find_element(By.CSS_SELECTOR, "#features th[data-key='f']").click()
    ids = [int(td.text.lstrip("#")) for td in drv.find_elements(By.CSS_SELECTOR, "#features tbody tr td:nth-child(2)")]
    topk = [i for i, td in zip(ids, drv.find_elements(By.CSS_SELECTOR, "#features tbody tr td:first-child")) if td.text == "topk"]
    assert topk == sorted(topk)

    # the planted feature's page: images with heatmaps, the explanation and prompt as text
    drv.get(base + f"features/topk/{PLANTED}.html")
    _rendered(drv)
    cards = drv.find_elements(By.CSS_SELECTOR, "#top-images canvas")
    assert cards
    _wait(drv, lambda d: all(c.get_attribute("data-loaded") == "1" for c in d.find_elements(By.CSS_SELECTOR, "#top-images canvas")),
          "top images loaded")
    assert drv.find_element(By.ID, "explanation").text == XSS
    prompts = [e.text for e in drv.find_elements(By.CSS_SELECTOR, "#top-images .prompt")]
    assert any(XSS_SCRIPT in p and XSS_IMG in p for p in prompts)
    assert drv.find_elements(By.CSS_SELECTOR, "#histogram svg rect") and drv.find_elements(By.CSS_SELECTOR, "#profile svg polyline")
    assert drv.find_elements(By.CSS_SELECTOR, "#neighbours tr td a")
    assert drv.execute_script("return typeof window.__pwned") == "undefined"
    assert not drv.find_elements(By.CSS_SELECTOR, "img[src='x']")

    drv.get(base + "compare.html")
    _rendered(drv)
    assert len(drv.find_elements(By.CSS_SELECTOR, "#metrics tr")) == 3  # header + topk + itda


def test_static_site_from_file_system(driver, site):
    from selenium.webdriver.common.by import By

    driver.get_log("browser")  # drop anything earlier
    _check_index_and_feature(driver, site.resolve().as_uri() + "/")
    # an ITDA atom page shows its source image with the token outlined
    for page in sorted((site / "features" / "itda").glob("*.html")):
        if '"provenance"' in page.read_text():
            driver.get(page.resolve().as_uri())
            _rendered(driver)
            _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#provenance canvas").get_attribute("data-loaded") == "1",
                  "provenance image loaded")
            break
    else:
        pytest.fail("no ITDA page with provenance")
    assert _severe(driver) == []


def test_server_and_playground(driver, served):
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{served['port']}/"
    driver.get_log("browser")
    _check_index_and_feature(driver, base)
    driver.get(base + "playground.html")
    _rendered(driver)
    driver.find_element(By.ID, "steps").clear()
    driver.find_element(By.ID, "steps").send_keys("2")
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: d.find_element(By.ID, "pg-image").get_attribute("data-ready") == "1"
          or d.find_element(By.ID, "error").text, "generated image")
    assert driver.find_element(By.ID, "error").text == ""
    assert driver.find_elements(By.CSS_SELECTOR, "#step-features li")
    driver.find_element(By.ID, "pg-image").click()  # pick the centre token
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#token-features li"), "token features")
    assert "token" in driver.find_element(By.ID, "token-label").text
    # the intervention sections are built from the registry's specs: steer with its feature and scale slider
    assert {"steer-section", "edit-section", "transfer-section"} <= {
        e.get_attribute("id") for e in driver.find_elements(By.CSS_SELECTOR, "section[id$='-section']")}
    assert driver.find_element(By.ID, "steer-scale").get_attribute("type") == "range"
    driver.find_element(By.CSS_SELECTOR, "#step-features li button").click()  # "use": the feature goes into the fields
    picked = driver.find_element(By.CSS_SELECTOR, "#step-features li").text.split()[0].lstrip("#")
    assert driver.find_element(By.ID, "steer-feature").get_attribute("value") == picked
    assert driver.find_element(By.ID, "edit-features").get_attribute("value") == picked
    driver.find_element(By.ID, "steer").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result-steer").is_displayed() or d.find_element(By.ID, "error").text, "steered image")
    assert driver.find_element(By.ID, "error").text == ""
    assert f"features {picked} " in driver.find_element(By.ID, "result-steer-caption").text
    # where: a region dragged on the image (token units), a step window and the conditional branch
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element(By.ID, "pg-image")
    w, h = canvas.size["width"], canvas.size["height"]  # 16 x 16 tokens on the toy model
    ActionChains(driver).move_to_element_with_offset(canvas, int(-w * 0.45), int(-h * 0.45)).click_and_hold() \
        .move_to_element_with_offset(canvas, int(-w * 0.05), int(h * 0.05)).release().perform()
    region = driver.find_element(By.ID, "where-region").get_attribute("value")
    x0, y0, x1, y1 = map(int, region.split(","))
    assert (x0, y0) == (0, 0) and 7 <= x1 <= 9 and 8 <= y1 <= 10, region
    driver.find_element(By.ID, "where-window").send_keys("0:1")
    driver.find_element(By.CSS_SELECTOR, "#where-branch option[value='cond']").click()
    before = driver.find_element(By.ID, "result-steer").get_attribute("src")
    driver.find_element(By.ID, "steer").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result-steer").get_attribute("src") != before
          or d.find_element(By.ID, "error").text, "steered in the region")
    assert driver.find_element(By.ID, "error").text == ""
    caption = driver.find_element(By.ID, "result-steer-caption").text
    assert f"box {region} (tokens)" in caption and "steps 0:1" in caption and "cond branch" in caption, caption
    driver.find_element(By.ID, "where-clear").click()
    driver.find_element(By.ID, "where-window").clear()
    driver.find_element(By.CSS_SELECTOR, "#where-branch option[value='both']").click()
    # a transfer shows the reference image beside its result
    driver.find_element(By.ID, "transfer").click()
    _wait(driver, lambda d: d.find_element(By.ID, "result-transfer").is_displayed() or d.find_element(By.ID, "error").text,
          "transferred image")
    assert driver.find_element(By.ID, "error").text == ""
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#transfer-section figcaption")][1:] == ["reference"]
    assert _severe(driver) == []
    # a prompt with markup: the server's error message comes back and is shown as text
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(f"a red {XSS_IMG} {XSS_SCRIPT}")
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: d.find_element(By.ID, "error").text, "error shown")
    err = driver.find_element(By.ID, "error").text
    assert "unknown word" in err and ("<img" in err or "<script>" in err)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert not driver.find_elements(By.CSS_SELECTOR, "img[src='x']")
    assert _severe(driver, allow=("status of 400",)) == []  # the refused request itself is logged by the browser


def test_export_reads_a_dictionary_from_the_hub_cache(world, tmp_path, monkeypatch):
    """`browse export --dict hf:ORG/REPO` reads the config from the local HF cache and names the
    dictionary after the repository."""
    import shutil

    import huggingface_hub.constants

    from difflens.browse.data import read_dict_cfg, resolve_inputs
    from difflens.cli import main

    sha = "2" * 40
    root = tmp_path / "hf_cache" / "models--org--toy-topk"
    shutil.copytree(world["dicts"][0], root / "snapshots" / sha)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert read_dict_cfg("hf:org/toy-topk") == json.loads((world["dicts"][0] / "cfg.json").read_text())
    entry, = resolve_inputs(["hf:org/toy-topk"], interp=world["root"] / "interpret").dicts
    assert entry.name == "toy-topk" and entry.path == root / "snapshots" / sha
    out = tmp_path / "site"
    rc = main(["browse", "export", "--dict", "hf:org/toy-topk", "--interp", str(world["root"] / "interpret"),
               "--data", str(world["root"] / "store"), "--out", str(out), "--max-features", "2"])
    assert rc == 0 and len(list((out / "features" / "toy-topk").glob("*.html"))) == 2
    assert main(["browse", "export", "--dict", "hf:org/gone", "--out", str(tmp_path / "z")]) == 2


def test_browse_shows_an_interpret_cache_without_a_judge(world, tmp_path, capsys):
    """`interpret cache --dict D --data S --out I/<name>` writes feature pages; `browse export --interp I`
    shows them (top images, profiles, histograms) with the explanation column empty."""
    from difflens.cli import main

    interp = tmp_path / "interp"
    rc = main(["interpret", "cache", "--dict", str(world["dicts"][0]), "--data", str(world["root"] / "store"),
               "--out", str(interp / "topk"), "--heatmaps", "0", "--top-n", "3", "--quantiles", "1", "--min-tokens", "1"])
    assert rc == 0
    index = json.loads((interp / "topk" / "features" / "index.json").read_text())
    assert index["features"] and all(r["explanation"] is None for r in index["features"])
    out = tmp_path / "site"
    rc = main(["browse", "export", "--dict", str(world["dicts"][0]), "--interp", str(interp),
               "--data", str(world["root"] / "store"), "--out", str(out), "--max-features", "3"])
    assert rc == 0, capsys.readouterr().err
    pages = list((out / "features" / "topk").glob("*.html"))
    assert len(pages) == 3
    fp = page_data(pages[0])
    assert fp["top"] and all(t["img"] for t in fp["top"]) and not fp.get("explanation")
    assert fp["histogram"]["counts"] and len(fp["profile_mean"]) == 2
    rows = page_data(out / "index.html")["rows"]["topk"]
    assert len(rows) == 3 and not any(r["expl"] for r in rows)
