// mpsclip search page: vanilla JS, no build step, no network beyond this server.
// Every piece of data from the server is inserted with textContent or as an attribute, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const MAX_SCENES = 12; // scenes shown before a search (afterwards: the scenes holding hits)
const SCENE_HEIGHT = 320; // tallest scene overview, in CSS pixels
const LIKE = "like: "; // the search box during a "more like this" search: "like: <item id>"
const state = { stores: [], hits: [], selected: null, bbox: null, like: null, last: null, shown: null };

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function message(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(`${response.status}: ${describe(body.detail ?? body)}`);
  }
  return body;
}

// FastAPI's validation errors are a list of {loc, msg}: shown as "k: Input should be ..." per field.
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => `${(d.loc || []).filter((part) => part !== "body").join(".") || "request"}: ${d.msg}`)
      .join("; ");
  }
  return JSON.stringify(detail);
}

function currentStore() {
  return state.stores.find((s) => s.name === $("store").value) || null;
}

// ---- URL state -------------------------------------------------------------------------------------------------

function readUrl() {
  const params = new URLSearchParams(location.search);
  if (params.has("q")) $("query").value = params.get("q");
  if (params.has("mode")) $("mode").value = params.get("mode");
  if (params.has("k")) $("k").value = params.get("k");
  state.like = params.get("like");
  $("date-from").value = params.get("from") || "";
  $("date-to").value = params.get("to") || "";
  $("max-cloud").value = params.get("cloud") || "";
  const bbox = (params.get("bbox") || "").split(",").map(Number);
  state.bbox = bbox.length === 4 && bbox.every(Number.isFinite) ? bbox : null;
  return params.get("store");
}

