// The lineage page (lineage.md): loads Cytoscape.js, its dagre layout and the graph data
// (assets/generated/lineage-data.js, written by selfsup/site_lineage.py) only when the page has a
// #lineage-graph element, so no other page pays for them. Scripts rather than fetch(): browsers refuse
// fetch() on file:// pages. Filters: family, year range, modality, kind; ?family=a,b&from=&to=&modality=
// &kind=&layout=year|dagre&focus=<id> preset them. The Cytoscape instance is the element's `cy` property (the tests read it).
(function () {
  var self = document.currentScript && document.currentScript.src;
  var assets = self ? self.replace(/js\/lineage\.js(\?.*)?$/, "") : null;
  var loading = null;

  function load(src) {
    return new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(s);
    });
  }

  function libraries() {
    if (!loading) {
      loading = load(assets + "vendor/cytoscape/cytoscape.min.js")
        .then(function () { return load(assets + "vendor/cytoscape-dagre/cytoscape-dagre.min.js"); })
        .then(function () { return load(assets + "generated/lineage-data.js"); });
    }
    return loading;
  }

  // Two layouts: "year" (default) puts each year in a column, families grouped within it, so that the
  // many papers that build on one hub stay readable; "dagre" is the layered layout of the links alone.
  var DAGRE = { name: "dagre", rankDir: "LR", nodeSep: 6, rankSep: 70, edgeSep: 4, fit: true, padding: 20,
                animate: false };
  var COLUMN_PX = 200, ROW_PX = 30;

  function yearLayout(nodes, familyOrder) {
    var years = {}, positions = {};
    nodes.forEach(function (n) { (years[n.data("year")] = years[n.data("year")] || []).push(n); });
    Object.keys(years).map(Number).sort(function (a, b) { return a - b; }).forEach(function (y, col) {
      var column = years[y].sort(function (a, b) {
        return (familyOrder[a.data("family")] - familyOrder[b.data("family")]) ||
          a.data("name").localeCompare(b.data("name"));
      });
      column.forEach(function (n, row) {
        positions[n.id()] = { x: col * COLUMN_PX, y: (row - (column.length - 1) / 2) * ROW_PX };
      });
    });
    return { name: "preset", positions: function (n) { return positions[n.id()]; }, fit: true, padding: 20,
             animate: false };
  }

  function draw(box, form, count, data) {
    var families = {}, familyOrder = {};
    data.families.forEach(function (f, i) { families[String(f.id)] = f; familyOrder[String(f.id)] = i; });
    var elements = data.nodes.map(function (n) {
      var f = families[String(n.family)];
      var label = /\b\d{4}$/.test(n.name) ? n.name : n.name + " \u00b7 " + n.year;  // "Chen et al. 2021" has it
      return { group: "nodes", data: { id: n.id, label: label, name: n.name,
        year: n.year, family: String(n.family), kind: n.kind, modalities: n.modalities, url: n.url,
        title: n.title, colour: f.colour, text: f.text } };
    }).concat(data.edges.map(function (e, i) {
      return { group: "edges", data: { id: "e" + i, source: e[0], target: e[1] } };
    }));
    var cy = cytoscape({
      container: box, elements: elements, layout: { name: "null" }, minZoom: 0.05, maxZoom: 4, wheelSensitivity: 0.4,
      style: [
        { selector: "node", style: { shape: "round-rectangle", width: "label", height: 22, padding: "6px",
          label: "data(label)", "font-size": 12, "text-valign": "center", "text-halign": "center",
          "background-color": "data(colour)", color: "data(text)", "border-width": 0 } },
        { selector: "edge", style: { width: 1, "curve-style": "bezier", "line-color": "#8c96a3", opacity: 0.7,
          "target-arrow-shape": "triangle", "target-arrow-color": "#8c96a3", "arrow-scale": 0.8 } },
        { selector: ".faded, .dim", style: { opacity: 0.12 } },
        { selector: ".focus", style: { "border-width": 3, "border-color": "#111111" } },
      ],
    });
    box.cy = cy;

    cy.on("tap", "node", function (ev) { window.location.href = ev.target.data("url"); });
    cy.on("mouseover", "node", function (ev) {
      var n = ev.target, near = n.closedNeighborhood();
      cy.elements().not(near).addClass("faded");
      box.title = n.data("name") + " (" + n.data("year") + "): " + n.data("title");
      box.style.cursor = "pointer";
    });
    cy.on("mouseout", "node", function () {
      cy.elements().removeClass("faded");
      box.title = "";
      box.style.cursor = "";
    });

    function chosen() {
      var fams = Array.prototype.slice.call(form.querySelectorAll('input[name="family"]:checked'))
        .map(function (i) { return i.value || "null"; });
      return { families: fams, from: Number(form.elements.from.value) || -Infinity,
               to: Number(form.elements.to.value) || Infinity, modality: form.elements.modality.value,
               kind: form.elements.kind.value };
    }

    function apply() {
      var c = chosen();
      cy.batch(function () {
        cy.nodes().forEach(function (n) {
          var ok = c.families.indexOf(n.data("family")) >= 0 && n.data("year") >= c.from && n.data("year") <= c.to &&
            (!c.modality || n.data("modalities").indexOf(c.modality) >= 0) && (!c.kind || n.data("kind") === c.kind);
          n.style("display", ok ? "element" : "none");
        });
      });
      var visible = cy.nodes().filter(function (n) { return n.style("display") === "element"; });
      count.textContent = String(visible.length);
      var layout = form.elements.layout.value === "dagre" ? DAGRE : yearLayout(visible, familyOrder);
      visible.union(visible.edgesWith(visible)).layout(layout).run();
      box.dataset.state = "ready";
    }

    // Found: the paper framed with what it builds on and what builds on it, the rest dimmed.
    function find(value) {
      cy.elements().removeClass("focus dim");
      var want = (value || "").trim().toLowerCase();
      if (!want) return;
      var hit = cy.nodes().filter(function (n) {
        return n.style("display") === "element" && (n.id() === want || n.data("name").toLowerCase() === want);
      });
      if (!hit.length) return;
      var near = hit.closedNeighborhood().filter(function (x) { return x.style("display") === "element"; });
      cy.elements().not(near).addClass("dim");
      hit.addClass("focus");
      cy.fit(near, 30);
    }

    var params = new URLSearchParams(window.location.search);
    if (params.has("family")) {
      var keep = params.get("family").split(",");
      form.querySelectorAll('input[name="family"]').forEach(function (i) { i.checked = keep.indexOf(i.value) >= 0; });
    }
    ["from", "to", "modality", "kind", "layout"].forEach(function (k) { if (params.has(k)) form.elements[k].value = params.get(k); });
    form.addEventListener("change", function (ev) {
      if (ev.target.name === "find") find(ev.target.value);
      else apply();
    });
    form.elements.find.addEventListener("input", function (ev) { find(ev.target.value); });
    form.addEventListener("reset", function () { setTimeout(function () { apply(); find(""); }, 0); });
    apply();
    if (params.has("focus")) {
      var id = params.get("focus");
      var node = cy.getElementById(id);
      if (node.length) form.elements.find.value = node.data("name");
      find(id);
    }
  }

  function setup() {
    var box = document.getElementById("lineage-graph");
    var form = document.getElementById("lineage-filters");
    var count = document.getElementById("lineage-count");
    if (!box || !form || !count || box.dataset.state) return;
    box.dataset.state = "loading";
    libraries()
      .then(function () { draw(box, form, count, window.SELFSUP_LINEAGE); })
      .catch(function (err) {
        box.dataset.state = "failed";
        box.textContent = "The graph could not be drawn (" + err.message + "); the list below has the same links.";
        console.error(err);
      });
  }

  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
