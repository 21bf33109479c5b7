/* difflens feature browser: the index, feature and compare pages (token maps, SVG charts), drawn from
   the page's embedded data with the helpers of app.js. No network, no eval. */
(function () {
  "use strict";
  var D = window.difflens;
  var DATA = D.DATA;
  var ROOT = D.ROOT;
  var app = D.app;
  var el = D.el;
  var append = D.append;
  var clear = D.clear;
  var svgEl = D.svgEl;
  var isInt = D.isInt;
  var fmt = D.fmt;
  var imgSrc = D.imgSrc;
  var featureHref = D.featureHref;
  var section = D.section;
  var kvTable = D.kvTable;
  var notesList = D.notesList;

  // ---- token maps ------------------------------------------------------------------------------------------
  function decodeMap(enc) {
    if (!enc || typeof enc.b !== "string") return null;
    var raw = atob(enc.b), out = new Float32Array(raw.length), m = Number(enc.m) || 0;
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i) / 255 * m;
    return out;
  }
  // Draw a sample image (or grey) with the token map on top: alpha = 0.8 * sqrt(v / vmax), orange.
  function overlayCanvas(item, enc, gridHW, vmax, size, highlightToken) {
    var c = el("canvas", { width: size, height: size, className: "ov" });
    var ctx = c.getContext("2d");
    var vals = decodeMap(enc);
    var gh = (gridHW && gridHW[0]) || 16, gw = (gridHW && gridHW[1]) || 16;
    var showMap = true;
    function paint(im) {
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = "#555";
      ctx.fillRect(0, 0, size, size);
      if (im) ctx.drawImage(im, 0, 0, size, size);
      var cw = size / gw, ch = size / gh;
      if (showMap && vals && vmax > 0) {
        for (var t = 0; t < vals.length && t < gh * gw; t++) {
          if (vals[t] <= 0) continue;
          var a = 0.8 * Math.sqrt(Math.min(1, vals[t] / vmax));
          ctx.fillStyle = "rgba(255,128,0," + a.toFixed(3) + ")";
          ctx.fillRect((t % gw) * cw, Math.floor(t / gw) * ch, cw, ch);
        }
      }
      if (isInt(highlightToken)) {
        ctx.strokeStyle = "#00e5ff";
        ctx.lineWidth = 2;
        ctx.strokeRect((highlightToken % gw) * cw + 1, Math.floor(highlightToken / gw) * ch + 1, cw - 2, ch - 2);
      }
    }
    var image = null;
    paint(null);
    if (item && item.img && isInt(item.sid)) {
      image = new Image();
      image.addEventListener("load", function () { paint(image); c.setAttribute("data-loaded", "1"); });
      image.src = imgSrc(item.sid);
      image.alt = "";
    }
    c.title = "click to toggle the heatmap";
    c.addEventListener("click", function () { showMap = !showMap; paint(image && image.complete ? image : null); });
    return c;
  }
  function sampleCard(item, enc, gridHW, vmax, captionLines) {
    var fig = el("figure", { className: "card" });
    fig.appendChild(overlayCanvas(item, enc, gridHW, vmax, 128));
    var cap = el("figcaption");
    captionLines.forEach(function (line, i) { if (i) cap.appendChild(el("br")); append(cap, line); });
    if (item && item.prompt !== null && item.prompt !== undefined) {
      cap.appendChild(el("br"));
      cap.appendChild(el("span", { className: "prompt" }, item.prompt));
    }
    fig.appendChild(cap);
    return fig;
  }

  // ---- charts (SVG) ----------------------------------------------------------------------------------------
  function barChart(values, labels, opts) {
    var W = 520, H = 180, L = 44, B = 34, T = 10;
    var n = values.length, maxv = Math.max.apply(null, values.concat([1e-12]));
    var s = svgEl("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, className: "chart", role: "img" });
    s.appendChild(svgEl("title", {}, [opts.title || ""]));
    var bw = (W - L - 6) / Math.max(n, 1);
    for (var i = 0; i < n; i++) {
      var h = (H - B - T) * values[i] / maxv;
      var r = svgEl("rect", { x: L + i * bw + 1, y: H - B - h, width: Math.max(bw - 2, 1), height: h, "class": "bar" });
      r.appendChild(svgEl("title", {}, [labels[i] + ": " + values[i]]));
      s.appendChild(r);
    }
    s.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, "class": "axis" }));
    var every = Math.max(1, Math.ceil(n / 8));
    for (var j = 0; j < n; j += every) {
      s.appendChild(svgEl("text", { x: L + j * bw + bw / 2, y: H - B + 14, "class": "tick", "text-anchor": "middle" }, [labels[j]]));
    }
    s.appendChild(svgEl("text", { x: 4, y: T + 8, "class": "tick" }, [fmt(maxv, 0)]));
    if (opts.xlabel) s.appendChild(svgEl("text", { x: W / 2, y: H - 4, "class": "tick", "text-anchor": "middle" }, [opts.xlabel]));
    return s;
  }
  var COLORS = ["#d9480f", "#1971c2", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c"];
  function lineChart(series, xs, opts) {
    var W = 520, H = 200, L = 50, B = 34, T = 12, R = 8;
    var all = [];
    series.forEach(function (se) { se.values.forEach(function (v) { if (typeof v === "number" && isFinite(v)) all.push(v); }); });
    var lo = Math.min.apply(null, all.concat([0])), hi = Math.max.apply(null, all.concat([1e-12]));
    var xmin = Math.min.apply(null, xs), xmax = Math.max.apply(null, xs);
    if (xmax === xmin) { xmax = xmin + 1; }
    function X(x) { return opts.reverseX ? L + (xmax - x) / (xmax - xmin) * (W - L - R) : L + (x - xmin) / (xmax - xmin) * (W - L - R); }
    function Y(y) { return H - B - (y - lo) / ((hi - lo) || 1) * (H - B - T); }
    var s = svgEl("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, className: "chart", role: "img" });
    s.appendChild(svgEl("title", {}, [opts.title || ""]));
    s.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" }));
    s.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "axis" }));
    xs.forEach(function (x) {
      s.appendChild(svgEl("text", { x: X(x), y: H - B + 14, "class": "tick", "text-anchor": "middle" }, [fmt(x, 0)]));
    });
    s.appendChild(svgEl("text", { x: 2, y: T + 4, "class": "tick" }, [fmt(hi)]));
    s.appendChild(svgEl("text", { x: 2, y: H - B, "class": "tick" }, [fmt(lo)]));
    if (opts.xlabel) s.appendChild(svgEl("text", { x: (W + L) / 2, y: H - 4, "class": "tick", "text-anchor": "middle" }, [opts.xlabel]));
    series.forEach(function (se, k) {
      var pts = [];
      se.values.forEach(function (v, i) { if (typeof v === "number" && isFinite(v)) pts.push(X(xs[i]).toFixed(1) + "," + Y(v).toFixed(1)); });
      var color = COLORS[k % COLORS.length];
      s.appendChild(svgEl("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
      s.appendChild(svgEl("text", { x: W - R - 4, y: T + 12 + 13 * k, "class": "legend", fill: color, "text-anchor": "end" }, [se.name]));
    });
    return s;
  }

  // ---- index page ------------------------------------------------------------------------------------------
  function renderIndex() {
    clear(app);
    app.appendChild(el("h1", null, DATA.title || "Features"));
    append(app, notesList(DATA.notes));
    var dicts = DATA.dicts || [];
    var dt = el("table", { className: "grid", id: "dict-table" });
    dt.appendChild(el("tr", null, ["dictionary", "architecture", "site", "features", "listed", "scored", "mean score"].map(function (h) { return el("th", null, h); })));
    dicts.forEach(function (d) {
      var rows = (DATA.rows || {})[d.slug] || [];
      var scored = rows.filter(function (r) { return typeof r.score === "number"; });
      var mean = scored.length ? scored.reduce(function (a, r) { return a + r.score; }, 0) / scored.length : null;
      dt.appendChild(el("tr", null, [el("td", null, d.name), el("td", null, d.arch), el("td", null, d.site),
        el("td", null, String(d.features)), el("td", null, String(rows.length)), el("td", null, String(scored.length)), el("td", null, fmt(mean))]));
    });
    app.appendChild(dt);

    var all = [];
    dicts.forEach(function (d) {
      ((DATA.rows || {})[d.slug] || []).forEach(function (r) { all.push({ d: d, r: r, key: ((r.expl || "") + " " + d.name + " #" + r.f).toLowerCase() }); });
    });
    var search = el("input", { id: "search", type: "search", placeholder: "search explanations, e.g. red circle", size: 40, "aria-label": "search" });
    var dsel = el("select", { id: "dict-filter", "aria-label": "dictionary" }, [el("option", { value: "" }, "all dictionaries")]);
    dicts.forEach(function (d) { dsel.appendChild(el("option", { value: d.slug }, d.name)); });
    var scoredOnly = el("input", { id: "scored-only", type: "checkbox" });
    var count = el("span", { id: "match-count", className: "muted" });
    app.appendChild(el("div", { className: "controls" }, [search, " ", dsel, " ", el("label", null, [scoredOnly, " scored only"]), " ", count]));
    var cols = [["d", "dictionary"], ["f", "feature"], ["expl", "explanation"], ["score", "score"], ["freq", "frequency"],
                ["max", "max act."], ["peak", "peak timestep"]];
    var sortKey = "score", sortDir = -1, limit = 300;
    var table = el("table", { className: "grid sortable", id: "features" });
    var head = el("tr");
    cols.forEach(function (c) {
      var th = el("th", { "data-key": c[0], tabindex: 0 }, c[1]);
      th.addEventListener("click", function () { if (sortKey === c[0]) sortDir = -sortDir; else { sortKey = c[0]; sortDir = (c[0] === "expl" || c[0] === "d" || c[0] === "f") ? 1 : -1; } draw(); });
      head.appendChild(th);
    });
    var thead = el("thead", null, head), tbody = el("tbody");
    table.appendChild(thead); table.appendChild(tbody);
    app.appendChild(table);
    var more = el("button", { id: "show-more", type: "button" }, "show more");
    more.addEventListener("click", function () { limit += 300; draw(); });
    app.appendChild(more);
    function val(x, k) {
      if (k === "d") return x.d.name;
      var v = x.r[k];
      return v === null || v === undefined ? null : v;
    }
    function draw() {
      var q = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      var ds = dsel.value, so = scoredOnly.checked;
      var rows = all.filter(function (x) {
        if (ds && x.d.slug !== ds) return false;
        if (so && typeof x.r.score !== "number") return false;
        for (var i = 0; i < q.length; i++) if (x.key.indexOf(q[i]) < 0) return false;
        return true;
      });
      rows.sort(function (a, b) {
        var va = val(a, sortKey), vb = val(b, sortKey);
        if (va === null && vb === null) return a.r.f - b.r.f;
        if (va === null) return 1;
        if (vb === null) return -1;
        if (va < vb) return -sortDir;
        if (va > vb) return sortDir;
        return a.r.f - b.r.f;
      });
      Array.prototype.forEach.call(head.children, function (th) {
        th.className = th.getAttribute("data-key") === sortKey ? (sortDir > 0 ? "asc" : "desc") : "";
      });
      clear(tbody);
      rows.slice(0, limit).forEach(function (x) {
        var r = x.r, href = r.page ? featureHref(x.d.slug, r.f) : null;
        var link = href ? el("a", { href: href }, "#" + r.f) : "#" + r.f;
        tbody.appendChild(el("tr", { className: "feature-row" }, [el("td", null, x.d.name), el("td", null, link),
          el("td", { className: "expl" }, r.expl === null || r.expl === undefined ? "" : r.expl), el("td", null, fmt(r.score, 2)),
          el("td", null, fmt(r.freq, 5)), el("td", null, fmt(r.max)), el("td", null, fmt(r.peak, 0))]));
      });
      count.textContent = rows.length + " of " + all.length + " features" + (rows.length > limit ? " (showing " + limit + ")" : "");
      more.hidden = rows.length <= limit;
    }
    search.addEventListener("input", function () { limit = 300; draw(); });
    dsel.addEventListener("change", draw);
    scoredOnly.addEventListener("change", draw);
    draw();
  }

  // ---- feature page ------------------------------------------------------------------------------------------
  function renderFeature() {
    var d = DATA, dict = d.dict || {};
    clear(app);
    var prev = isInt(d.prev) ? el("a", { href: featureHref(dict.slug, d.prev), id: "prev" }, "← #" + d.prev) : null;
    var next = isInt(d.next) ? el("a", { href: featureHref(dict.slug, d.next), id: "next" }, "#" + d.next + " →") : null;
    app.appendChild(el("div", { className: "pager" }, [prev, " ", el("a", { href: ROOT + "index.html" }, "all features"), " ", next]));
    app.appendChild(el("h1", null, [dict.name + " · feature " + d.feature]));
    app.appendChild(el("p", { className: "explanation", id: "explanation" }, d.explanation === null || d.explanation === undefined ? "(no explanation)" : d.explanation));
    app.appendChild(kvTable([
      ["judge score", fmt(d.score, 3)], ["concept (oracle)", d.concept === undefined ? undefined : d.concept],
      ["level", d.level], ["frequency", fmt(d.frequency, 6)], ["max activation", fmt(d.max)],
      ["peak timestep", fmt(d.peak_timestep, 0)], ["threshold", d.threshold === undefined ? undefined : fmt(d.threshold, 4)],
      ["localisation IoU", d.localisation === undefined ? undefined : fmt(d.localisation, 3)],
      ["dictionary", dict.arch + " at " + dict.site]]));
    var grid = d.grid_hw || [16, 16];
    var top = d.top || [];
    var vmax = 0;
    top.forEach(function (t) { if (t.map && t.map.m > vmax) vmax = t.map.m; });
    if (top.length) {
      var tg = el("div", { className: "cards", id: "top-images" });
      top.forEach(function (t) {
        tg.appendChild(sampleCard(t, t.map, grid, vmax, ["image #" + t.sid + " · max " + fmt(t.value) + " at t=" + fmt(t.timestep, 0) + (t.split ? " · " + t.split : "")]));
      });
      app.appendChild(section("Top images (heatmap: orange, alpha ∝ √activation, one colour scale; caption: image, its largest activation and the timestep t where it occurs; click to toggle)", [tg], "top"));
    } else {
      app.appendChild(section("Top images", [el("p", { className: "muted" }, "no images qualified for this feature (or no interpretation)")], "top"));
    }
    if (d.best_by_step && d.best_by_step.maps && d.best_by_step.maps.length) {
      var row = el("div", { className: "cards" });
      d.best_by_step.maps.forEach(function (m) { row.appendChild(sampleCard(d.best_by_step, m.map, grid, vmax, ["t=" + fmt(m.timestep, 0)])); });
      app.appendChild(section("Best image at every recorded step (high noise first)", [row], "by-step"));
    }
    if (d.histogram && d.histogram.counts && d.histogram.counts.length) {
      var h = d.histogram, labels = [];
      for (var i = 0; i < h.counts.length; i++) labels.push(fmt(h.edges[i], 2));
      app.appendChild(section("Activation histogram (positive activations, log-spaced bins)", [
        barChart(h.counts, labels, { title: "activation histogram", xlabel: "activation (bin start)" }),
        el("p", { className: "muted" }, "non-positive: " + (h.nonpositive === undefined ? "–" : h.nonpositive))], "histogram"));
    }
    if (d.timesteps && d.timesteps.length && d.profile_mean) {
      // One scale with the "max activation" above: the flat line is that largest value, so the
      // per-step curves (averages over images) read against it rather than against their own peak.
      var series = [{ name: "mean over tokens", values: d.profile_mean }, { name: "mean of each image's max", values: d.profile_max || [] }];
      if (typeof d.max === "number" && isFinite(d.max)) series.push({ name: "max activation (" + fmt(d.max) + ")", values: d.timesteps.map(function () { return d.max; }) });
      app.appendChild(section("Timestep profile (activation, same units as max activation)", [lineChart(series,
        d.timesteps, { title: "activation by timestep", xlabel: "timestep (1000 = pure noise)", reverseX: true })], "profile"));
    }
    if (d.quantiles && d.quantiles.length) {
      var qg = el("div", { className: "cards" });
      d.quantiles.forEach(function (q) { qg.appendChild(sampleCard(q, q.map, grid, q.map ? q.map.m : 0, ["#" + q.sid + " · " + fmt(q.value) + " · t=" + fmt(q.timestep, 0)])); });
      app.appendChild(section("Images across the activation range", [qg], "quantiles"));
    }
    if (d.test && d.test.length) {
      var jt = el("table", { className: "grid", id: "judge" });
      jt.appendChild(el("tr", null, ["image", "kind", "judge s", "prompt"].map(function (x) { return el("th", null, x); })));
      d.test.forEach(function (t) {
        var kind = t.positive ? "positive (held out)" : "negative (top of #" + t.from_feature + ")";
        jt.appendChild(el("tr", null, [el("td", null, "#" + t.sid), el("td", null, kind), el("td", null, fmt(t.s, 2)), el("td", { className: "prompt" }, t.prompt || "")]));
      });
      app.appendChild(section("Judge test set (score = mean s on positives and 1 − s on negatives)", [jt], "judge-section"));
    }
    if (d.provenance) {
      var p = d.provenance, tok = isInt(p.token) ? p.token : null;
      var where = tok === null ? "token ?" : "token " + tok + " (row " + Math.floor(tok / grid[1]) + ", column " + (tok % grid[1]) + ")";
      var fig = el("figure", { className: "card wide" }, [overlayCanvas(p, null, grid, 0, 192, tok),
        el("figcaption", null, ["sample #" + p.sid + " · " + (p.timestep === null || p.timestep === undefined ? "step " + p.step : "t = " + fmt(p.timestep, 0) + " (step " + p.step + ")") + " · " + where, el("br"), el("span", { className: "prompt" }, p.prompt || "")])]);
      app.appendChild(section("ITDA atom source: the activation this atom was copied from", [fig], "provenance"));
    }
    var nb = d.neighbours || [];
    if (nb.length) {
      var nt = el("table", { className: "grid", id: "neighbours" });
      nt.appendChild(el("tr", null, ["dictionary", "feature", "decoder cosine", "explanation"].map(function (x) { return el("th", null, x); })));
      nb.forEach(function (n) {
        var href = n.page ? featureHref(n.slug, n.feature) : null;
        nt.appendChild(el("tr", null, [el("td", null, n.dict), el("td", null, href ? el("a", { href: href }, "#" + n.feature) : "#" + n.feature),
          el("td", null, fmt(n.cos, 3)), el("td", { className: "expl" }, n.explanation || "")]));
      });
      app.appendChild(section("Nearest features by decoder cosine", [nt], "neighbours-section"));
    }
    if (d.grid && /^grid_\d+\.png$/.test(d.grid)) {
      app.appendChild(section("Interpretation heatmap grid", [el("img", { src: d.grid, alt: "heatmap grid of feature " + d.feature, className: "grid-png" })], "grid"));
    }
  }

  // ---- compare page ---------------------------------------------------------------------------------------
  function renderCompare() {
    var d = DATA;
    clear(app);
    app.appendChild(el("h1", null, d.title || "Compare dictionaries"));
    append(app, notesList(d.notes));
    var cols = [["name", "dictionary"], ["arch", "arch"], ["site", "site"], ["features", "F"], ["k", "k"],
      ["eval.fvu", "FVU"], ["eval.explained_variance", "expl. var."], ["eval.cosine", "cosine"], ["eval.l0", "L0"],
      ["eval.dead_fraction", "dead"], ["splice.psnr_db", "splice PSNR dB"], ["splice.fidelity_recovered", "fidelity recovered"],
      ["interp.mean", "autointerp mean"], ["interp.coverage", "coverage"], ["interp.share_above_0.8", "> 0.8"]];
    function get(o, path) {
      var parts = path.split("."), v = o;
      if (parts.length > 1) { v = o[parts[0]]; if (!v) return null; return v[parts.slice(1).join(".")]; }
      return v[path];
    }
    var t = el("table", { className: "grid", id: "metrics" });
    t.appendChild(el("tr", null, cols.map(function (c) { return el("th", null, c[1]); })));
    (d.dicts || []).forEach(function (row) {
      t.appendChild(el("tr", null, cols.map(function (c) {
        var v = get(row, c[0]);
        return el("td", null, typeof v === "number" ? fmt(v, 4) : (v === null || v === undefined ? "–" : String(v)));
      })));
    });
    app.appendChild(section("Dictionaries", [t, el("p", { className: "muted" }, "FVU, cosine, L0, dead: `difflens evaluate`; splice: images generated with the reconstruction swapped in; autointerp: `difflens interpret`.")], "dicts"));
    if (d.interp && d.interp.rows && d.interp.rows.length) {
      var keys = ["name", "kind", "site", "features", "live_share", "sampled", "scored", "coverage", "mean", "median", "share_above_0.8", "localisation"];
      var it = el("table", { className: "grid", id: "interp-table" });
      it.appendChild(el("tr", null, keys.map(function (k) { return el("th", null, k); })));
      d.interp.rows.forEach(function (r) {
        it.appendChild(el("tr", null, keys.map(function (k) { var v = r[k]; return el("td", null, typeof v === "number" ? fmt(v, 4) : (v === null || v === undefined ? "–" : String(v))); })));
      });
      var checks = el("ul");
      Object.keys(d.interp.checks || {}).forEach(function (k) {
        var c = d.interp.checks[k];
        if (c && typeof c === "object" && c.verdict) checks.appendChild(el("li", null, k + ": " + c.verdict + " (difference " + fmt(c.diff) + ")"));
      });
      app.appendChild(section("Autointerp, with baselines (judge: " + (d.interp.judge || "?") + ")", [it, checks], "interp"));
    }
    var series = [], xs = null;
    (d.dicts || []).forEach(function (row) {
      var bt = row.eval_by_timestep || [];
      if (bt.length) { xs = xs || bt.map(function (b) { return b.timestep; }); series.push({ name: row.name, values: bt.map(function (b) { return b.fvu; }) }); }
    });
    if (series.length && xs) app.appendChild(section("FVU by timestep", [lineChart(series, xs, { title: "FVU by timestep", xlabel: "timestep", reverseX: true })], "fvu-plot"));
    if (d.plots && d.plots.length) {
      var pg = el("div", { className: "plots" });
      d.plots.forEach(function (p) {
        if (!/^plots\/[A-Za-z0-9_.-]+\.png$/.test(p.file)) return;
        pg.appendChild(el("figure", null, [el("img", { src: p.file, alt: p.caption }), el("figcaption", null, p.caption)]));
      });
      app.appendChild(section("Plots", [pg], "plots"));
    }
    if (d.splice_definitions) app.appendChild(el("p", { className: "muted" }, d.splice_definitions));
  }

  D.register("index", renderIndex);
  D.register("feature", renderFeature);
  D.register("compare", renderCompare);
})();
