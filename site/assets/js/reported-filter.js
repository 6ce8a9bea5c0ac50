// The reported-results page (compare/reported.md): by default only comparable rows show (no labels in
// pretraining, pretrained on ImageNet-1k); unchecking #reported-comparable shows every row. ?all=1
// opens the page with every row.
(function () {
  function setup() {
    var box = document.getElementById("reported-comparable");
    var shown = document.getElementById("reported-shown");
    if (!box || !shown || box.dataset.ready) return;
    box.dataset.ready = "1";
    var rows = Array.prototype.slice.call(document.querySelectorAll("tr[data-comparable]"));
    function apply() {
      var n = 0;
      rows.forEach(function (row) {
        row.hidden = box.checked && row.dataset.comparable !== "1";
        if (!row.hidden) n++;
      });
      shown.textContent = String(n);
    }
    if (new URLSearchParams(window.location.search).get("all") === "1") box.checked = false;
    box.addEventListener("change", apply);
    apply();
  }
  if (typeof document$ !== "undefined") document$.subscribe(setup);
  else document.addEventListener("DOMContentLoaded", setup);
})();
