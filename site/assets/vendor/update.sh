#!/usr/bin/env bash
# Re-vendor the site's third-party JavaScript/CSS from the npm registry (no CDN at runtime).
#
# The site loads KaTeX (math), tablesort (sortable tables), iframe-worker (runs the search worker when the
# offline build is opened from file://) and, on the lineage page only, Cytoscape.js with its dagre layout
# from site/assets/vendor/. This script fetches the pinned versions with `npm pack` (tarballs straight
# from registry.npmjs.org, no node_modules, no install scripts run), and copies only the files the site
# uses plus each package's licence. To upgrade: change a version below, run the script from anywhere,
# rebuild the site (`selfsup site build --strict`) and run `pytest -m browser tests/site`.
set -euo pipefail

KATEX_VERSION=0.19.1
CYTOSCAPE_VERSION=3.35.0
CYTOSCAPE_DAGRE_VERSION=4.0.1  # bundles @dagrejs/dagre 3; its licence is vendored beside it
DAGRE_VERSION=3.1.3
TABLESORT_VERSION=5.6.0
IFRAME_WORKER_VERSION=1.0.4

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "katex@${KATEX_VERSION}" "tablesort@${TABLESORT_VERSION}" "iframe-worker@${IFRAME_WORKER_VERSION}" \
  "cytoscape@${CYTOSCAPE_VERSION}" "cytoscape-dagre@${CYTOSCAPE_DAGRE_VERSION}" "@dagrejs/dagre@${DAGRE_VERSION}" >/dev/null
for pkg in katex tablesort iframe-worker cytoscape cytoscape-dagre dagrejs-dagre; do
  mkdir "$pkg"
  tar xzf "$pkg"-[0-9]*.tgz -C "$pkg" --strip-components=1
done

rm -rf "$here/katex" "$here/tablesort" "$here/iframe-worker" "$here/cytoscape" "$here/cytoscape-dagre"
mkdir -p "$here/katex/contrib" "$here/katex/fonts" "$here/tablesort/sorts" "$here/iframe-worker" \
  "$here/cytoscape" "$here/cytoscape-dagre"

# KaTeX: the renderer, its stylesheet, the fonts the stylesheet points to, auto-render.
cp katex/dist/katex.min.js katex/dist/katex.min.css "$here/katex/"
cp katex/dist/contrib/auto-render.min.js "$here/katex/contrib/"
cp katex/dist/fonts/* "$here/katex/fonts/"
cp katex/LICENSE "$here/katex/LICENSE"

# Cytoscape.js (the UMD build: defines window.cytoscape) and cytoscape-dagre, which registers the dagre
# layout with it when loaded after it and carries dagre inside.
cp cytoscape/dist/cytoscape.min.js "$here/cytoscape/"
cp cytoscape/LICENSE "$here/cytoscape/LICENSE"
cp cytoscape-dagre/dist/cytoscape-dagre.min.js "$here/cytoscape-dagre/"
cp cytoscape-dagre/LICENSE "$here/cytoscape-dagre/LICENSE"
cp dagrejs-dagre/LICENSE "$here/cytoscape-dagre/LICENSE.dagre"

# tablesort and its number parser (numeric columns sort as numbers).
cp tablesort/dist/tablesort.min.js "$here/tablesort/"
cp tablesort/dist/sorts/tablesort.number.min.js "$here/tablesort/sorts/"
cp tablesort/LICENCE "$here/tablesort/LICENSE"

# iframe-worker: the shim mkdocs-material's offline plugin would otherwise load from unpkg (mkdocs.yml
# lists it under extra.polyfills). It stands in for Web Workers only on file:// pages.
cp iframe-worker/shim/index.js "$here/iframe-worker/shim.js"
cp iframe-worker/LICENSE "$here/iframe-worker/LICENSE"

echo "vendored katex ${KATEX_VERSION}, tablesort ${TABLESORT_VERSION}, iframe-worker ${IFRAME_WORKER_VERSION}," \
  "cytoscape ${CYTOSCAPE_VERSION}, cytoscape-dagre ${CYTOSCAPE_DAGRE_VERSION} (dagre ${DAGRE_VERSION}) into $here"
