// The results page: the API key, uploads, the caller's jobs. Data from the server or the user is only ever put
// into the page as text (textContent), and the key only ever leaves the tab as the Authorization header.
import { openViewer, closeViewer } from "./viewer.js";

const KEY_ITEM = "tessera.apiKey"; // sessionStorage: this tab only, gone when it closes
const POLL_BUSY_MS = 1000;
const POLL_IDLE_MS = 5000;
const ACTIVE = new Set(["queued", "running"]);

const $ = (id) => document.getElementById(id);
const uploadNames = new Map(); // job id -> the file names uploaded from this tab (the server keeps none)
let chosenFiles = [];
let pollTimer = null;

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

/** fetch() against this origin with the key as a bearer token; a problem document becomes an Error. */
export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...options, headers, credentials: "omit", cache: "no-store" });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const problem = await response.json();
      detail = `${problem.code || response.status}: ${problem.detail || problem.title || ""}`;
    } catch { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

export function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(text, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
}

// --- the key --------------------------------------------------------------------------------------------

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  await refreshAll();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  clearTimeout(pollTimer);
  $("job-rows").replaceChildren();
  $("model").replaceChildren();
  closeViewer();
  showKeyState(false);
  say("key forgotten");
}

function showKeyState(valid) {
  $("key-state").textContent = valid ? "key in use (this tab only)" : "no key";
  $("submit").disabled = !valid || chosenFiles.length === 0;
}

async function refreshAll() {
  try {
    await loadModels();
    showKeyState(true);
    say("");
    await refreshJobs();
  } catch (error) {
    showKeyState(false);
    say(error.message, true);
  }
}

// --- models and uploads ---------------------------------------------------------------------------------

async function loadModels() {
  const { models } = await (await api("/v1/models")).json();
  const select = $("model");
  select.replaceChildren();
  for (const model of models) {
    const option = new Option(`${model.name} ${model.version} (${model.channels.join(" + ")})`, model.name);
    option.selected = model.default;
    select.add(option);
  }
}

function chooseFiles(files) {
  chosenFiles = Array.from(files);
  const list = $("chosen-files");
  list.replaceChildren(...chosenFiles.map((file) => {
    const item = document.createElement("li");
    item.textContent = `${file.name} (${(file.size / 2 ** 20).toFixed(1)} MB)`;
    return item;
  }));
  showKeyState(Boolean(apiKey()));
}

async function submitJob() {
  const form = new FormData();
  for (const file of chosenFiles) form.append("file", file, file.name);
  form.append("model", $("model").value);
  const formats = [...$("formats").querySelectorAll("input:checked")].map((box) => box.value);
  form.append("formats", formats.join(","));
  $("submit").disabled = true;
  say("uploading...");
  try {
    const accepted = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    uploadNames.set(accepted.id, chosenFiles.map((file) => file.name).join(", "));
    chooseFiles([]);
    $("file-input").value = "";
    say(`job ${accepted.id.slice(0, 8)} queued`);
    await refreshJobs();
  } catch (error) {
    say(error.message, true);
    showKeyState(true);
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    chooseFiles(event.dataTransfer.files);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      $("file-input").click();
    }
  });
  $("file-input").addEventListener("change", (event) => chooseFiles(event.target.files));
}

// --- jobs -----------------------------------------------------------------------------------------------

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.job = job.id;
  row.dataset.state = job.state;
  cell(row, job.id.slice(0, 8), "mono");
  cell(row, uploadNames.get(job.id) || "");
  cell(row, job.model);
  const state = job.error ? `${job.state} (${job.error.code}: ${job.error.message})` : job.state;
  cell(row, state, `state ${job.state}`);
  const progressCell = row.insertCell();
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = job.progress;
  const stage = document.createElement("span");
  stage.textContent = ` ${Math.round(job.progress * 100)}%${job.stage && job.state === "running" ? ` ${job.stage}` : ""}`;
  progressCell.append(bar, stage);
  cell(row, new Date(job.created_at * 1000).toLocaleString());
  const actions = row.insertCell();
  if (job.state === "succeeded" && !job.expired) {
    actions.append(button("Open", () => openViewer(job, api).catch((error) => say(error.message, true))));
  }
  actions.append(button(job.state === "running" ? "Cancel" : "Delete", () => deleteJob(job)));
  return row;
}

async function deleteJob(job) {
  try {
    await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
    say(job.state === "running" ? `job ${job.id.slice(0, 8)}: cancelling` : `job ${job.id.slice(0, 8)} deleted`);
    if ($("viewer").dataset.job === job.id) closeViewer();
  } catch (error) {
    say(error.message, true);
  }
  await refreshJobs();
}

async function refreshJobs() {
  clearTimeout(pollTimer);
  if (!apiKey()) return;
  let busy = false;
  try {
    const { jobs } = await (await api("/v1/jobs?limit=100")).json();
    $("job-rows").replaceChildren(...jobs.map(jobRow));
    busy = jobs.some((job) => ACTIVE.has(job.state));
  } catch (error) {
    say(error.message, true);
  }
  pollTimer = setTimeout(refreshJobs, busy ? POLL_BUSY_MS : POLL_IDLE_MS);
}

$("key-form").addEventListener("submit", useKey);
$("key-forget").addEventListener("click", forgetKey);
$("submit").addEventListener("click", submitJob);
$("viewer-close").addEventListener("click", closeViewer);
wireDropZone();
showKeyState(false);
if (apiKey()) refreshAll();
