// Make the content's list tables sortable by clicking a header (vendored tablesort, numbers sort as
// numbers). Key/value tables (inside .selfsup-static, the home counts) and one-row tables stay as written.
(function () {
  function init() {
    if (typeof Tablesort === "undefined") return;
    document.querySelectorAll("article table:not([class])").forEach(function (table) {
      if (table.dataset.sortable === "ready" || !table.tHead || !table.tBodies.length) return;
      if (table.closest(".selfsup-static, .selfsup-counts") || table.tBodies[0].rows.length < 2) return;
      table.dataset.sortable = "ready";
      new Tablesort(table);
    });
  }
  if (typeof document$ !== "undefined") document$.subscribe(init);
  else document.addEventListener("DOMContentLoaded", init);
})();
