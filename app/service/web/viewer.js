// The viewer of one finished job: NiiVue draws the input image with the mask over it (the labels' own colours,
// each label shown or hidden, one opacity) and the uncertainty map as a second overlay when the job has one;
// beside it the statistics table, the preview and the downloads. Artifacts are fetched with the caller's key
// (the `api` function given to openViewer), never through a URL that carries it.
import { Niivue, NVImage, SLICE_TYPE } from "./niivue.js";

// Colours for labels whose model gives none: the preview's palette (pipelines/writers/preview.py PALETTE).
export const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
  [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
  [0, 0, 128], [128, 128, 128],
];
const VIEWS = {
  axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL, sagittal: SLICE_TYPE.SAGITTAL,
  multiplanar: SLICE_TYPE.MULTIPLANAR, render: SLICE_TYPE.RENDER,
};
const STAT_COLUMNS = [
  ["name", "label"], ["voxel_count", "voxels"], ["volume_ml", "volume (ml)"], ["intensity_mean", "mean"],
  ["intensity_std", "std"], ["intensity_min", "min"], ["intensity_max", "max"], ["uncertainty_mean", "uncertainty"],
];

const $ = (id) => document.getElementById(id);
let niivue = null;
let shown = null; // { job, mask, uncertainty, labels, hidden: Set, blobUrls: [] }
let api = null;

async function viewerInstance() {
  if (niivue === null) {
    niivue = new Niivue({
      backColor: [0, 0, 0, 1], dragAndDropEnabled: false, logLevel: "warn", crosshairColor: [1, 1, 1, 0.5],
      isColorbar: false, multiplanarShowRender: 1, loadingText: "",
      isRadiologicalConvention: true, // as the preview and radiology viewers: the patient's right on the screen's left
    });
    await niivue.attachToCanvas($("gl"));
  }
  return niivue;
}

async function artifactBytes(job, name) {
  return (await api(`${job.url}/artifacts/${encodeURIComponent(name)}`)).arrayBuffer();
}

function labelColour(label) {
  return label.color || PALETTE[(label.value - 1) % PALETTE.length];
}

/** NiiVue's label table: each label in its colour, hidden ones (and the background) transparent. */
function labelLut(labels, hidden) {
  const table = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
  for (const label of labels) {
    const [r, g, b] = labelColour(label);
    table.R.push(r); table.G.push(g); table.B.push(b);
    table.A.push(hidden.has(label.value) ? 0 : 255);
    table.I.push(label.value);
    table.labels.push(label.name);
  }
  return table;
}

function redrawMask() {
  shown.mask.setColormapLabel(labelLut(shown.labels, shown.hidden));
  niivue.updateGLVolume();
}

function layerIndex(volume) {
  return niivue.getVolumeIndexByID(volume.id);
}

