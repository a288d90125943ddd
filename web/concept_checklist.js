// SAEmnesia for ComfyUI — concept checklist on Erase Concepts and Concept Probe.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// The selection lives in the node's `concepts` STRING widget (hidden here, still saved in workflows and sent in
// API prompts), as the nodes read it: a JSON list of labels, or {label: strength or null} when a concept has
// its own strength (null = the node's strength). The checklist is a view of that string: it is rebuilt from it
// whenever a workflow is loaded, and written back only when the user changes a tick or a strength.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHECKLIST_NODES = {
  SAEmnesiaEraseConcepts: { strengths: true },
  SAEmnesiaEraseConceptsText: { strengths: true },
  SAEmnesiaConceptProbe: { strengths: false }, // a probe only records: no strengths to override
};
const LOADER = "SAEmnesiaLoadSAE";
const FINDER = "SAEmnesiaFindConceptLatents"; // teaches the SAE passing through it one concept, its `label`

/** The latent index a label such as "#123" names (a latent of the SAE by index, not a concept), or null. */
export function latentRef(label) {
  const match = /^#(\d{1,9})$/.exec(label.trim());
  return match ? Number(match[1]) : null;
}

/** The `concepts` string as a Map label -> strength (null = the node's strength); throws on invalid text. */
export function parseSelection(text) {
  const trimmed = (text ?? "").trim();
  if (!trimmed) return new Map();
  const value = JSON.parse(trimmed);
  if (Array.isArray(value) && value.every((v) => typeof v === "string")) {
    return new Map(value.map((label) => [label, null]));
  }
  if (value && typeof value === "object" && !Array.isArray(value)) {
    const entries = Object.entries(value);
    if (entries.every(([, s]) => s === null || (typeof s === "number" && Number.isFinite(s)))) {
      return new Map(entries);
    }
  }
  throw new Error('expected a list of labels or an object {label: strength or null}');
}

/** The inverse of parseSelection: a plain list unless some concept has its own strength. */
export function formatSelection(selection) {
  const entries = [...selection];
  if (entries.every(([, s]) => s === null)) return JSON.stringify(entries.map(([label]) => label));
  return JSON.stringify(Object.fromEntries(entries));
}

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

/** Tell the frontend's change tracker that the graph changed: it records the workflow on mouseup, before a
 * checkbox's change reaches the `concepts` widget, so without this a tick followed by a reload would be lost. */
function noteGraphChanged() {
  const workflow = app.extensionManager?.workflow?.activeWorkflow ?? app.workflowManager?.activeWorkflow;
  workflow?.changeTracker?.checkState?.();
}

function loadStylesheet() {
  if (document.getElementById("saemnesia-checklist-css")) return;
  document.head.append(element("link", {
    id: "saemnesia-checklist-css", rel: "stylesheet", href: new URL("./concept_checklist.css", import.meta.url).href,
  }));
}

class ConceptChecklist {
  constructor(node, { strengths }) {
    this.node = node;
    this.strengths = strengths;
    this.string = node.widgets.find((w) => w.name === "concepts");
    this.string.hidden = true; // not drawn on canvas nodes,
    this.string.computeSize = () => [0, -4]; // and no room left for it (the canvas adds 4 px per widget)
    if (this.string.options) this.string.options.hidden = true; // Vue nodes
    this.selection = new Map();
    this.concepts = []; // [{label, group, latent, default_strength, erasure, calibration}] of the connected SAE
    this.sae = null; // the SAE name the list belongs to (null: none connected)
    this.request = 0;

    this.filter = element("input", { type: "search", placeholder: "filter concepts (#123: a latent)",
      className: "saem-filter" });
    this.filter.addEventListener("input", () => this.render());
    const button = (text, title, onclick) => element("button", { textContent: text, title, onclick });
    this.status = element("div", { className: "saem-status" });
    this.list = element("div", { className: "saem-list" });
    this.root = element("div", { className: "saem-checklist" },
      element("div", { className: "saem-toolbar" }, this.filter,
        button("all", "Tick every concept shown (the filter applies)", () => this.tickShown(true)),
        button("none", "Untick every concept shown (the filter applies)", () => this.tickShown(false)),
        button("↻", "Reload the concept list from the SAE file", () => this.refresh(true))),
      this.status, this.list);
    // keys typed here are not canvas shortcuts; the wheel scrolls the list when it can
    this.root.addEventListener("keydown", (e) => e.stopPropagation());
    this.list.addEventListener("wheel", (e) => {
      if (!e.ctrlKey && this.list.scrollHeight > this.list.clientHeight) e.stopPropagation();
    });

    this.widget = node.addDOMWidget("concept_checklist", "saemnesia_checklist", this.root, {
      serialize: false, getMinHeight: () => 150,
    });
    this.widget.serialize = false; // not in widgets_values: the `concepts` string holds the selection
    this.readString();
  }

