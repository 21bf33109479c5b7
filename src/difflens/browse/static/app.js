/* difflens feature browser, shared part: the page's data, DOM helpers and the router. Pages are built
   from the JSON in #difflens-data. No network, no eval. The page scripts (pages.js: index, feature and
   compare pages; playground.js: the playground) register their renderers with difflens.register; the
   router runs once every script of the page has loaded. */
(function () {
  "use strict";
  var dataNode = document.getElementById("difflens-data");
  var DATA = dataNode ? JSON.parse(dataNode.textContent) : {};
  var PAGE = document.body.getAttribute("data-page");
  var ROOT = PAGE === "feature" ? "../../" : "";
  var app = document.getElementById("app");
  var SVGNS = "http://www.w3.org/2000/svg";

  // ---- DOM helpers: text only, attributes from a fixed list ----------------------------------------
  function txt(s) { return document.createTextNode(s === null || s === undefined ? "" : String(s)); }
  function el(tag, attrs, children) {
    var n = document.createElement(tag);
    setAttrs(n, attrs);
    append(n, children);
    return n;
  }
  function setAttrs(n, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      if (/^on/i.test(k)) throw new Error("event attributes are not allowed: " + k);
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "className") n.className = String(v);
      else n.setAttribute(k, String(v));
    });
  }
  function append(n, children) {
    if (children === null || children === undefined) return n;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      n.appendChild(typeof c === "object" && c.nodeType ? c : txt(c));
    });
    return n;
  }
  function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
  function svgEl(tag, attrs, children) {
    var n = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (/^on/i.test(k) || k === "href") throw new Error("attribute not allowed on svg: " + k);
      n.setAttribute(k, String(attrs[k]));
    });
    (children || []).forEach(function (c) { n.appendChild(typeof c === "object" ? c : txt(c)); });
    return n;
  }
  function isInt(x) { return typeof x === "number" && Number.isInteger(x) && x >= 0; }
  function isSlug(s) { return typeof s === "string" && /^[A-Za-z0-9_.-]+$/.test(s); }
  function fmt(x, nd) {
    if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "–";
    if (nd === undefined) nd = 3;
    if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
    return String(Math.round(x * Math.pow(10, nd)) / Math.pow(10, nd));
  }
  function imgSrc(sid) { return isInt(sid) ? ROOT + "img/" + sid + ".png" : null; }
  function featureHref(slug, f) {
    return isSlug(slug) && isInt(f) ? ROOT + "features/" + encodeURIComponent(slug) + "/" + f + ".html" : null;
  }
  function section(title, children, id) {
    return el("section", { id: id || null }, [el("h2", null, title)].concat(children || []));
  }
  function kvTable(pairs) {
    var t = el("table", { className: "kv" });
    pairs.forEach(function (p) {
      if (p[1] === undefined) return;
      t.appendChild(el("tr", null, [el("th", null, p[0]), el("td", null, p[1] === null ? "–" : p[1])]));
    });
    return t;
  }
  function notesList(notes) {
    if (!notes || !notes.length) return null;
    return el("ul", { className: "notes" }, notes.map(function (n) { return el("li", null, n); }));
  }

  // ---- router ----------------------------------------------------------------------------------------------
  // The page's scripts are plain <script> elements at the end of <body> (browse/export.py, page_html), so
  // every one has run, and registered its renderers, before DOMContentLoaded.
  var renderers = {};
  function register(page, render) { renderers[page] = render; }
  window.difflens = Object.freeze({
    DATA: DATA, PAGE: PAGE, ROOT: ROOT, app: app, txt: txt, el: el, setAttrs: setAttrs, append: append, clear: clear,
    svgEl: svgEl, isInt: isInt, isSlug: isSlug, fmt: fmt, imgSrc: imgSrc, featureHref: featureHref, section: section,
    kvTable: kvTable, notesList: notesList, register: register
  });
  document.addEventListener("DOMContentLoaded", function () {
    if (renderers[PAGE]) renderers[PAGE]();
    document.body.setAttribute("data-rendered", "1");
  });
})();
