// The search page: one query at a time (text, an indexed photo, or an uploaded photo), results in a
// grid, "More results" for the next page. The URL holds text and photo queries (?q= / ?similar=),
// so they can be bookmarked and the back button works. Text and photo queries can be steered: mark
// results good or bad (the buttons under each photo), then "Re-rank"; filters narrow the photos first.
"use strict";

const PAGE = 24;
const $ = (id) => document.getElementById(id);
let current = null; // {kind: "text" | "similar" | "upload", value, file, offset, more, less, filters}
let latest = 0; // number of the newest request; answers to older ones are dropped
const marks = new Map(); // image id -> "good" | "bad", for the next re-rank
const FILTERS = ["folder", "after", "before", "camera"];

const encodeId = (id) => id.split("/").map(encodeURIComponent).join("/");

function readFilters() {
  const filters = {};
  for (const name of FILTERS) {
    const value = $(`filter-${name}`).value.trim();
    if (value) filters[name] = value;
  }
  return filters;
}

// Feedback and filters go through /api/search, where a photo query is the term id:IMAGE_ID.
function steeredUrl(query, page) {
  const params = new URLSearchParams();
  params.set("q", query.kind === "similar" ? `id:${query.value}` : query.value);
  for (const id of query.more || []) params.append("more_like", id);
  for (const id of query.less || []) params.append("less_like", id);
  for (const [name, value] of Object.entries(query.filters || {})) params.set(name, value);
  return `/api/search?${params}&${page}`;
}

const isSteered = (query) =>
  (query.more || []).length + (query.less || []).length + Object.keys(query.filters || {}).length > 0;

async function api(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (error) {
    throw new Error(`The server cannot be reached (${error.message}).`);
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 413 && !body.detail) throw new Error("the file is too large to upload.");
  if (!response.ok) {
    throw new Error(body.detail || `The server answered ${response.status} ${response.statusText}.`);
  }
  return body;
}

function fetchPage(query, offset) {
  const page = `k=${PAGE}&offset=${offset}` + ($("explain").checked ? "&explain=true" : "");
  if (query.kind !== "upload" && isSteered(query)) return api(steeredUrl(query, page));
  if (query.kind === "text") return api(`/api/search?q=${encodeURIComponent(query.value)}&${page}`);
  if (query.kind === "similar") return api(`/api/similar/${encodeId(query.value)}?${page}`);
  const form = new FormData();
  form.append("file", query.file);
  return api(`/api/search/image?${page}`, { method: "POST", body: form });
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function describe(query) {
  const marked = (query.more || []).length + (query.less || []).length;
  const steer = marked ? ` re-ranked by ${marked} marked photo${marked === 1 ? "" : "s"}` : "";
  if (query.kind === "text") return `“${query.value}”${steer}`;
  if (query.kind === "similar") return `photos like ${query.value}${steer}`;
  return `photos like your upload ${query.value}`;
}

function updateRerank() {
  const button = $("rerank");
  button.hidden = marks.size === 0;
  button.textContent = `Re-rank with ${marks.size} marked`;
}

function markButton(hit, item, verdict) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `mark ${verdict}`;
  button.textContent = verdict === "good" ? "good" : "bad";
  button.title = verdict === "good" ? "More like this" : "Less like this";
  button.setAttribute("aria-label", `${button.title}: ${hit.id}`);
  button.setAttribute("aria-pressed", String(marks.get(hit.id) === verdict));
  button.addEventListener("click", () => {
    if (marks.get(hit.id) === verdict) marks.delete(hit.id);
    else marks.set(hit.id, verdict);
    item.dataset.mark = marks.get(hit.id) || "";
    for (const b of item.querySelectorAll(".mark")) {
      b.setAttribute("aria-pressed", String(marks.get(hit.id) === (b.classList.contains("good") ? "good" : "bad")));
    }
    updateRerank();
  });
  return button;
}

function showQueryImage(query) {
  const box = $("query-image");
  box.hidden = query.kind === "text";
  if (box.hidden) return;
  const img = box.querySelector("img");
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  img.dataset.objectUrl = "";
  if (query.kind === "similar") {
    img.src = `/thumbs/${encodeId(query.value)}`;
  } else {
    img.src = img.dataset.objectUrl = URL.createObjectURL(query.file);
  }
  box.querySelector("span").textContent = `Searching for ${describe(query)}`;
}

