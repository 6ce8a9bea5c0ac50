// Export of the paper index (papers/index.md): the papers its filters show, as BibTeX, CSV or JSON.
// The records (assets/generated/papers-data.js, written by selfsup/site.py) load on the first click, as
// a script: browsers refuse fetch() on file:// pages.
(function () {
  var self = document.currentScript && document.currentScript.src;
  var data = self ? self.replace(/js\/paper-export\.js(\?.*)?$/, "generated/papers-data.js") : null;
  var loading = null;

  function records() {
    if (!loading) {
      loading = new Promise(function (resolve, reject) {
        var s = document.createElement("script");
        s.src = data;
        s.onload = function () { resolve(window.SELFSUP_PAPERS); };
        s.onerror = function () { reject(new Error("cannot load " + data)); };
        document.head.appendChild(s);
      });
    }
    return loading;
  }

  var COLUMNS = ["id", "name", "title", "authors", "year", "venue", "arxiv", "doi", "url", "code", "kind",
                 "family", "subfamily", "modalities", "implementation"];

  function csvCell(value) {
    var text = value == null ? "" : Array.isArray(value) ? value.join("; ") : String(value);
    if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;  // a spreadsheet would run it as a formula
    return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  // The text of an export: exposed for the tests as window.selfsupExport(format, ids).
  function render(format, papers) {
    if (format === "bib") return papers.map(function (p) { return p.bibtex; }).join("\n\n") + "\n";
    if (format === "json") {
      return JSON.stringify(papers.map(function (p) {
        var o = {};
        COLUMNS.forEach(function (c) { o[c] = p[c]; });
        return o;
      }), null, 2) + "\n";
    }
    return [COLUMNS.join(",")].concat(papers.map(function (p) {
      return COLUMNS.map(function (c) { return csvCell(p[c]); }).join(",");
    })).join("\r\n") + "\r\n";
  }

  function shownIds() {
    return Array.prototype.slice.call(document.querySelectorAll("#paper-index tbody tr"))
      .filter(function (r) { return !r.hidden; })
      .map(function (r) { return r.dataset.id; });
  }

  window.selfsupExport = function (format, ids) {
    return records().then(function (all) {
      var want = ids || shownIds();
      var byId = {};
      all.forEach(function (p) { byId[p.id] = p; });
      return render(format, want.map(function (i) { return byId[i]; }).filter(Boolean));
    });
  };

  var TYPES = { bib: "application/x-bibtex", csv: "text/csv", json: "application/json" };

  function setup() {
    var box = document.getElementById("paper-export");
    if (!box || box.dataset.ready) return;
    box.dataset.ready = "1";
    box.addEventListener("click", function (ev) {
      var format = ev.target.dataset && ev.target.dataset.export;
      if (!format) return;
      window.selfsupExport(format).then(function (text) {
        var a = document.createElement("a");
        a.href = URL.createObjectURL(new Blob([text], { type: TYPES[format] + ";charset=utf-8" }));
        a.download = "selfsup-papers." + format;
        document.body.appendChild(a);
        a.click();
        setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 0);
      }).catch(function (err) { console.error(err); });
    });
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