function showLabels(labels) {
  $("labels").replaceChildren(...labels.map((label) => {
    const item = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.dataset.value = String(label.value);
    box.addEventListener("change", () => {
      if (box.checked) shown.hidden.delete(label.value); else shown.hidden.add(label.value);
      redrawMask();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = `rgb(${labelColour(label).join(",")})`;
    const name = document.createElement("span");
    name.className = "label-name";
    name.textContent = label.name;
    const text = document.createElement("label");
    text.append(box, swatch, name);
    item.append(text);
    return item;
  }));
}

function showStatistics(stats) {
  const table = $("stats");
  const columns = STAT_COLUMNS.filter(([key]) => stats.labels.some((row) => key in row));
  const head = document.createElement("tr");
  for (const [, title] of columns) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...stats.labels.map((row) => {
    const tr = document.createElement("tr");
    for (const [key] of columns) {
      const value = row[key];
      tr.insertCell().textContent = typeof value === "number" ? String(+value.toFixed(3)) : (value ?? "");
    }
    return tr;
  }));
}

/** The crosshair on the centroid of the largest label (else it stays in the middle of the volume). */
function focusLargestLabel(stats) {
  const found = stats.labels.filter((row) => row.voxel_count > 0 && row.centroid_ras_mm);
  if (found.length === 0) return;
  const largest = found.reduce((a, b) => (b.voxel_count > a.voxel_count ? b : a));
  niivue.scene.crosshairPos = niivue.mm2frac(largest.centroid_ras_mm);
  niivue.drawScene();
}

function blobUrl(bytes, type) {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  shown.blobUrls.push(url);
  return url;
}

async function download(job, name, url) {
  const blob = await (await api(url)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${job.id.slice(0, 8)}_${name}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function showDownloads(job) {
  const items = [...job.artifacts.map((a) => [a.name, a.url, a.bytes]), ["image.nii.gz", `${job.url}/image`, null]];
  $("downloads").replaceChildren(...items.map(([name, url, bytes]) => {
    const item = document.createElement("li");
    const link = document.createElement("button");
    link.type = "button";
    link.className = "link";
    link.textContent = bytes === null ? `${name} (input image)` : `${name} (${(bytes / 1024).toFixed(0)} KB)`;
    link.addEventListener("click", () => download(job, name, url));
    item.append(link);
    return item;
  }));
}

async function showUncertainty(job, names, nv) {
  const box = $("uncertainty-box");
  box.hidden = !names.has("uncertainty.nii.gz");
  shown.uncertainty = null;
  if (box.hidden) return;
  const volume = await NVImage.new(await artifactBytes(job, "uncertainty.nii.gz"), "uncertainty.nii.gz", "warm", 0);
  nv.addVolume(volume);
  shown.uncertainty = volume;
  let channels = [];
  if (names.has("report.json")) {
    const report = JSON.parse(new TextDecoder().decode(await artifactBytes(job, "report.json")));
    channels = report?.settings?.network_runtime?.uncertainty_channels || [];
  }
  const frames = volume.nFrame4D || 1;
  $("uncertainty-channel").replaceChildren(...Array.from({ length: frames },
    (_, frame) => new Option(String(channels[frame] || `channel ${frame}`), String(frame))));
  $("uncertainty-on").checked = false;
}

function applyUncertainty() {
  if (!shown?.uncertainty) return;
  const on = $("uncertainty-on").checked;
  niivue.setOpacity(layerIndex(shown.uncertainty), on ? Number($("uncertainty-opacity").value) : 0);
  niivue.setFrame4D(shown.uncertainty.id, Number($("uncertainty-channel").value || 0));
}

export function closeViewer() {
  $("viewer").hidden = true;
  delete $("viewer").dataset.job;
  if (shown) shown.blobUrls.forEach((url) => URL.revokeObjectURL(url));
  shown = null;
  if (niivue) while (niivue.volumes.length) niivue.removeVolume(niivue.volumes[0]);
}

/** Show a succeeded job: ``fetchApi`` is the page's fetch() with the key. */
export async function openViewer(job, fetchApi) {
  api = fetchApi;
  closeViewer();
  const names = new Set(job.artifacts.map((a) => a.name));
  if (!names.has("mask.nii.gz")) throw new Error("this job has no mask.nii.gz (the nifti output was not asked for)");
  $("viewer").hidden = false;
  $("viewer").dataset.job = job.id;
  $("viewer").dataset.ready = "false";
  $("viewer-job").textContent = job.id.slice(0, 8);
  shown = { job, mask: null, uncertainty: null, labels: [], hidden: new Set(), blobUrls: [] };
  const nv = await viewerInstance();
  const labelTable = JSON.parse(new TextDecoder().decode(await artifactBytes(job, "labels.json")));
  shown.labels = labelTable.details.map((d) => ({ value: d.value, name: d.name, color: d.color }));
  const [imageBytes, maskBytes] = await Promise.all([
    api(`${job.url}/image`).then((r) => r.arrayBuffer()), artifactBytes(job, "mask.nii.gz")]);
  nv.addVolume(await NVImage.new(imageBytes, "image.nii.gz", "gray"));
  await showUncertainty(job, names, nv);
  shown.mask = await NVImage.new(maskBytes, "mask.nii.gz", "gray", Number($("opacity").value));
  nv.addVolume(shown.mask);
  redrawMask();
  showLabels(shown.labels);
  showDownloads(job);
  $("stats").hidden = !names.has("stats.json");
  if (names.has("stats.json")) {
    const stats = JSON.parse(new TextDecoder().decode(await artifactBytes(job, "stats.json")));
    showStatistics(stats);
    focusLargestLabel(stats);
  }
  $("preview").hidden = !names.has("preview.png");
  if (names.has("preview.png")) $("preview").src = blobUrl(await artifactBytes(job, "preview.png"), "image/png");
  $("viewer").dataset.ready = "true";
}

function wireControls() {
  for (const control of $("views").querySelectorAll("button")) {
    control.addEventListener("click", () => niivue?.setSliceType(VIEWS[control.dataset.view]));
  }
  $("opacity").addEventListener("input", () => {
    if (shown?.mask) niivue.setOpacity(layerIndex(shown.mask), Number($("opacity").value));
  });
  for (const id of ["uncertainty-on", "uncertainty-channel", "uncertainty-opacity"]) {
    $(id).addEventListener("input", applyUncertainty);
  }
}

wireControls();