function hitElement(hit) {
  const item = document.createElement("li");
  item.className = "hit";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "photo";
  button.title = `Find photos like ${hit.id}`;
  button.addEventListener("click", () => search({ kind: "similar", value: hit.id }));
  const img = document.createElement("img");
  img.src = hit.thumb;
  img.alt = hit.id;
  img.loading = "lazy";
  button.append(img);
  const caption = document.createElement("div");
  caption.className = "caption";
  const link = document.createElement("a");
  link.href = hit.image;
  link.target = "_blank";
  link.textContent = hit.id;
  link.title = "Open the full image";
  caption.append(`#${hit.rank} · ${hit.score.toFixed(3)} · `, link);
  item.append(button, caption);
  if (hit.why) {
    const why = document.createElement("div");
    why.className = "why";
    why.textContent = hit.why;
    button.title = `${hit.why}\n(click: find photos like ${hit.id})`;
    item.append(why);
  }
  if (current === null || current.kind !== "upload") {
    const feedback = document.createElement("div");
    feedback.className = "feedback";
    feedback.append(markButton(hit, item, "good"), markButton(hit, item, "bad"));
    item.dataset.mark = marks.get(hit.id) || "";
    item.append(feedback);
  }
  return item;
}

async function load(query, offset) {
  const ticket = ++latest;
  const more = $("more");
  more.disabled = true;
  if (offset === 0) {
    $("results").replaceChildren();
    more.hidden = true;
    showQueryImage(query);
    current = { ...query, offset: 0 };
  }
  setStatus(offset === 0 ? `Searching for ${describe(query)}…` : "Loading more…");
  try {
    const page = await fetchPage(query, offset);
    if (ticket !== latest) return;
    $("results").append(...page.results.map(hitElement));
    const shown = $("results").children.length;
    if (shown === 0) {
      setStatus(`No photos found for ${describe(query)}.`);
    } else {
      setStatus(`${shown} result${shown === 1 ? "" : "s"} for ${describe(query)}, best first.`);
    }
    more.hidden = !page.more;
    current = { ...query, offset: offset + page.results.length };
  } catch (error) {
    if (ticket !== latest) return;
    setStatus(`Search failed: ${error.message}`, true);
  } finally {
    more.disabled = false;
  }
}

function urlOf(query) {
  if (query.kind === "text") return `/?q=${encodeURIComponent(query.value)}`;
  if (query.kind === "similar") return `/?similar=${encodeURIComponent(query.value)}`;
  return "/";
}

function search(query, { push = true, keepMarks = false } = {}) {
  if (!keepMarks) marks.clear();
  updateRerank();
  if (query.kind !== "upload") query = { filters: readFilters(), ...query };
  if (query.kind === "text") $("query").value = query.value;
  if (push) history.pushState(null, "", urlOf(query));
  window.scrollTo(0, 0);
  return load(query, 0);
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.get("q")) return { kind: "text", value: params.get("q") };
  if (params.get("similar")) return { kind: "similar", value: params.get("similar") };
  return null;
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) {
    setStatus("Type a few words first, for example “two dogs playing in the snow”.", true);
    return;
  }
  search({ kind: "text", value: text });
});

$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (file) search({ kind: "upload", value: file.name, file });
  $("upload").value = "";
});

$("more").addEventListener("click", () => current && load(current, current.offset));

// Re-rank: the current query with every photo marked so far (marks stay, so rounds add up).
$("rerank").addEventListener("click", () => {
  if (!current) return;
  const pick = (verdict) => [...marks].filter(([, v]) => v === verdict).map(([id]) => id);
  const { kind, value } = current;
  search({ kind, value, more: pick("good"), less: pick("bad") }, { push: false, keepMarks: true });
});

$("filters").addEventListener("change", () => {
  if (current && current.kind !== "upload") {
    const { kind, value, more, less } = current;
    search({ kind, value, more, less, filters: readFilters() }, { push: false, keepMarks: true });
  }
});

window.addEventListener("popstate", () => {
  const query = fromUrl();
  if (query) search(query, { push: false });
});

$("explain").addEventListener("change", () => current && search({ ...current }, { push: false }));

// The server answers while it still opens the index: say so, and ask again until it is ready.
function checkHealth() {
  return api("/api/health")
    .then((health) => {
      if (health.status === "loading") {
        $("index-info").textContent = "Loading the index and its model…";
        setTimeout(checkHealth, 1000);
        return;
      }
      if (health.status === "error") {
        setStatus(`The index could not be opened: ${health.detail}`, true);
        return;
      }
      $("index-info").textContent = `${health.images} photos indexed`;
      $("index-info").title = health.calibrated
        ? "Scores are the chance that a photo matches (0.5: even odds)."
        : "Scores are similarity similarities (this model has no calibration).";
      if (health.images === 0) setStatus("The index is empty: there is nothing to search yet.", true);
    })
    .catch((error) => setStatus(`The server is not answering: ${error.message}`, true));
}
checkHealth();

const initial = fromUrl();
if (initial) search(initial, { push: false });