  /** Rebuild the ticks from the `concepts` string (a loaded workflow, a paste, an undo). */
  readString() {
    try {
      this.selection = parseSelection(this.string.value);
      this.invalid = null;
    } catch (e) {
      this.selection = new Map();
      this.invalid = `the concepts text is not valid (${e.message}); ticking replaces it`;
    }
    this.render();
  }

  writeString() {
    const known = this.concepts.map((c) => c.label).filter((l) => this.selection.has(l));
    const unknown = [...this.selection.keys()].filter((l) => !known.includes(l));
    this.selection = new Map([...known, ...unknown].map((l) => [l, this.selection.get(l)]));
    this.string.value = formatSelection(this.selection);
    this.invalid = null;
    this.node.setDirtyCanvas(true, true);
    this.render();
    noteGraphChanged();
  }

  /** The node's own strength widget (Erase Concepts), whose value an empty per-concept box inherits. */
  strengthWidget() {
    return this.node.widgets.find((w) => w.name === "strength");
  }

  /** The sae_names of the Load SAE chain feeding the `sae` input (the earliest first: Load SAE nodes chained
   * through `also` give one SAE per block), with its nodes and the concepts Find Concept Latents nodes on the way
   * teach it; or {problem} when there is none. */
  connectedSae() {
    const names = [], nodes = [], taught = [];
    let source = sourceOf(this.node, "sae");
    if (!source) return { problem: "Connect a Load SAE node to list its concepts.", nodes };
    while (source?.comfyClass === FINDER) { // a concept taught on the way: listed before it has run
      const label = source.widgets?.find((w) => w.name === "label")?.value?.trim();
      if (label) taught.unshift({ label, group: source.widgets?.find((w) => w.name === "group")?.value || "taught",
                                  latent: null, taught: true });
      nodes.push(source);
      source = sourceOf(source, "sae");
    }
    if (!source) return { problem: "Connect a Load SAE node to list its concepts.", nodes };
    while (source) {
      const widget = source.widgets?.find((w) => w.name === "sae_name");
      if (source.comfyClass !== LOADER || !widget || nodes.includes(source)) {
        return { problem: `The SAE comes from "${source.title}": concepts are listed for Load SAE nodes only.`, nodes };
      }
      names.unshift(widget.value);
      nodes.push(source);
      source = sourceOf(source, "also");
    }
    return { name: names.join(" + ") + taught.map((c) => ` + ${c.label}`).join(""), names, nodes, taught };
  }

  /** Fetch the concept list when the connected SAEs changed (or always, with force): the union of their
   * concepts, in chain order, each label once. */
  async refresh(force = false) {
    const { name, names, problem, taught = [] } = this.connectedSae();
    if (!force && (name ?? null) === this.sae && !this.error) return;
    const request = ++this.request;
    this.sae = name ?? null;
    this.concepts = [];
    this.latents = null; // how many latents the SAE has (one SAE only: #N names a latent of one SAE)
    this.reads = null;
    this.error = problem ?? null;
    this.note = null;
    this.loading = Boolean(name);
    this.render();
    if (!name) return;
    const answers = await Promise.all(names.map((one) => fetchConcepts(one)));
    if (request !== this.request) return; // a newer refresh is under way
    this.loading = false;
    const failed = answers.find((a) => a.error);
    this.error = failed ? failed.error : null;
    const seen = new Set();
    this.concepts = failed ? [] : [...answers.flatMap((a) => a.data.concepts), ...taught]
      .filter((c) => !seen.has(c.label) && seen.add(c.label));
    this.note = taught.length ? null : answers.map((a) => a.data?.note).filter(Boolean).join(" ") || null;
    this.latents = !failed && answers.length === 1 ? answers[0].data.num_latents ?? null : null;
    this.reads = failed ? null : answers.map((a, i) => `${names[i]} reads ${a.data.reads ?? "the block's output"}`).join("; ");
    this.render();
  }

