// Filters of the properties matrix (compare/properties.md): each row carries its property values as
// data-p-<property> attributes; a row stays visible when it has every chosen value, and #method-count
// shows how many do. Filters can be preset from the query string, e.g. ?negatives=no&momentum-encoder=no; the
// page starts with uses-labels=no (the <option selected>), which ?uses-labels= clears.
(function () {
  function setup() {
    var table = document.getElementById("property-matrix");
    var form = document.getElementById("property-filters");
    var count = document.getElementById("method-count");
    if (!table || !form || !count || table.dataset.filters === "ready") return;
    table.dataset.filters = "ready";
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var family = form.querySelector('[data-filter="family"]');
    var selects = Array.prototype.slice.call(form.querySelectorAll("select[data-property]"));

    function apply() {
      var chosen = selects.filter(function (s) { return s.value; });
      var shown = 0;
      rows.forEach(function (row) {
        var ok = (!family.value || row.dataset.family === family.value) &&
          chosen.every(function (s) { return row.getAttribute("data-p-" + s.dataset.property) === s.value; });
        row.hidden = !ok;
        if (ok) shown++;
      });
      count.textContent = String(shown);
    }

    var params = new URLSearchParams(window.location.search);
    if (params.has("family")) family.value = params.get("family");
    selects.forEach(function (s) {
      var name = s.dataset.property;
      var key = params.has(name) ? name : name.replace(/-/g, "_");
      if (params.has(key)) s.value = params.get(key);  // ?uses-labels= (empty) shows every method
    });

    form.addEventListener("change", apply);
    form.addEventListener("reset", function () { setTimeout(apply, 0); });
    apply();
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