function writeUrl() {
  const params = new URLSearchParams();
  const q = $("query").value.trim();
  if (q && q !== state.shown) params.set("q", q); // not the label of an item or image search
  if (state.like) params.set("like", state.like);
  params.set("mode", $("mode").value);
  params.set("k", $("k").value);
  if ($("store").value) params.set("store", $("store").value);
  if (state.bbox) params.set("bbox", state.bbox.map((v) => v.toFixed(5)).join(","));
  if ($("date-from").value) params.set("from", $("date-from").value);
  if ($("date-to").value) params.set("to", $("date-to").value);
  if ($("max-cloud").value) params.set("cloud", $("max-cloud").value);
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

// ---- search ----------------------------------------------------------------------------------------------------

function common() {
  const body = { k: Number($("k").value) || 10, mode: $("mode").value };
  if ($("store").value) body.store = $("store").value;
  if (state.bbox) body.bbox = state.bbox;
  const from = $("date-from").value;
  const to = $("date-to").value;
  if (from || to) body.datetime = `${from || ".."}/${to || ".."}`; // dates: whole UTC days, both included
  if ($("max-cloud").value !== "") body.max_cloud = Number($("max-cloud").value);
  return body;
}

async function run(label, request) {
  message(`Searching ${label}…`);
  try {
    const result = await request();
    state.hits = result.hits;
    renderResults(result, label);
  } catch (err) {
    state.hits = [];
    renderResults(null, label);
    message(`Search failed: ${err.message}`, true);
  }
}

// The search box shows what is searched: the typed text, or "like: <id>" / "image: <file>" (a label; submitting
// it unchanged searches the same again, and "like: <id>" typed in searches like that item).
function showQuery(label) {
  $("query").value = label;
  state.shown = label;
}

function searchText() {
  const text = $("query").value.trim();
  if (text.startsWith(LIKE) && text.length > LIKE.length) return searchItem(text.slice(LIKE.length).trim());
  if (text === state.shown && state.last) return state.last();
  state.shown = null;
  state.like = null;
  writeUrl();
  if (!text) return message("Type a query, drop an image, or pick a result for “more like this”.");
  state.last = () => searchText();
  const body = { ...common(), text };
  return run(`for “${text}”`, () => api("/search", jsonPost(body)));
}

function searchItem(id) {
  state.last = () => searchItem(id);
  state.like = id;
  showQuery(`${LIKE}${id}`);
  writeUrl();
  return run(`like ${id}`, () => api("/search", jsonPost({ ...common(), item_id: id })));
}

function searchFile(file) {
  if (!file.type.startsWith("image/")) return message(`${file.name} is not an image`, true);
  state.last = () => searchFile(file);
  state.like = null;
  showQuery(`image: ${file.name}`);
  writeUrl();
  const form = new FormData();
  form.append("file", file);
  const body = common();
  form.append("k", String(body.k));
  form.append("mode", body.mode);
  if (body.store) form.append("store", body.store);
  if (body.bbox) form.append("bbox", body.bbox.join(","));
  if (body.datetime) form.append("datetime", body.datetime);
  if (body.max_cloud !== undefined) form.append("max_cloud", String(body.max_cloud));
  return run(`by image ${file.name}`, () => api("/search/upload", { method: "POST", body: form }));
}

function jsonPost(body) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

// ---- rendering -------------------------------------------------------------------------------------------------

function renderResults(result, label) {
  const grid = $("results");
  grid.replaceChildren();
  state.selected = null;
  $("details").hidden = true;
  if (result) {
    const ms = result.took_ms ? ` in ${Math.round(result.took_ms.total)} ms` : "";
    const dated = $("date-from").value || $("date-to").value ? " in the date range" : "";
    const cloudy = $("max-cloud").value !== "" ? ` with at most ${$("max-cloud").value}% cloud` : "";
    const where = (state.bbox ? " inside the box" : "") + dated + cloudy;
    const hint = state.bbox ? "clear the box or draw a bigger one" : "widen or clear the dates and cloud cover";
    const none = where ? `No results ${label}${where}: ${hint}.` : `No results ${label}.`;
    message(result.hits.length ? `${result.hits.length} results ${label}${where}${ms}` : none);
  }
  state.hits.forEach((hit, index) => {
    const card = el("figure", { class: "hit", tabindex: "0", "data-id": hit.id });
    const img = el("img", { src: hit.thumbnail_url, alt: hit.id, loading: "lazy" });
    const caption = el("figcaption");
    caption.append(
      el("div", { class: "score" }, `#${hit.rank} · ${hit.score.toFixed(4)}`),
      el("div", { class: "id" }, hit.id),
      el("div", { class: "date" }, hit.datetime ? hit.datetime.replace("T", " ").replace("Z", " UTC") : ""),
      el("div", { class: "keywords" }, (hit.keywords || []).join(", ")),
    );
    card.append(img, caption);
    card.addEventListener("click", () => select(index));
    card.addEventListener("keydown", (event) => event.key === "Enter" && select(index));
    grid.append(card);
  });
  renderOverview();
}

async function select(index) {
  const hit = state.hits[index];
  state.selected = index;
  document.querySelectorAll(".hit").forEach((card, i) => card.classList.toggle("selected", i === index));
  renderOverview();
  $("details").hidden = false;
  $("details-id").textContent = hit.id;
  $("details-thumb").src = hit.thumbnail_url;
  $("details-thumb").alt = hit.id;
  const meta = $("details-meta");
  meta.replaceChildren();
  try {
    const item = await api(`/items/${encodeURIComponent(hit.store)}/${encodeURIComponent(hit.id)}`);
    const rows = { store: item.store, score: hit.score.toFixed(4), keywords: (item.keywords || []).join(", ") };
    if (hit.scene) rows.scene = hit.scene;
    for (const [key, value] of Object.entries({ ...rows, ...(item.meta || {}) })) {
      meta.append(el("dt", {}, key), el("dd", {}, typeof value === "string" ? value : JSON.stringify(value)));
    }
  } catch (err) {
    meta.append(el("dt", {}, "error"), el("dd", {}, err.message));
  }
}

// ---- scene overview: footprints and bbox drawing ---------------------------------------------------------------

function project(bounds, width, height, lon, lat) {
  const [w, s, e, n] = bounds;
  return [((lon - w) / (e - w)) * width, ((n - lat) / (n - s)) * height];
}

function unproject(bounds, width, height, x, y) {
  const [w, s, e, n] = bounds;
  return [w + (x / width) * (e - w), n - (y / height) * (n - s)];
}

function shownScenes(store) {
  const scenes = store ? store.scenes || [] : [];
  const withHits = scenes.filter((scene) => state.hits.some((hit) => hit.scene === scene.name));
  return withHits.length ? withHits : scenes.slice(0, MAX_SCENES);
}

function renderOverview() {
  const store = currentStore();
  const scenes = shownScenes(store);
  $("overview").hidden = scenes.length === 0;
  const holder = $("scenes");
  holder.replaceChildren();
  for (const scene of scenes) holder.append(sceneView(scene));
  const hidden = (store ? (store.scenes || []).length : 0) - scenes.length;
  const note = hidden === 1 ? "1 more scene holds no hit." : `${hidden} more scenes hold no hit.`;
  $("scenes-note").textContent = hidden > 0 ? note : "";
  $("bbox-bar").hidden = !state.bbox;
  $("bbox-text").textContent = state.bbox ? state.bbox.map((v) => v.toFixed(4)).join(", ") : "";
}

function sceneView(scene) {
  const box = el("div", { class: "scene", "data-scene": String(scene.index) });
  const frame = el("div", { class: "frame" });
  frame.style.aspectRatio = `${scene.size[0]} / ${scene.size[1]}`;
  frame.style.width = `${(SCENE_HEIGHT * scene.size[0]) / scene.size[1]}px`;
  if (scene.quicklook_url) {
    const img = el("img", { src: scene.quicklook_url, alt: `quicklook of ${scene.name}` });
    img.addEventListener("error", () => frame.append(el("p", { class: "error" }, `No quicklook of ${scene.name}.`)));
    frame.append(img);
  } else {
    frame.append(el("p", { class: "error" }, scene.error || `No quicklook of ${scene.name}.`));
  }
  const size = 1000; // SVG user units: the viewBox stretches to the image, so lon/lat map onto [0, size]
  const svg = svgEl("svg", { viewBox: `0 0 ${size} ${size}`, preserveAspectRatio: "none" });
  const toXY = (lon, lat) => project(scene.bounds, size, size, lon, lat);
  state.hits.forEach((hit, index) => {
    if (!hit.footprint || (hit.scene !== null && hit.scene !== undefined && hit.scene !== scene.name)) return;
    const points = hit.footprint.coordinates[0].map(([lon, lat]) => toXY(lon, lat).join(",")).join(" ");
    const cls = index === state.selected ? "footprint selected" : "footprint";
    const polygon = svgEl("polygon", { points, class: cls, "data-id": hit.id });
    const title = svgEl("title", {});
    title.textContent = `#${hit.rank} ${hit.id}`;
    polygon.append(title);
    svg.append(polygon);
  });
  if (state.bbox) svg.append(bboxRect(svg, toXY));
  dragBox(svg, scene, size);
  frame.append(svg);
  box.append(frame, el("div", { class: "name" }, `${scene.name} · ${scene.tiles} tiles`));
  return box;
}

function bboxRect(svg, toXY) {
  const [w, s, e, n] = state.bbox;
  const [x0, y0] = toXY(w, n);
  const [x1, y1] = toXY(e, s);
  return svgEl("rect", { class: "bbox", x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0) });
}

