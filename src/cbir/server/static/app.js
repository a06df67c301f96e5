// The search page: one query at a time (text, an indexed photo, or an uploaded photo), results in a
// grid, "More results" for the next page. The URL holds text and photo queries (?q= / ?similar=),
// so they can be bookmarked and the back button works.
"use strict";

const PAGE = 24;
const $ = (id) => document.getElementById(id);
let current = null; // {kind: "text" | "similar" | "upload", value, file, offset}
let latest = 0; // number of the newest request; answers to older ones are dropped

const encodeId = (id) => id.split("/").map(encodeURIComponent).join("/");

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
  if (query.kind === "text") return `“${query.value}”`;
  if (query.kind === "similar") return `photos like ${query.value}`;
  return `photos like your upload ${query.value}`;
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

function search(query, { push = true } = {}) {
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