  tickShown(on) {
    for (const label of this.shownLabels()) {
      if (on && !this.selection.has(label)) this.selection.set(label, null);
      if (!on) this.selection.delete(label);
    }
    this.writeString();
  }

  shownLabels() {
    return [...this.list.querySelectorAll(".saem-row")].map((row) => row.dataset.label);
  }

  /** The filter matches labels only (typing "st" must not select every style through the group's name). */
  matches(label) {
    const q = this.filter.value.trim().toLowerCase();
    return !q || label.toLowerCase().includes(q);
  }

  /** A concept-like row for "#N", a latent of this SAE named by its index, when N is one of its latents. */
  latentRow(label) {
    const index = latentRef(label);
    return index !== null && this.latents !== null && index < this.latents && !this.concepts.some((c) => c.label === label)
      ? { label, group: "latents", latent: index } : null;
  }

  render() {
    // latents named by index: the ticked ones, and the one typed in the filter
    const latentRows = [...new Set([...this.selection.keys(), this.filter.value.trim()])]
      .map((label) => this.latentRow(label)).filter(Boolean);
    const known = new Set([...this.concepts, ...latentRows].map((c) => c.label));
    const groups = new Map();
    // labels the SAE does not know come first, in the error colour: running fails until they are unticked
    const unknown = [...this.selection.keys()].filter((l) => !known.has(l) && this.matches(l));
    if (unknown.length) {
      groups.set(this.sae && !this.loading && !this.error ? "unknown to this SAE" : "selected (SAE not loaded)",
        unknown.map((label) => ({ label, unknown: true })));
    }
    for (const c of [...this.concepts, ...latentRows]) {
      const group = c.group || "concepts";
      if (!this.matches(c.label)) continue;
      if (!groups.has(group)) groups.set(group, []);
      groups.get(group).push(c);
    }
    this.list.replaceChildren(...[...groups].map(([group, concepts]) => element("div", { className: "saem-group" },
      element("div", { className: "saem-group-header", textContent: group }),
      ...concepts.map((c) => this.row(c)))));

    const ticked = [...this.concepts, ...latentRows].filter((c) => this.selection.has(c.label)).length;
    const strangers = this.selection.size - ticked;
    const blocking = strangers && this.sae && !this.loading && !this.error;
    const messages = [this.invalid, this.error, this.note].filter(Boolean);
    this.status.classList.toggle("saem-error", Boolean(this.invalid || this.error || blocking));
    this.status.textContent = messages.length ? messages.join(" ")
      : this.loading ? `Loading the concepts of ${this.sae}…`
      : `${ticked} of ${this.concepts.length} concepts ticked` + (strangers ? `, ${strangers} unknown` +
        (blocking ? " to this SAE (listed first): untick them, or running fails" : "") : "");
    this.status.title = this.reads ?? this.sae ?? "";
  }

  /** How well this SAE erased the concept when the file was made (the `erasure` record of its header). */
  badge(c, weak) {
    const e = c.erasure;
    const title = (weak ? `This SAE does not erase ${c.label} at its block. ` : "") +
      `Measured when the file was made, at strength ${e.strength}: ${c.label} was gone from ` +
      `${e.gone} of ${e.images} test images (without erasure the judges saw it in ${e.seen_without}); ` +
      `the other concept in the image survived in ${e.other_kept}.`;
    return element("span", { className: "saem-badge", textContent: `${e.gone}/${e.images}`, title });
  }