function dragBox(svg, scene, size) {
  let start = null;
  let rect = null;
  const local = (event) => {
    const r = svg.getBoundingClientRect();
    const x = Math.min(Math.max(event.clientX - r.left, 0), r.width);
    const y = Math.min(Math.max(event.clientY - r.top, 0), r.height);
    return [(x / r.width) * size, (y / r.height) * size];
  };
  svg.addEventListener("pointerdown", (event) => {
    start = local(event);
    svg.setPointerCapture(event.pointerId);
    rect = svgEl("rect", { class: "bbox", x: start[0], y: start[1], width: 0, height: 0 });
    svg.append(rect);
  });
  svg.addEventListener("pointermove", (event) => {
    if (!start) return;
    const [x, y] = local(event);
    rect.setAttribute("x", Math.min(x, start[0]));
    rect.setAttribute("y", Math.min(y, start[1]));
    rect.setAttribute("width", Math.abs(x - start[0]));
    rect.setAttribute("height", Math.abs(y - start[1]));
  });
  svg.addEventListener("pointerup", (event) => {
    if (!start) return;
    const end = local(event);
    const first = start;
    start = null;
    if (Math.abs(end[0] - first[0]) < 4 || Math.abs(end[1] - first[1]) < 4) return renderOverview();
    const [lonA, latA] = unproject(scene.bounds, size, size, first[0], first[1]);
    const [lonB, latB] = unproject(scene.bounds, size, size, end[0], end[1]);
    state.bbox = [Math.min(lonA, lonB), Math.min(latA, latB), Math.max(lonA, lonB), Math.max(latA, latB)];
    rerun();
  });
}

