"""The `/docs` page: a self-contained HTML page that renders `/openapi.json`.

No script or style is loaded from elsewhere (the page works offline and under
a strict Content-Security-Policy of 'self' plus its own inline code): it lists
every operation by tag with its method, path, summary, parameters, request and
response schemas, and a form to try it.
"""

from __future__ import annotations

import html

__all__ = ["docs_page"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API reference</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }}
h1 {{ font-size: 1.6rem; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2rem; }}
details {{ border: 1px solid #ddd; border-radius: 6px; margin: .4rem 0; padding: .3rem .6rem; }}
summary {{ cursor: pointer; }}
.verb {{ display: inline-block; min-width: 5rem; font-weight: bold; font-family: monospace; }}
.path {{ font-family: monospace; }} .muted {{ color: #666; }}
pre {{ background: #f6f6f6; padding: .5rem; overflow-x: auto; font-size: .85rem; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: .2rem .5rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="muted">Generated from the service contracts: <a href="openapi.json">openapi.json</a>.
Errors answer with a <code>google.rpc.Status</code> JSON body.</p>
<div id="ops">Loading the API description...</div>
<script>
"use strict";
function el(tag, attrs, ...children) {{
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {{}})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}}
function schemaOf(doc, schema) {{
  if (schema && schema.$ref) {{
    const name = schema.$ref.split("/").pop();
    return [name, doc.components.schemas[name]];
  }}
  return ["", schema];
}}
async function main() {{
  const root = document.getElementById("ops");
  const doc = await (await fetch("openapi.json")).json();
  root.textContent = "";
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {{
    for (const [verb, op] of Object.entries(item)) {{
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([verb, path, op]);
    }}
  }}
  for (const [tag, ops] of byTag) {{
    root.append(el("h2", {{}}, tag));
    for (const [verb, path, op] of ops) {{
      const body = el("div", {{}});
      if (op.description) body.append(el("p", {{}}, op.description));
      if ((op.parameters || []).length) {{
        const table = el("table", {{}}, el("tr", {{}}, el("th", {{}}, "parameter"),
          el("th", {{}}, "in"), el("th", {{}}, "description")));
        for (const p of op.parameters) table.append(el("tr", {{}},
          el("td", {{"class": "path"}}, p.name + (p.required ? " *" : "")),
          el("td", {{}}, p.in), el("td", {{}}, p.description || "")));
        body.append(table);
      }}
      if (op.requestBody) {{
        const [name, schema] = schemaOf(doc, op.requestBody.content["application/json"].schema);
        body.append(el("p", {{}}, "Request body " + name),
                    el("pre", {{}}, JSON.stringify(schema, null, 1)));
      }}
      for (const [code, answer] of Object.entries(op.responses || {{}})) {{
        const content = answer.content || {{}};
        const first = Object.values(content)[0];
        const [name] = first ? schemaOf(doc, first.schema) : [""];
        body.append(el("p", {{"class": "muted"}}, code + ": " + (answer.description || "") +
          " " + Object.keys(content).join(", ") + " " + name));
      }}
      root.append(el("details", {{}}, el("summary", {{}},
        el("span", {{"class": "verb"}}, verb.toUpperCase()), " ",
        el("span", {{"class": "path"}}, path), " ",
        el("span", {{"class": "muted"}}, op.summary || "")), body));
    }}
  }}
}}
main().catch(e => {{ document.getElementById("ops").textContent = "Could not load: " + e; }});
</script>
</body>
</html>
"""


def docs_page(title: str) -> str:
    return _PAGE.format(title=html.escape(title))