  row(c) {
    const tick = element("input", { type: "checkbox", checked: this.selection.has(c.label) });
    tick.addEventListener("change", () => {
      if (tick.checked) this.selection.set(c.label, null);
      else this.selection.delete(c.label);
      this.writeString();
    });
    const weak = c.erasure && c.erasure.gone <= c.erasure.images - c.erasure.seen_without;
    const row = element("label", { className: "saem-row" + (c.unknown ? " saem-unknown" : "") + (weak ? " saem-weak" : "") },
      tick, element("span", { className: "saem-label", textContent: c.label,
        title: c.unknown ? "Not a concept of this SAE: running fails until you untick it"
          : c.group === "latents" ? `latent ${c.latent} of this SAE, by its index` :
          c.taught ? "taught by the Find Concept Latents node before this one, when the workflow runs" :
          `latent ${c.latent ?? "by score"}` + (c.calibration ? `; calibrated (κ ${c.calibration}): strength −1 is ` +
            "the strength measured to erase it" : "") }));
    row.dataset.label = c.label;
    if (c.erasure) row.append(this.badge(c, weak));
    if (this.strengths) {
      const own = this.selection.get(c.label);
      const node = this.strengthWidget();
      const [min, max] = [node?.options?.min ?? -100, node?.options?.max ?? 100];
      const strength = element("input", {
        type: "number", step: "0.1", min, max, className: "saem-strength", value: own ?? "",
        placeholder: `node ${node?.value ?? "?"}`,
        title: `This concept's own strength γ, from ${min} to ${max}; empty = the node's strength ` +
          `(now ${node?.value ?? "?"})`,
      });
      strength.addEventListener("change", () => {
        const value = strength.value.trim() === "" ? null : Number(strength.value);
        // the node refuses strengths outside its own range: keep the box inside it
        this.selection.set(c.label, Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : null);
        this.writeString();
      });
      row.append(strength);
    }
    return row;
  }
}

function sourceOf(node, input) {
  const slot = node.findInputSlot(input);
  return slot < 0 ? null : node.getInputNode(slot);
}

/** {data} of /saemnesia/concepts for one SAE name, or {error}. */
async function fetchConcepts(name) {
  try {
    const response = await api.fetchApi(`/saemnesia/concepts?name=${encodeURIComponent(name)}`);
    const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) return { error: `Could not list the concepts of ${name}: ${data.error ?? `HTTP ${response.status}`}` };
    return { data };
  } catch (e) {
    return { error: `Could not list the concepts of ${name}: ${e.message ?? String(e)}` };
  }
}

function checklistsFedBy(loader) {
  const graph = loader.graph;
  return (graph?.nodes ?? []).filter((n) => n.saemnesiaChecklist?.connectedSae().nodes.includes(loader))
    .map((n) => n.saemnesiaChecklist);
}

function chain(object, method, after) {
  const before = object[method];
  object[method] = function (...args) {
    const result = before?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

app.registerExtension({
  name: "saemnesia.ConceptChecklist",

  setup() {
    loadStylesheet();
  },

  nodeCreated(node) {
    const kind = CHECKLIST_NODES[node.comfyClass];
    if (kind) {
      const checklist = (node.saemnesiaChecklist = new ConceptChecklist(node, kind));
      node.setSize([Math.max(node.size[0], 300), node.size[1] + 160]); // room for a list (a loaded workflow sets its own)
      chain(node, "onConfigure", () => checklist.readString());
      const strength = checklist.strengthWidget();
      if (strength) chain(strength, "callback", () => checklist.render()); // placeholders show the node's value
      chain(node, "onConnectionsChange", () => queueMicrotask(() => checklist.refresh()));
      queueMicrotask(() => checklist.refresh());
    } else if (node.comfyClass === LOADER || node.comfyClass === FINDER) {
      const widget = node.widgets?.find((w) => w.name === (node.comfyClass === LOADER ? "sae_name" : "label"));
      if (widget) chain(widget, "callback", () => checklistsFedBy(node).forEach((c) => c.refresh()));
      // an SAE chained into `also` (or unchained) changes the list of every checklist this loader feeds
      chain(node, "onConnectionsChange", () => queueMicrotask(() => checklistsFedBy(node).forEach((c) => c.refresh())));
    }
  },

  loadedGraphNode(node) {
    node.saemnesiaChecklist?.refresh();
  },
});