function rerun() {
  writeUrl();
  if (state.last) state.last();
  else renderOverview();
}

// ---- GeoJSON download (RFC 7946: lon/lat WGS84) ------------------------------------------------------------------

function downloadGeoJSON() {
  const features = state.hits
    .filter((hit) => hit.footprint)
    .map((hit) => ({
      type: "Feature",
      id: hit.id,
      geometry: hit.footprint,
      properties: {
        rank: hit.rank, score: hit.score, id: hit.id, store: hit.store, keywords: hit.keywords, scene: hit.scene,
        datetime: hit.datetime,
      },
    }));
  const blob = new Blob([JSON.stringify({ type: "FeatureCollection", features }, null, 2)], { type: "application/geo+json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: "mpsclip-hits.geojson" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// ---- start -----------------------------------------------------------------------------------------------------

async function loadStores(wanted) {
  const select = $("store");
  try {
    state.stores = (await api("/stores")).stores;
  } catch (err) {
    message(`Could not list the stores: ${err.message}`, true);
    return false;
  }
  select.replaceChildren(...state.stores.map((s) => el("option", { value: s.name }, `${s.name} (${s.items} items)`)));
  if (!state.stores.length) {
    message("No store is being served: start `mpsclip serve STORE`.", true);
    return false;
  }
  if (wanted && !state.stores.some((s) => s.name === wanted)) {
    const served = state.stores.map((s) => s.name).join(", ");
    message(`Store “${wanted}” is not served here (served: ${served}); pick one and search again.`, true);
    renderOverview();
    return false;
  }
  if (wanted) select.value = wanted;
  return checkEmpty();
}

function checkEmpty() {
  const store = currentStore();
  if (store && store.items === 0) {
    message(`Store ${store.name} is empty: embed images into it with \`mpsclip embed\` first.`, true);
    return false;
  }
  renderOverview();
  return true;
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchText();
  });
  $("store").addEventListener("change", () => {
    state.bbox = null;
    writeUrl();
    if (checkEmpty() && state.last) state.last();
  });
  $("mode").addEventListener("change", rerun);
  for (const id of ["date-from", "date-to", "max-cloud"]) $(id).addEventListener("change", rerun);
  $("more-like-this").addEventListener("click", () => {
    if (state.selected !== null) searchItem(state.hits[state.selected].id);
  });
  $("bbox-clear").addEventListener("click", () => {
    state.bbox = null;
    rerun();
  });
  $("geojson").addEventListener("click", downloadGeoJSON);
  $("file").addEventListener("change", (event) => event.target.files[0] && searchFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) searchFile(file);
  });
}

async function main() {
  wire();
  const wanted = readUrl();
  if (!(await loadStores(wanted))) return;
  if (state.like) searchItem(state.like);
  else if ($("query").value.trim()) searchText();
}

main();
