/* difflens feature browser: the playground (needs `difflens browse serve`): generate, inspect the features
   at a step and token, say where interventions act (step window, a region dragged on the image, CFG
   branch), and one section per registered intervention, built from the specs the server embeds.
   Talks only to the server that served the page. */
(function () {
  "use strict";
  var D = window.difflens;
  var DATA = D.DATA;
  var app = D.app;
  var txt = D.txt;
  var el = D.el;
  var clear = D.clear;
  var fmt = D.fmt;
  var featureHref = D.featureHref;
  var section = D.section;

  // ---- playground (needs `difflens browse serve`) -----------------------------------------------------------
  function renderPlayground() {
    var d = DATA;
    clear(app);
    app.appendChild(el("h1", null, "Playground"));
    if (location.protocol === "file:") {
      app.appendChild(el("p", { className: "error" }, "The playground needs the server: run `difflens browse serve --dict DIR ...` and open the address it prints."));
      return;
    }
    app.appendChild(el("p", { className: "muted" }, "Model: " + (d.model || "?") + ". " + (d.hint || "")));
    var prompt = el("input", { id: "prompt", type: "text", size: 70, value: d.example_prompt || "", "aria-label": "prompt" });
    var seed = el("input", { id: "seed", type: "number", min: 0, value: 0, "aria-label": "seed" });
    var steps = el("input", { id: "steps", type: "number", min: 1, max: d.max_steps || 50, value: d.default_steps || 8, "aria-label": "steps" });
    var dsel = el("select", { id: "dict", "aria-label": "dictionary" });
    (d.dicts || []).forEach(function (x) { dsel.appendChild(el("option", { value: x.slug }, x.name + " (" + x.site + ")")); });
    var go = el("button", { id: "generate", type: "button" }, "Generate");
    var status = el("span", { id: "status", className: "muted" });
    var err = el("p", { id: "error", className: "error", role: "alert" });
    app.appendChild(el("div", { className: "controls" }, [el("label", null, ["prompt ", prompt])]));
    app.appendChild(el("div", { className: "controls" }, [el("label", null, ["seed ", seed]), " ", el("label", null, ["steps ", steps]), " ",
      el("label", null, ["dictionary ", dsel]), " ", go, " ", status]));
    app.appendChild(err);
    var out = el("div", { className: "pg-out" });
    var left = el("div"), right = el("div", { className: "pg-right" });
    out.appendChild(left); out.appendChild(right);
    app.appendChild(out);
    var state = null, token = null;
    var SIZE = 320;
    var canvas = el("canvas", { id: "pg-image", width: SIZE, height: SIZE, className: "pg" });
    var stepSlider = el("input", { id: "step", type: "range", min: 0, max: 0, value: 0, "aria-label": "step" });
    var stepLabel = el("span", { id: "step-label" });
    var tokenLabel = el("p", { id: "token-label", className: "muted" }, "click the image to pick a token; drag to draw the interventions' region");
    var tokList = el("ol", { id: "token-features" }), stepList = el("ol", { id: "step-features" });
    left.appendChild(canvas);
    left.appendChild(el("div", null, [el("label", null, ["step ", stepSlider]), " ", stepLabel]));
    left.appendChild(tokenLabel);
    right.appendChild(el("h3", null, "features at the token"));
    right.appendChild(tokList);
    right.appendChild(el("h3", null, "strongest features at this step (sum over tokens)"));
    right.appendChild(stepList);
    // where every intervention acts (the CLI's --step-window, --region --region-units tokens, --branch)
    var winInput = el("input", { id: "where-window", type: "text", size: 8, placeholder: "every step", "aria-label": "step window" });
    var regionInput = el("input", { id: "where-region", type: "text", size: 12, placeholder: "every token", "aria-label": "region" });
    var branchSel = el("select", { id: "where-branch", "aria-label": "CFG branch" });
    ["both", "cond", "uncond"].forEach(function (b) { branchSel.appendChild(el("option", { value: b }, b)); });
    var clearRegion = el("button", { id: "where-clear", type: "button", className: "small" }, "clear region");
    app.appendChild(section("Where interventions act", [
      el("p", { className: "muted" }, "Step window: step indices a:b (b excluded) or 0,2,4. Region: a box x0,y0,x1,y1 in tokens " +
        "(x = column, y = row, ends excluded) — drag on the image to draw it; image-stream dictionaries only. " +
        "CFG branch: the conditional row, the unconditional one, or both."),
      el("div", { className: "controls" }, [el("label", null, ["step window ", winInput]), " ",
        el("label", null, ["region ", regionInput]), " ", clearRegion, " ", el("label", null, ["CFG branch ", branchSel])])], "where-section"));
    // one section per registered intervention (difflens.intervene.registry), built from its declared params
    var ivInputs = [];  // {kind, param, input} of every control
    (d.interventions || []).forEach(function (iv) { app.appendChild(interventionSection(iv)); });
    var baseImg = new Image();

    function featLink(slug, f, v) {
      var href = (d.pages && d.pages[slug] && d.pages[slug].indexOf(f) >= 0) ? featureHref(slug, f) : null;
      var li = el("li", null, [href ? el("a", { href: href }, "#" + f) : "#" + f, " " + fmt(v) + " "]);
      var ex = (d.explanations && d.explanations[slug]) ? d.explanations[slug][String(f)] : null;
      if (ex) li.appendChild(el("span", { className: "expl" }, ex));
      var use = el("button", { type: "button", className: "small", title: "put this feature into the interventions' feature fields" }, "use");
      use.addEventListener("click", function () { useFeature(f); });
      li.appendChild(use);
      return li;
    }
    function paint() {
      var ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = "#555"; ctx.fillRect(0, 0, SIZE, SIZE);
      if (state && baseImg.complete) ctx.drawImage(baseImg, 0, 0, SIZE, SIZE);
      if (state && token !== null) {
        var g = state.grid_hw, cw = SIZE / g[1], ch = SIZE / g[0];
        ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
        ctx.strokeRect((token % g[1]) * cw + 1, Math.floor(token / g[1]) * ch + 1, cw - 2, ch - 2);
      }
      var box = regionBox();
      if (state && box) {
        var gg = state.grid_hw, w = SIZE / gg[1], h = SIZE / gg[0];
        ctx.setLineDash([6, 4]); ctx.strokeStyle = "#ffd400"; ctx.lineWidth = 2;
        ctx.strokeRect(box[0] * w + 1, box[1] * h + 1, (box[2] - box[0]) * w - 2, (box[3] - box[1]) * h - 2);
        ctx.setLineDash([]);
      }
    }
    function regionBox() {  // the region field as [x0, y0, x1, y1] tokens, or null when empty or malformed
      var v = regionInput.value.split(",").map(function (x) { return Number(x.trim()); });
      if (v.length !== 4 || v.some(function (x) { return !isFinite(x); }) || !(v[2] > v[0] && v[3] > v[1])) return null;
      return v;
    }
    function cellAt(ev) {
      var r = canvas.getBoundingClientRect(), g = state.grid_hw;
      var col = Math.floor((ev.clientX - r.left) / r.width * g[1]), row = Math.floor((ev.clientY - r.top) / r.height * g[0]);
      return [Math.max(0, Math.min(g[1] - 1, col)), Math.max(0, Math.min(g[0] - 1, row))];
    }
    function showLists() {
      clear(tokList); clear(stepList);
      if (!state) return;
      var s = Number(stepSlider.value), st = state.steps[s];
      stepLabel.textContent = "step " + s + " · t=" + fmt(st.timestep, 0);
      st.top.forEach(function (p) { stepList.appendChild(featLink(state.slug, p[0], p[1])); });
      if (token !== null) {
        var g = state.grid_hw;
        tokenLabel.textContent = "token " + token + " (row " + Math.floor(token / g[1]) + ", column " + (token % g[1]) + ")";
        var fs = st.tokens[token] || [];
        if (!fs.length) tokList.appendChild(el("li", { className: "muted" }, "no active feature"));
        fs.forEach(function (p) { tokList.appendChild(featLink(state.slug, p[0], p[1])); });
      }
    }
    function post(path, body) {
      return fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
        .then(function (r) {
          return r.json().then(function (j) { if (!r.ok) throw new Error(j && j.error ? j.error : "HTTP " + r.status); return j; });
        });
    }
    function safeDataUrl(s) { return typeof s === "string" && s.indexOf("data:image/png;base64,") === 0 ? s : null; }
    function request() {
      return { prompt: prompt.value, seed: Number(seed.value), steps: Number(steps.value), dict: dsel.value };
    }
    function where() {  // sent as typed: the server checks it and says what is wrong
      return { window: winInput.value.trim(), region: regionInput.value.trim(), region_units: "tokens", branch: branchSel.value };
    }
    go.addEventListener("click", function () {
      err.textContent = ""; status.textContent = "generating…"; go.disabled = true;
      post("api/generate", request()).then(function (j) {
        state = j; token = null;
        stepSlider.max = String(j.steps.length - 1);
        stepSlider.value = String(Math.min(j.steps.length - 1, Number(stepSlider.value) || 0));
        baseImg = new Image();
        baseImg.addEventListener("load", function () { paint(); status.textContent = "done"; canvas.setAttribute("data-ready", "1"); });
        var src = safeDataUrl(j.image);
        if (src) baseImg.src = src;
        showLists(); paint();
      }).catch(function (e) { err.textContent = String(e.message || e); status.textContent = ""; })
        .then(function () { go.disabled = false; });
    });
    var dragFrom = null, dragged = false;
    canvas.addEventListener("mousedown", function (ev) { if (state) { dragFrom = cellAt(ev); dragged = false; } });
    canvas.addEventListener("mousemove", function (ev) {
      if (!state || !dragFrom) return;
      var c = cellAt(ev);
      if (c[0] === dragFrom[0] && c[1] === dragFrom[1] && !dragged) return;
      dragged = true;
      regionInput.value = [Math.min(c[0], dragFrom[0]), Math.min(c[1], dragFrom[1]),
        Math.max(c[0], dragFrom[0]) + 1, Math.max(c[1], dragFrom[1]) + 1].join(",");
      paint();
    });
    window.addEventListener("mouseup", function () { dragFrom = null; });
    canvas.addEventListener("click", function (ev) {
      if (!state) return;
      if (dragged) { dragged = false; return; }  // the end of a region drag, not a token pick
      var c = cellAt(ev);
      token = c[1] * state.grid_hw[1] + c[0];
      paint(); showLists();
    });
    regionInput.addEventListener("input", paint);
    clearRegion.addEventListener("click", function () { regionInput.value = ""; paint(); });
    stepSlider.addEventListener("input", showLists);
    function safeId(s) { return typeof s === "string" && /^[A-Za-z0-9_-]+$/.test(s); }
    function useFeature(f) {
      ivInputs.forEach(function (c) {
        if (c.param.kind === "feature") c.input.value = String(f);
        if (c.param.kind === "features") {
          var cur = c.input.value.trim(), ids = (cur && cur.toLowerCase() !== "all") ? cur.split(",") : [];
          if (ids.map(function (x) { return x.trim(); }).indexOf(String(f)) < 0) ids.push(String(f));
          c.input.value = ids.join(",");
        }
      });
    }
    function paramControl(kind, p) {
      var id = kind + "-" + p.name, input, shown = null;
      var def = p.default === null || p.default === undefined ? "" : p.default;
      if (p.kind === "choice") {
        input = el("select", { id: id, "aria-label": p.name });
        (p.choices || []).forEach(function (c) { input.appendChild(el("option", { value: c, selected: c === def }, c)); });
      } else if (p.kind === "text" || p.kind === "features") {
        if (p.kind === "text" && def === "") def = d.example_prompt || "";
        input = el("input", { id: id, type: "text", size: p.kind === "text" ? 50 : 12, value: def, "aria-label": p.name,
          placeholder: p.kind === "features" ? (p.all_ok ? "all or 12,40" : "e.g. 12,40") : null });
      } else if (p.kind === "float" && p.slider) {
        input = el("input", { id: id, type: "range", min: p.slider[0], max: p.slider[1], step: p.step || "any", value: def, "aria-label": p.name });
        shown = el("span", { id: id + "-value" }, String(def));
        input.addEventListener("input", function () { shown.textContent = input.value; });
      } else {  // int, float, feature
        input = el("input", { id: id, type: "number", min: p.kind === "feature" ? 0 : p.min, max: p.max,
          step: p.kind === "float" ? (p.step || "any") : 1, value: def, "aria-label": p.name });
      }
      ivInputs.push({ kind: kind, param: p, input: input });
      return el("label", { title: p.help || null }, [p.name + (p.help ? " (" + p.help + ") " : " "), input, shown ? " " : null, shown]);
    }
    function paramValue(p, input) {
      var v = input.value;
      if (p.kind === "int" || p.kind === "float" || p.kind === "feature") return v === "" ? null : Number(v);
      return v;
    }
    function interventionSection(iv) {
      var kind = iv.name;
      if (!safeId(kind)) return null;
      var params = (iv.params || []).filter(function (p) { return safeId(p.name); });
      var controls = el("div", { className: "controls" });
      params.forEach(function (p) { controls.appendChild(paramControl(kind, p)); controls.appendChild(txt(" ")); });
      var btn = el("button", { id: kind, type: "button" }, kind[0].toUpperCase() + kind.slice(1));
      controls.appendChild(btn);
      var img = el("img", { id: "result-" + kind, alt: kind + " image", width: SIZE, height: SIZE, className: "pg", hidden: true });
      var caption = el("figcaption", { id: "result-" + kind + "-caption", className: "muted" });
      var extras = el("div", { className: "pg-out" });
      var results = el("div", { className: "pg-out" }, [el("figure", null, [img, caption]), extras]);
      btn.addEventListener("click", function () {
        err.textContent = ""; status.textContent = kind + "…"; btn.disabled = true;
        var body = request(), values = {};
        params.forEach(function (p) {
          var c = ivInputs.filter(function (x) { return x.kind === kind && x.param === p; })[0];
          values[p.name] = paramValue(p, c.input);
        });
        body.kind = kind; body.params = values; body.where = where();
        post("api/intervene", body).then(function (j) {
          var src = safeDataUrl(j.image);
          if (src) { img.src = src; img.hidden = false; }
          caption.textContent = typeof j.intervention === "string" ? j.intervention : "";
          clear(extras);
          (j.extra || []).forEach(function (x) {
            var xs = safeDataUrl(x.image);
            if (xs) extras.appendChild(el("figure", null, [el("img", { src: xs, alt: String(x.label), width: SIZE, height: SIZE, className: "pg" }),
              el("figcaption", null, String(x.label))]));
          });
          status.textContent = "done";
        }).catch(function (e) { err.textContent = String(e.message || e); status.textContent = ""; })
          .then(function () { btn.disabled = false; });
      });
      return section(kind[0].toUpperCase() + kind.slice(1), [el("p", { className: "muted" }, iv.help || ""), controls, results], kind + "-section");
    }
  }

  D.register("playground", renderPlayground);
})();
