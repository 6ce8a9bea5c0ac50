// The compare page (compare/methods.md): 2-4 methods side by side, from ?m=a,b,c or the picker. The
// records (assets/generated/methods-data.js, written by selfsup/site.py) load only on this page, as a
// script: browsers refuse fetch() on file:// pages. Catalog text is set as text, never as HTML.
(function () {
  var self = document.currentScript && document.currentScript.src;
  var source = self ? self.replace(/js\/compare\.js(\?.*)?$/, "generated/methods-data.js") : null;
  var MAX = 4;
  var loading = null;

  function records() {
    if (!loading) {
      loading = new Promise(function (resolve, reject) {
        var s = document.createElement("script");
        s.src = source;
        s.onload = function () { resolve(window.SELFSUP_METHODS); };
        s.onerror = function () { reject(new Error("cannot load " + source)); };
        document.head.appendChild(s);
      });
    }
    return loading;
  }

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text != null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function link(text, href) {
    var a = el("a", text);
    a.href = href;
    return a;
  }

  function pct(x) { return x == null ? "–" : (100 * x).toFixed(1) + "%"; }

  function reported(r) {
    var parts = [r.benchmark + ": " + r.value + " " + r.metric];
    var ctx = [r.backbone, r.epochs ? r.epochs + " ep" : null, r.data ? "on " + r.data : null,
               r.labels ? "with labels" : null].filter(Boolean);
    if (ctx.length) parts.push("(" + ctx.join(", ") + ")");
    return parts.join(" ");
  }

  function draw(box, chosenBox, all, properties, ids, setIds) {
    var byId = {};
    all.forEach(function (m) { byId[m.id] = m; });
    var methods = ids.map(function (i) { return byId[i]; }).filter(Boolean);
    chosenBox.textContent = "";
    methods.forEach(function (m) {
      var chip = el("button", m.name + " \u00d7", "compare-chip");
      chip.type = "button";
      chip.title = "Remove " + m.name;
      chip.dataset.id = m.id;
      chip.addEventListener("click", function () { setIds(ids.filter(function (i) { return i !== m.id; })); });
      chosenBox.appendChild(chip);
    });
    box.textContent = "";
    if (methods.length < 2) {
      box.appendChild(el("p", methods.length ? "Add at least one more method." : "Add two to four methods."));
      return;
    }
    var table = el("table", null, "compare-grid");
    var head = table.createTHead().insertRow();
    head.appendChild(el("th", ""));
    methods.forEach(function (m) {
      var th = el("th");
      th.appendChild(link(m.name, m.url));
      th.appendChild(el("div", m.year + (m.family ? " \u00b7 " + m.family : ""), "compare-sub"));
      head.appendChild(th);
    });
    var body = table.createTBody();
    function row(label, cell) {
      var tr = body.insertRow();
      tr.appendChild(el("th", label));
      methods.forEach(function (m) {
        var td = tr.insertCell();
        cell(m, td);
      });
      return tr;
    }
    row("Sub-family", function (m, td) { td.textContent = m.subfamily || "–"; });
    row("Key idea", function (m, td) { td.textContent = m.key_idea || "–"; });
    row("Objective", function (m, td) {
      if (!m.loss_latex) { td.textContent = "–"; return; }
      if (typeof katex !== "undefined") katex.render(m.loss_latex, td, { displayMode: true, throwOnError: false });
      else td.textContent = m.loss_latex;
    });
    properties.forEach(function (p) {
      var tr = row(p.name, function (m, td) { td.textContent = m.properties[p.id] || "?"; });
      var values = methods.map(function (m) { return m.properties[p.id] || "?"; });
      if (values.some(function (v) { return v !== values[0]; })) tr.className = "compare-differs";
    });
    row("Reported results", function (m, td) {
      if (!m.reported.length) { td.textContent = "–"; return; }
      var ul = el("ul");
      m.reported.forEach(function (r) { ul.appendChild(el("li", reported(r))); });
      td.appendChild(ul);
    });
    row("Measured (k-NN top-1)", function (m, td) {
      if (!m.measured.length) { td.textContent = "–"; return; }
      var ul = el("ul");
      m.measured.forEach(function (r) {
        ul.appendChild(el("li", r.benchmark + ": " + pct(r.knn_top1) + " (random init " + pct(r.random_init_knn_top1) + ")"));
      });
      td.appendChild(ul);
    });
    row("Code", function (m, td) {
      if (m.code_url) td.appendChild(link(m.implementation, m.code_url));
      else td.textContent = "no implementation yet";
      if (m.official_code) {
        td.appendChild(el("br"));
        td.appendChild(link("official code", m.official_code));
      }
    });
    box.appendChild(table);
  }

  function setup() {
    var box = document.getElementById("compare-table");
    var form = document.getElementById("compare-picker");
    var chosen = document.getElementById("compare-chosen");
    if (!box || !form || !chosen || box.dataset.state) return;
    box.dataset.state = "loading";
    records().then(function (data) {
      var all = data.methods;
      var byName = {}, known = {};
      all.forEach(function (m) { byName[m.name.toLowerCase()] = m.id; known[m.id] = true; });
      var params = new URLSearchParams(window.location.search);
      var ids = (params.get("m") || "").split(",").filter(function (i) { return known[i]; }).slice(0, MAX);
      function setIds(next) {
        ids = next.filter(function (i, k) { return next.indexOf(i) === k; }).slice(0, MAX);
        var url = new URL(window.location.href);
        if (ids.length) url.searchParams.set("m", ids.join(","));
        else url.searchParams.delete("m");
        window.history.replaceState(null, "", url);
        draw(box, chosen, data.methods, data.properties, ids, setIds);
        box.dataset.state = "ready";
      }
      form.addEventListener("submit", function () {
        var want = form.elements.pick.value.trim().toLowerCase();
        var id = byName[want] || (known[want] ? want : null);
        if (id) setIds(ids.concat([id]));
        form.elements.pick.value = "";
      });
      setIds(ids);
    }).catch(function (err) {
      box.dataset.state = "failed";
      box.textContent = "The comparison could not be loaded (" + err.message + ").";
      console.error(err);
    });
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
