"""Issue 17, one test (or more) per numbered failure: careless and hostile use must not destroy files,
train on corrupt data, follow links out of a folder or hand a key to another host.

Fault injection on small stores built with the StoreWriter (no model), a local mock VLM server and
a local browse server on 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from test_interpret_client import MSG, SECRET, FakeVLM, answer
from test_store import IMG, SITES, build, make_unit, open_writer

import difflens
from difflens.cli import main
from difflens.errors import DifflensError
from difflens.store import Store

SRC = str(Path(difflens.__file__).resolve().parents[1])  # the difflens under test, also in subprocesses


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("DIFFLENS_QUIET", "1")


def _tiny_dict(folder: Path, d: int = 12, site: str = IMG) -> Path:
    from difflens.dictionaries import DictConfig, TopKSAE, save

    save(TopKSAE(DictConfig(arch="topk", d_in=d, width=8, k=2, site=site, normalization="none", init_seed=0)), folder)
    return folder


def _record(store: Path, unit: str) -> dict:
    return json.loads((store / "units" / f"{unit}.json").read_text())


def _rewrite_shard(store: Path, unit: str, edit) -> None:
    """Change a shard's bytes with `edit(tensor_bytes_view_fn)` and update its record's checksum and size,
    as an attacker (or a buggy tool) that knows the format would: only content checks can notice."""
    from difflens.store.shardfile import SafetensorsFile

    path = store / "shards" / f"{unit}.safetensors"
    f = SafetensorsFile(path)
    data = bytearray(path.read_bytes())
    edit(f, data)
    path.write_bytes(bytes(data))
    rec = _record(store, unit)
    rec["sha256"], rec["bytes"] = hashlib.sha256(bytes(data)).hexdigest(), len(data)
    (store / "units" / f"{unit}.json").write_text(json.dumps(rec))
    m = json.loads((store / "manifest.json").read_text())
    for js in m["shards"]:
        if js["unit_id"] == unit:
            js.update(sha256=rec["sha256"], bytes=rec["bytes"])
    (store / "manifest.json").write_text(json.dumps(m))


def _put(f, data: bytearray, name: str, values: np.ndarray, row: int = 0) -> None:
    t = f.info(name)
    raw = np.ascontiguousarray(values.astype(t.np_dtype)).tobytes()
    at = t.start + row * t.row_bytes
    data[at : at + len(raw)] = raw


# ---- 1. browse export --out never deletes a user's folder ------------------------------------------------
def test_1_export_refuses_a_user_folder_with_a_site_json(tmp_path, capsys):
    d = _tiny_dict(tmp_path / "dict")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "site.json").write_text("{}")
    (proj / "thesis.tex").write_text("thesis")
    assert main(["browse", "export", "--dict", str(d), "--out", str(proj)]) == 2
    assert "not a site exported by difflens" in capsys.readouterr().err
    assert (proj / "thesis.tex").read_text() == "thesis" and (proj / "site.json").read_text() == "{}"
    # a real earlier export with a user file added is refused too, naming the file
    site = tmp_path / "site"
    assert main(["browse", "export", "--dict", str(d), "--out", str(site)]) == 0
    assert main(["browse", "export", "--dict", str(d), "--out", str(site)]) == 0  # re-export of its own site
    (site / "notes.txt").write_text("mine")
    assert main(["browse", "export", "--dict", str(d), "--out", str(site)]) == 2
    assert "notes.txt" in capsys.readouterr().err and (site / "notes.txt").read_text() == "mine"


def test_1_every_out_refuses_foreign_folders(tmp_path):
    from difflens.outdir import claim_out_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("keep")
    with pytest.raises(DifflensError, match="did not write .*data.csv"):
        claim_out_dir(foreign, "train")
    assert (foreign / "data.csv").read_text() == "keep"
    mine = claim_out_dir(tmp_path / "new", "train")
    (mine / "x").write_text("1")
    assert claim_out_dir(mine, "train") == mine  # its own marker: accepted again
    with pytest.raises(DifflensError, match="output of `difflens train`"):
        claim_out_dir(mine, "interpret")


# ---- 2 and 8. nothing is read through a link or a path out of its folder ------------------------------------
def test_2_symlinked_image_is_not_read_copied_or_served(tmp_path):
    from difflens.browse.export import _Samples

    store = tmp_path / "s"
    build(store, units=[0])
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET")
    img = store / "images" / "0.png"
    img.unlink()
    img.symlink_to(secret)
    with pytest.raises(DifflensError, match="leads out of"):
        Store(store).image_path(0)
    samples = _Samples(store)
    assert samples.use(0)["img"] is False and samples.use(1)["img"] is True
    samples.copy_to(tmp_path / "site_img")
    assert sorted(p.name for p in (tmp_path / "site_img").iterdir()) == ["1.png"]


def test_2_interpretation_files_are_confined(tmp_path):
    from difflens.browse.data import DictEntry

    interp = tmp_path / "interp"
    (interp / "features").mkdir(parents=True)
    outside = tmp_path / "outside.json"
    outside.write_text('{"stolen": true}')
    (interp / "features" / "3.json").symlink_to(outside)
    e = DictEntry(name="d", slug="d", path=tmp_path, cfg={}, interp=interp)
    with pytest.raises(DifflensError, match="leads out of"):
        e.feature_json(3)


def test_8_record_paths_are_confined_to_the_store(tmp_path, capsys):
    store = tmp_path / "s"
    build(store, units=[0, 1], finalize=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    rec = _record(store, "u001")
    rec["shard"] = os.path.relpath(victim, store)  # '../victim.txt'
    (store / "units" / "u001.json").write_text(json.dumps(rec))
    with pytest.raises(DifflensError) as err:
        Store(store)
    msg = str(err.value)
    assert "u001.json" in msg and "store repair" in msg and "victim" not in msg.split("Fix:")[-1]
    assert main(["store", "repair", str(store)]) == 0
    assert victim.read_text() == "precious"  # never opened, moved or deleted
    assert not (store / "units" / "u001.json").exists()
    assert (store / "quarantine").is_dir() and Store(store).verify()["units"] == 1


# ---- 3 and 9. the VLM client ------------------------------------------------------------------------------------
def test_3_key_never_follows_a_redirect_to_another_origin():
    other = FakeVLM()  # a second origin (another port on 127.0.0.1)
    first = FakeVLM()
    try:
        first.script = [("status", 302, {"Location": other.url + "/chat/completions"})]
        from difflens.interpret.client import ChatClient, ClientConfig

        c = ChatClient(ClientConfig(base_url=first.url, model="m", api_key=SECRET, timeout=5, max_retries=0))
        r = c.complete(MSG)
        assert not r.ok and "redirect" in r.error and "not followed" in r.error
        assert other.requests == [] and other.auth == []  # the other origin saw nothing, no key
        assert SECRET not in r.error
    finally:
        first.close()
        other.close()


class _Trickle:
    """Answers 200 with headers, then one byte every 0.2 s (at most 60 bytes): a stalling server."""

    def __init__(self):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for _ in range(60):
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.2)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_9_timeout_is_a_total_deadline():
    from difflens.interpret.client import ChatClient, ClientConfig

    s = _Trickle()
    try:
        c = ChatClient(ClientConfig(base_url=s.url, model="m", timeout=1.0, max_retries=0))
        t0 = time.monotonic()
        r = c.complete(MSG)
        took = time.monotonic() - t0
        assert not r.ok and "timeout" in r.error
        assert took < 4.0, f"a 1 s deadline took {took:.1f} s"
    finally:
        s.close()


def test_9_most_calls_failing_stops_the_run_with_a_summary():
    from difflens.interpret.client import ChatClient, ClientConfig

    s = FakeVLM(default=lambda req: ("status", 401))
    try:
        c = ChatClient(ClientConfig(base_url=s.url, model="m", api_key=SECRET, timeout=5, max_retries=0))
        with pytest.raises(DifflensError, match=r"4 of 4 VLM requests failed .*HTTP 401") as err:
            c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(4)])
        assert SECRET not in str(err.value)
        s.default = lambda req: ("json", answer("0.5"))
        assert all(r.ok for r in c.complete_many([MSG]))
    finally:
        s.close()


def test_9_interpret_run_stops_when_the_judge_fails(tmp_path):
    from test_interpret import D, SITE, world_store

    from difflens.interpret import CacheConfig, NeuronFeatures, run_pipeline
    from difflens.interpret.client import ClientConfig

    store = world_store(tmp_path / "store", n=20)
    s = FakeVLM(default=lambda req: ("status", 403))
    try:
        cfg = ClientConfig(base_url=s.url, model="m", api_key=SECRET, timeout=5, max_retries=0)
        with pytest.raises(DifflensError, match=r"VLM requests failed .*HTTP 403"):
            run_pipeline({"n": NeuronFeatures(SITE, D, name="n")}, store, tmp_path / "run", judge="openai", baselines=(),
                         n_features=2, client_config=cfg, cache_config=CacheConfig(top_n=5, n_quantiles=1), grids=False)
    finally:
        s.close()


# ---- 4. corrupt or non-finite data is refused, with the shard named -------------------------------------------
def test_4_flipped_byte_is_caught_on_read(tmp_path):
    store = tmp_path / "s"
    build(store, units=[0, 1])
    path = store / "shards" / "u001.safetensors"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    s = Store(store)
    with pytest.raises(DifflensError, match=r"u001\.safetensors is damaged \(checksum mismatch"):
        for _ in s.batches(IMG, 16):
            pass


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_4_nonfinite_activations_refused_with_the_shard_named(tmp_path, dtype):
    store = tmp_path / "s"
    build(store, units=[0, 1], dtype=dtype)
    nan = np.array([[np.nan, np.inf]], np.float32)
    raw = torch.from_numpy(nan).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else nan

    def edit(f, data):
        t = f.info(f"{IMG}/acts")
        at = t.start + 3 * t.row_bytes
        b = raw.tobytes()
        data[at : at + len(b)] = b

    _rewrite_shard(store, "u001", edit)
    with pytest.raises(DifflensError, match=r"u001\.safetensors is damaged \(non-finite activations \(blk.1:img: 2 NaN/inf"):
        Store(store).meta(IMG)


def test_4_tampered_step_column_refused(tmp_path):
    store = tmp_path / "s"
    build(store, units=[0, 1])
    _rewrite_shard(store, "u000", lambda f, data: _put(f, data, f"{IMG}/step", np.array([99]), row=2))
    with pytest.raises(DifflensError, match=r"u000\.safetensors.*step holds 0\.\.99, but the harvest ran 3 steps"):
        Store(store).meta(IMG)


def test_4_metrics_jsonl_is_strict_json(tmp_path):
    from difflens.train.logbook import MetricsLog

    log = MetricsLog(tmp_path)
    log.append({"kind": "train", "step": 1, "loss": float("nan"), "fvu": np.float32("inf"), "l0": torch.tensor(float("nan")),
                "by_timestep": [{"fvu": float("nan"), "step": 0}]})
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(name):
        raise ValueError(name)

    rec = json.loads(line, parse_constant=refuse)
    assert rec["loss"] is None and rec["fvu"] is None and rec["l0"] is None and rec["by_timestep"][0]["fvu"] is None


def test_4_train_stops_on_a_nonfinite_loss(tmp_path, capsys):
    """Finite but huge activations overflow the loss: training must stop naming the step and the shard."""
    from difflens.store import StoreWriter

    w = open_writer(tmp_path / "s")
    for u in range(2):
        rows, samples, images = make_unit(u)
        acts, meta = rows[IMG]
        rows[IMG] = (acts * 3e37, meta)
        w.write_unit(f"u{u:03d}", rows, samples, images)
    w.finalize()
    assert isinstance(w, StoreWriter)
    rc = main(["train", "--data", str(tmp_path / "s"), "--site", IMG, "--arch", "topk", "--width", "8", "--k", "2",
               "--tokens", "24", "--batch-size", "8", "--eval-tokens", "0", "--normalization", "none",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "training stopped at step 1" in err and "not finite" in err, err
    assert "shards/u00" in err and "the data is finite" in err


# ---- 5. verify names every bad unit; repair makes --resume regenerate them exactly ------------------------------
def test_5_verify_and_repair_then_resume_regenerates_exactly(tmp_path, capsys):
    store = tmp_path / "s"
    made = build(store, units=range(3))
    before = Store(store).read_rows(IMG, np.arange(Store(store).num_rows(IMG))).clone()
    fp = Store(store).fingerprint()
    (store / "shards" / "u001.safetensors").write_bytes(b"junk")
    (store / "samples" / "u002.jsonl").write_text("{}\n")
    assert main(["store", "verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "u001:" in out and "u002:" in out and "u000:" not in out and "store repair" in out
    assert main(["store", "repair", str(store)]) == 0
    assert "next: difflens harvest --resume" in capsys.readouterr().out
    w = open_writer(store)
    assert w.done_units() == {"u000"}  # the damaged units are free again for --resume
    for u in (1, 2):
        w.write_unit(f"u{u:03d}", *make_unit(u))
    w.finalize()
    s = Store(store)
    assert s.fingerprint() == fp and torch.equal(s.read_rows(IMG, np.arange(s.num_rows(IMG))), before)
    assert main(["store", "verify", str(store)]) == 0
    assert len(made) == 3


# ---- 6. a manifest/shard disagreement blames the manifest when the shards agree ------------------------------
@pytest.mark.parametrize("field", ["dtype", "width"])
def test_6_tampered_manifest_is_blamed_not_the_shards(tmp_path, field):
    store = tmp_path / "s"
    build(store, units=range(2))
    m = json.loads((store / "manifest.json").read_text())
    if field == "dtype":
        m["dtype"] = "bf16"
    else:
        m["sites"][IMG] = 16
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DifflensError) as err:
        Store(store).meta(IMG)
    msg = str(err.value)
    assert "manifest.json" in msg and "the manifest is wrong, not the shards" in msg and "shards/u000" not in msg
    assert main(["store", "repair", str(store)]) == 0
    s = Store(store)
    assert s.dtype == "fp32" and s.d(IMG) == SITES[IMG] and s.verify()["units"] == 2


# ---- 7. --append with a new configuration adds its units under fresh ids ------------------------------------------
def test_7_append_gets_fresh_unit_and_sample_ids(tmp_path):
    store = tmp_path / "s"
    build(store, units=[0, 1])
    w = open_writer(store, harvest_config={"steps": 3, "prompts": "other"}, append=True)
    assert w.unit_id(0) not in w.done_units() and w.unit_id(0) != "u0000000"
    assert w.first_sample_id == 102  # samples 0,1,100,101 exist
    again = open_writer(store, harvest_config={"steps": 3, "prompts": "other"})
    assert again.unit_id(0) == w.unit_id(0) and again.first_sample_id == 102  # stable on resume


def test_7_harvest_append_adds_the_new_units(tmp_path):
    from test_browse import SITE
    from toy_fixtures import make_tiny_toy

    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.world.prompts import world_prompts
    from difflens.models.toy.adapter import ToyAdapter

    toy = make_tiny_toy(tmp_path / "toy")
    adapter = ToyAdapter.load(folder=toy)
    prompts, scenes = world_prompts(1, seed=3)
    cfg = HarvestConfig(model=str(toy), sites=[SITE], steps=1, batch_size=1, tokens_per_image=4)
    harvest(tmp_path / "s", cfg, prompts, scenes=scenes, adapter=adapter)
    cfg2 = HarvestConfig(model=str(toy), sites=[SITE], steps=2, batch_size=1, tokens_per_image=4)
    res = harvest(tmp_path / "s", cfg2, prompts, scenes=scenes, adapter=adapter, append=True)
    assert res["units_written"] == 1 and res["rows_written"] > 0
    s = Store(tmp_path / "s")
    assert len(s.records) == 2 and len(s.samples()) == 2 and s.verify()["units"] == 2


# ---- 10. the local server ---------------------------------------------------------------------------------------
@pytest.fixture
def live_server(tmp_path):
    from difflens.browse.server import Playground, make_server

    site = tmp_path / "site"
    site.mkdir()
    (site / "site.json").write_text(json.dumps({"format": "difflens-browse-site"}))
    (site / "index.html").write_text("<p>hi</p>")
    httpd = make_server(site, port=0, playground=Playground(None, {"d": object()}, default_steps=8), quiet=True)
    th = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _req(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Content-Type": "application/json", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def test_10_nan_and_deep_json_get_400(live_server):
    for body in ('{"prompt": "a", "seed": NaN}', '{"prompt": "a", "seed": Infinity}', '{"prompt": "a", "seed": 1e999}',
                 "[" * 40000 + "]" * 40000):
        status, data = _req(live_server, "POST", "/api/generate", body.encode())
        assert status == 400 and "error" in json.loads(data), body[:40]
    assert _req(live_server, "GET", "/")[0] == 200  # the server still answers


def test_10_host_and_origin_checks(live_server):
    p = live_server
    assert _req(p, "GET", "/", headers={"Host": "evil.example:80"})[0] == 421  # DNS rebinding
    assert _req(p, "GET", "/", headers={"Host": f"localhost:{p}"})[0] == 200
    body = b'{"prompt": "a"}'
    status, _ = _req(p, "POST", "/api/generate", body, {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403
    assert _req(p, "POST", "/api/generate", body, {"Content-Type": "text/plain"})[0] == 415  # a form/text POST
    assert _req(p, "POST", "/api/generate", body, {"Origin": "http://evil.example"})[0] == 403
    status, data = _req(p, "POST", "/api/generate", b'{"prompt": ""}', {"Origin": f"http://127.0.0.1:{p}"})
    assert status == 400 and "prompt is empty" in json.loads(data)["error"]  # same origin reaches the API


def test_10_stalled_connection_is_dropped(tmp_path, monkeypatch):
    import difflens.browse.server as srv

    assert srv.READ_TIMEOUT <= 30
    monkeypatch.setattr(srv, "READ_TIMEOUT", 0.5)
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.json").write_text(json.dumps({"format": "difflens-browse-site"}))
    httpd = srv.make_server(site, port=0, quiet=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        s = socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes its headers
        t0 = time.monotonic()
        got = s.recv(100)  # the server closes the connection after its read timeout
        assert got == b"" and time.monotonic() - t0 < 5
        s.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_10_sigterm_removes_the_temporary_site(tmp_path):
    d = _tiny_dict(tmp_path / "dict")
    env = {**os.environ, "PYTHONPATH": SRC, "DIFFLENS_QUIET": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "difflens", "browse", "serve", "--dict", str(d), "--no-playground",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), line + proc.stderr.read()
        site = Path(line.split()[1])
        assert site.is_dir() and site.parent.name.startswith("difflens-site-")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert not site.parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- 11. messages instead of tracebacks ----------------------------------------------------------------------------
def test_11_non_utf8_prompt_file(tmp_path):
    from difflens.harvest.config import read_prompts

    p = tmp_path / "prompts.txt"
    p.write_bytes(b"a red circle\n\xff\xfe bad\n")
    with pytest.raises(DifflensError, match="not UTF-8"):
        read_prompts(str(p))


def test_11_unwritable_out_and_full_disk(tmp_path, monkeypatch):
    from difflens.outdir import claim_out_dir
    from difflens.store import fsio

    real_mkdir = Path.mkdir

    def ro_mkdir(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    with pytest.raises(DifflensError, match="cannot write .*ro.*Read-only file system.*choose a folder"):
        claim_out_dir(tmp_path / "ro", "train")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    w = open_writer(tmp_path / "s")
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(fsio.os, "replace", full)
    with pytest.raises(DifflensError, match="disk is full.*re-run"):
        w.write_unit("u000", *make_unit(0))
    monkeypatch.setattr(fsio.os, "replace", real_replace)
    w.write_unit("u000", *make_unit(0))  # after space is freed the unit writes normally
    assert Store(tmp_path / "s").verify()["units"] == 1


def test_11_train_out_file_and_int8_manifest(tmp_path, capsys):
    store = tmp_path / "s"
    build(store, units=[0, 1])
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc = main(["train", "--data", str(store), "--site", IMG, "--arch", "topk", "--width", "8", "--k", "2",
               "--tokens", "8", "--batch-size", "8", "--out", str(f)])
    assert rc == 2 and "is a file" in capsys.readouterr().err and f.read_text() == "x"
    m = json.loads((store / "manifest.json").read_text())
    m["dtype"] = "int8"
    (store / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DifflensError, match=r"manifest.json is damaged: dtype is 'int8'"):
        Store(store)


def test_11_failed_harvest_does_not_block_a_plain_rerun(tmp_path):
    w = open_writer(tmp_path / "s")  # a run that died before its first unit: manifest only
    assert w.done_units() == set()
    w2 = open_writer(tmp_path / "s", harvest_config={"steps": 5}, resume=False)  # plain rerun, other settings
    w2.write_unit(w2.unit_id(0), *make_unit(0))
    with pytest.raises(DifflensError, match="committed units: pass --resume"):
        open_writer(tmp_path / "s", harvest_config={"steps": 5}, resume=False)


def test_11_resume_mismatch_names_the_field(tmp_path):
    build(tmp_path / "s", units=[0])
    with pytest.raises(DifflensError, match=r"harvest_config.steps: stored 3, requested 4"):
        open_writer(tmp_path / "s", harvest_config={"steps": 4, "prompts": "grammar-v1"})


def test_11_recheckpoint_keeps_the_pointed_folder(tmp_path, monkeypatch):
    from difflens.train import checkpoint as ckpt

    def fill(folder):
        (folder / "state.json").write_text("{}")

    ckpt.write(tmp_path, 5, fill, keep=2)
    real = os.rename

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between building the new folder and renaming it in

    monkeypatch.setattr(ckpt.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write(tmp_path, 5, fill, keep=2)
    monkeypatch.setattr(ckpt.os, "rename", real)
    assert (ckpt.latest(tmp_path) / "state.json").exists()
    again = ckpt.write(tmp_path, 5, fill, keep=1)
    assert ckpt.latest(tmp_path) == again and (again / "state.json").exists()


def test_16_harvest_both_branches_records_the_branch(tmp_path):
    """Issue 16 item 2: --both-branches stores a branch column; readers must pick a branch."""
    from test_browse import SITE
    from toy_fixtures import make_tiny_toy

    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.world.prompts import world_prompts
    from difflens.models.toy.adapter import ToyAdapter

    toy = make_tiny_toy(tmp_path / "toy")
    prompts, scenes = world_prompts(1, seed=3)
    cfg = HarvestConfig(model=str(toy), sites=[SITE], steps=1, batch_size=1, tokens_per_image=4, cond_only=False,
                        guidance=3.0)
    harvest(tmp_path / "s", cfg, prompts, scenes=scenes, adapter=ToyAdapter.load(folder=toy))
    s = Store(tmp_path / "s")
    meta = s.meta(SITE)
    assert s.branches(SITE) == {"cond", "uncond"} and sorted(np.unique(meta["branch"]).tolist()) == [0, 1]
    with pytest.raises(DifflensError, match="both CFG branches"):
        s.batches(SITE, 2)
    cond = next(iter(s.batches(SITE, 64, branch="cond", columns=("acts", "index"))))
    assert (meta["branch"][cond["index"].numpy()] == 0).all() and len(cond["index"]) == 4
