// ray-maas console: a page over the API itself (/v1/account, /v1/usage, /v1/keys, /admin/*).
// No library and no network beyond this server: charts are SVG drawn here from numbers the
// server computed (the ledger's own report code), so every figure equals the API's.
// The API key lives in sessionStorage (this tab only) and travels in the Authorization header.
"use strict";

const KEY = "maas.key";
const BASE = location.pathname.replace(/console\/?[^/]*$/, ""); // the app's route prefix, e.g. "/"
const COLORS = ["#2f6feb", "#f08c2e", "#2e9d6a", "#9c4dcc", "#d64545", "#6d7a88"];
const state = { account: null, admin: false };

// ---- helpers ------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `The server answered ${status}.`);
    this.status = status;
    this.code = e.code;
    this.param = e.param;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(BASE + path.replace(/^\//, ""), { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch (exc) {
    throw new ApiError(0, { error: { message: `Could not reach the server (${exc.message}).` } });
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

function showError(exc) {
  const box = document.getElementById("error");
  box.textContent = exc ? (exc.code ? `${exc.message} (${exc.code})` : exc.message) : "";
  box.hidden = !exc;
}

function notice(text) {
  const box = document.getElementById("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

const fmtInt = (n) => Number(n || 0).toLocaleString("en-US");
const fmtTime = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "");
// An exact decimal string as the server sent it ("5.1E-9" included), written out without an exponent.
function plain(s) {
  const m = String(s).match(/^(-?)(\d+)(?:\.(\d+))?[eE]([-+]?\d+)$/);
  if (!m) return String(s);
  const [, sign, int, frac = "", exp] = m;
  const digits = int + frac, point = int.length + Number(exp);
  const out = point <= 0 ? `0.${"0".repeat(-point)}${digits}` : point >= digits.length ? digits + "0".repeat(point - digits.length) : `${digits.slice(0, point)}.${digits.slice(point)}`;
  return sign + out.replace(/^0+(?=\d)/, "");
}
const money = (s, cur) => `${plain(s)} ${cur || ""}`.trim();

function months(n = 12) {
  const out = [];
  const d = new Date();
  for (let i = 0; i < n; i++) {
    const m = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() - i, 1));
    out.push(`${m.getUTCFullYear()}-${String(m.getUTCMonth() + 1).padStart(2, "0")}`);
  }
  return out;
}

function card(label, value, testid) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value", "data-testid": testid }, value));
}

function table(headers, rows, attrs = {}) {
  const head = el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)));
  const body = rows.length
    ? rows.map((r) => el("tr", r.attrs || {}, r.cells.map((c, i) => el("td", { class: headers[i] && headers[i].num ? "num" : null }, c))))
    : [el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "Nothing yet."))];
  return el("table", attrs, el("thead", {}, head), el("tbody", {}, body));
}

// A bar chart: items [{label, parts: [numbers]}] stacked in COLORS order; titles show exact values.
function barChart(items, { names = ["value"], height = 180, horizontal = false, exact = null } = {}) {
  const wrap = el("div", { class: "chart" });
  if (names.length > 1) wrap.append(el("div", { class: "legend" }, names.map((n, i) => el("span", {}, svg("svg", { width: 10, height: 10 }, svg("rect", { width: 10, height: 10, rx: 2, fill: COLORS[i] })), ` ${n}`))));
  if (!items.length) {
    wrap.append(el("p", { class: "muted" }, "No usage in this period."));
    return wrap;
  }
  const total = (it) => it.parts.reduce((a, b) => a + Number(b), 0);
  const max = Math.max(...items.map(total)) || 1;
  if (horizontal) {
    const rowH = 22, labelW = 230, width = 760;
    const s = svg("svg", { width, height: items.length * rowH + 4, role: "img" });
    items.forEach((it, i) => {
      const y = i * rowH;
      s.append(svg("text", { x: 0, y: y + 15 }, it.label));
      let x = labelW;
      it.parts.forEach((v, j) => {
        const w = (Number(v) / max) * (width - labelW - 110);
        s.append(svg("rect", { x, y: y + 3, width: Math.max(w, 0.5), height: rowH - 8, fill: COLORS[j] }, svg("title", {}, `${it.label}: ${exact ? exact(it, j) : v}`)));
        x += w;
      });
      s.append(svg("text", { x: x + 6, y: y + 15 }, exact ? exact(it, -1) : total(it)));
    });
    wrap.append(s);
    return wrap;
  }
  const width = 760, padL = 8, padB = 22, barW = Math.min(40, (width - padL) / items.length - 4);
  const s = svg("svg", { width, height: height + padB, role: "img" });
  const every = Math.ceil(items.length / 12);
  items.forEach((it, i) => {
    const x = padL + i * ((width - padL) / items.length);
    let y = height;
    it.parts.forEach((v, j) => {
      const h = (Number(v) / max) * (height - 14);
      y -= h;
      s.append(svg("rect", { x, y, width: barW, height: Math.max(h, 0.5), fill: COLORS[j] }, svg("title", {}, `${it.label} ${names[j]}: ${exact ? exact(it, j) : v}`)));
    });
    if (i % every === 0) s.append(svg("text", { x, y: height + 15 }, it.label.slice(5)));
  });
  wrap.append(s);
  return wrap;
}

// ---- sign-in and navigation ----------------------------------------------------------------

const TENANT_PAGES = [["usage", "Usage"], ["keys", "Keys"], ["models", "Models"], ["batches", "Batches"]];
const OPERATOR_PAGES = [["tenants", "Tenants"], ["spend", "Spend"], ["traffic", "Traffic"], ["health", "Health"], ["audit", "Audit log"]];

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    state.account = await api("GET", "/v1/account");
  } catch (exc) {
    sessionStorage.removeItem(KEY);
    throw exc;
  }
  state.admin = state.account.key && state.account.key.role === "admin";
}

function signOut() {
  sessionStorage.removeItem(KEY);
  state.account = null;
  location.hash = "";
  render();
}

function drawNav(page) {
  const nav = document.getElementById("nav");
  nav.replaceChildren();
  const link = ([id, label]) => el("a", { href: `#/${id}`, class: id === page ? "active" : null, "data-page": id }, label);
  nav.append(...TENANT_PAGES.map(link));
  if (state.admin) nav.append(el("span", { class: "sep" }), ...OPERATOR_PAGES.map(link));
  nav.hidden = false;
  const who = state.account.key || {};
  document.getElementById("who-text").textContent = `${state.account.tenant} · ${who.name || who.key_id || ""}${state.admin ? " (operator)" : ""}`;
  document.getElementById("who").hidden = false;
}

async function render() {
  showError(null);
  const signedIn = !!sessionStorage.getItem(KEY);
  document.getElementById("sign-in").hidden = signedIn;
  const view = document.getElementById("view");
  if (!signedIn) {
    document.getElementById("nav").hidden = true;
    document.getElementById("who").hidden = true;
    view.replaceChildren();
    return;
  }
  try {
    const justSignedIn = !state.account;
    if (justSignedIn) await signIn(sessionStorage.getItem(KEY));
    const all = [...TENANT_PAGES, ...(state.admin ? OPERATOR_PAGES : [])].map((p) => p[0]);
    let page = (location.hash.match(/^#\/(\w+)/) || [])[1];
    if (!all.includes(page)) page = "usage";
    drawNav(page);
    view.replaceChildren(el("p", { class: "muted" }, "Loading…"));
    view.replaceChildren(await (page === "usage" && justSignedIn ? usagePage(null, false) : PAGES[page]()));
    view.setAttribute("data-page", page);
  } catch (exc) {
    if (exc.status === 401) {
      sessionStorage.removeItem(KEY);
      state.account = null;
      document.getElementById("sign-in").hidden = false;
      view.replaceChildren();
    }
    showError(exc);
  }
}

// ---- tenant pages ----------------------------------------------------------------------------

function monthPicker(current, onChange) {
  return el("label", {}, "Month ", el("select", { id: "period", onchange: (e) => onChange(e.target.value) }, months().map((m) => el("option", { value: m, selected: m === current }, m))));
}

// Every day of the month so far (of the whole month, for a past one): days without usage drawn as zero.
function monthDays(period, byDay) {
  if (!byDay.length) return [];
  const [y, m] = period.split("-").map(Number);
  const last = new Date(Date.UTC(y, m, 0)).getUTCDate();
  const today = new Date().toISOString().slice(0, 10);
  const have = new Map(byDay.map((d) => [d.day, d]));
  const out = [];
  for (let i = 1; i <= last; i++) {
    const day = `${period}-${String(i).padStart(2, "0")}`;
    if (day > today && !have.has(day)) break;
    out.push(have.get(day) || { day, requests: 0, prompt_tokens: 0, completion_tokens: 0, cost: "0" });
  }
  return out;
}

function usageSection(report, { byTenant = false } = {}) {
  const cur = report.currency;
  const t = report.total;
  const tokens = t.prompt_tokens + t.completion_tokens;
  const everyDay = monthDays(report.period, report.by_day);
  const days = everyDay.map((d) => ({ label: d.day, parts: [d.cost], d }));
  const tokenDays = everyDay.map((d) => ({ label: d.day, parts: [d.prompt_tokens, d.completion_tokens], d }));
  const models = report.by_model.map((m) => ({ label: m.model, parts: [m.cost], m }));
  return el(
    "div", {},
    el("div", { class: "cards" },
      card("Spend", money(t.cost, cur), "total-cost"),
      card("Requests", fmtInt(t.requests), "total-requests"),
      card("Tokens", fmtInt(tokens), "total-tokens"),
      card("Prompt / completion", `${fmtInt(t.prompt_tokens)} / ${fmtInt(t.completion_tokens)}`, "total-split"),
      card("Cached prompt tokens", fmtInt(t.cached_tokens || 0), "total-cached")),
    el("div", { class: "panel" }, el("h3", {}, `Spend by day (${cur})`), barChart(days, { exact: (it) => plain(it.d.cost) }), ),
    el("div", { class: "panel" }, el("h3", {}, "Tokens by day"), barChart(tokenDays, { names: ["prompt", "completion"] })),
    el("div", { class: "panel" }, el("h3", {}, `Spend by model and version (${cur})`), barChart(models, { horizontal: true, exact: (it) => plain(it.m.cost) }),
      table([{ label: "Model@version" }, { label: "Requests", num: true }, { label: "Prompt tokens", num: true }, { label: "of them cached", num: true }, { label: "Completion tokens", num: true }, { label: `Cost (${cur})`, num: true }],
        report.by_model.map((m) => ({ cells: [m.model, fmtInt(m.requests), fmtInt(m.prompt_tokens), fmtInt(m.cached_tokens || 0), fmtInt(m.completion_tokens), plain(m.cost)] })), { "data-testid": "by-model" })),
    el("div", { class: "panel" }, el("h3", {}, `Spend by service tier (${cur})`),
      table([{ label: "Tier" }, { label: "Requests", num: true }, { label: "Prompt tokens", num: true }, { label: "Completion tokens", num: true }, { label: `Cost (${cur})`, num: true }],
        (report.by_tier || []).map((x) => ({ cells: [x.service_tier, fmtInt(x.requests), fmtInt(x.prompt_tokens), fmtInt(x.completion_tokens), plain(x.cost)] })), { "data-testid": "by-tier" })),
    byTenant ? el("div", { class: "panel" }, el("h3", {}, `Spend by tenant (${cur})`), barChart(report.by_tenant.map((x) => ({ label: x.tenant, parts: [x.cost], x })), { horizontal: true, exact: (it) => plain(it.x.cost) })) : null,
  );
}

async function usagePage(period, fresh = true) {
  const a = fresh ? await api("GET", "/v1/account") : state.account;
  state.account = a;
  period = period || a.period;
  const report = await api("GET", `/v1/usage?period=${encodeURIComponent(period)}`);
  const view = el("div", {},
    el("h2", {}, `Usage of ${a.tenant}`),
    el("div", { class: "cards" },
      card("Plan", a.plan, "plan"),
      card(`Spent in ${a.period}`, money(a.spent, a.currency), "account-spent"),
      card("Monthly budget", a.monthly_budget === null ? "unlimited" : money(a.monthly_budget, a.currency), "budget"),
      card("Budget left", a.remaining === null ? "unlimited" : money(a.remaining, a.currency), "remaining"),
      card("Requests / min", a.rpm === null ? "unlimited" : fmtInt(a.rpm), "rpm"),
      card("Tokens / min", a.tpm === null ? "unlimited" : fmtInt(a.tpm), "tpm")),
    el("div", { class: "panel" }, monthPicker(period, async (p) => document.getElementById("view").replaceChildren(await usagePage(p)))),
    usageSection(report));
  return view;
}

// The catalogue: every model this key may call (the tenant's own fine-tunes included), what each does, its price.
const CAPABILITIES = [["chat", "chat"], ["completions", "completions"], ["embeddings", "embeddings"], ["tools", "tool calls"], ["structured_outputs", "JSON schema"], ["logprobs", "logprobs"], ["fine_tuning", "fine-tuning"]];

async function modelsPage() {
  const models = (await api("GET", "/v1/models")).data;
  const does = (m) => CAPABILITIES.filter(([k]) => m.capabilities && m.capabilities[k]).map(([, label]) => label).join(", ");
  const price = (m, k) => (m.pricing ? plain(m.pricing[k]) : "—");
  const cur = (models.find((m) => m.pricing) || { pricing: { currency: "" } }).pricing.currency;
  return el("div", { class: "panel" },
    el("h3", {}, `Models${cur ? ` (prices per 1M tokens, ${cur})` : ""}`),
    table([{ label: "Model" }, { label: "Based on" }, { label: "What it does" }, { label: "Context", num: true }, { label: "Prompt", num: true }, { label: "Cached prompt", num: true }, { label: "Completion", num: true }],
      models.map((m) => ({ attrs: { "data-model": m.id }, cells: [m.id, m.parent || "", does(m), fmtInt(m.context_window || 0), price(m, "prompt_per_1m"), price(m, "cached_prompt_per_1m"), price(m, "completion_per_1m")] })),
      { "data-testid": "models" }));
}

async function batchesPage() {
  const batches = (await api("GET", "/v1/batches?limit=100")).data;
  const counts = (b) => `${fmtInt(b.request_counts.completed)} done, ${fmtInt(b.request_counts.failed)} failed of ${fmtInt(b.request_counts.total)}`;
  return el("div", { class: "panel" },
    el("h3", {}, "Batches (the Batch API: run after live traffic, at the batch price)"),
    batches.length
      ? table([{ label: "Batch" }, { label: "Status" }, { label: "Requests" }, { label: "Endpoint" }, { label: "Created" }, { label: "Output file" }],
          batches.map((b) => ({ attrs: { "data-batch": b.id }, cells: [b.id, b.status, counts(b), b.endpoint, fmtTime(b.created_at), b.output_file_id || ""] })),
          { "data-testid": "batches" })
      : el("p", { class: "muted", "data-testid": "batches" }, "No batches yet: upload a file with purpose=batch and POST /v1/batches."));
}

async function keysPage(created) {
  const keys = (await api("GET", "/v1/keys")).data;
  const now = Date.now() / 1000;
  const status = (k) => (k.revoked_at ? "revoked" : k.expires_at && k.expires_at < now ? "expired" : "active");
  const revoke = async (k, button) => {
    if (!confirm(`Revoke ${k.name || k.key_id}? Requests with it are refused at once.`)) return;
    button.disabled = true;
    try {
      await api("POST", `/v1/keys/${encodeURIComponent(k.key_id)}/revoke`);
      document.getElementById("view").replaceChildren(await keysPage());
      notice(`Revoked ${k.key_id}.`);
    } catch (exc) { showError(exc); button.disabled = false; }
  };
  const create = async (e) => {
    e.preventDefault();
    const f = e.target;
    const days = f.elements.days.value;
    const body = { name: f.elements.name.value };
    if (days) body.expires_in_s = Number(days) * 86400;
    // The key's own policy, inside the tenant's: models it may call, its own budget and rates, free-form metadata.
    const models = f.elements.models.value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.models = models;
    if (f.elements.budget.value) body.monthly_budget = f.elements.budget.value;
    if (f.elements.rpm.value) body.rpm = Number(f.elements.rpm.value);
    if (f.elements.tpm.value) body.tpm = Number(f.elements.tpm.value);
    const meta = f.elements.metadata.value.split(",").map((kv) => kv.split("=")).filter((kv) => kv[0].trim());
    if (meta.length) body.metadata = Object.fromEntries(meta.map(([k, ...v]) => [k.trim(), v.join("=").trim()]));
    f.querySelector("button").disabled = true;
    try {
      const k = await api("POST", "/v1/keys", body);
      showError(null);
      document.getElementById("view").replaceChildren(await keysPage(k));
    } catch (exc) { showError(exc); f.querySelector("button").disabled = false; }
  };
  return el("div", {},
    el("h2", {}, `API keys of ${state.account.tenant}`),
    created ? el("div", { class: "panel", "data-testid": "new-key" }, el("p", {}, `New key ${created.name ? `“${created.name}” ` : ""}(${created.key_id}). It is shown once: copy it now.`), el("div", { class: "secret", "data-testid": "new-key-secret" }, created.key)) : null,
    el("div", { class: "panel" }, el("h3", {}, "Create a key"),
      el("form", { class: "inline", id: "create-key", onsubmit: create },
        el("input", { name: "name", placeholder: "name", maxlength: 128, required: true, "aria-label": "Key name" }),
        el("input", { name: "days", type: "number", min: 1, max: 3650, placeholder: "expires in (days)", "aria-label": "Expires in days" }),
        el("input", { name: "models", placeholder: "models (comma-separated; all if empty)", "aria-label": "Models allowed", size: 30 }),
        el("input", { name: "budget", type: "number", min: 0, step: "any", placeholder: `own monthly budget (${state.account.currency || ""})`, "aria-label": "Monthly budget" }),
        el("input", { name: "rpm", type: "number", min: 1, placeholder: "own RPM", "aria-label": "Requests per minute" }),
        el("input", { name: "tpm", type: "number", min: 1, placeholder: "own TPM", "aria-label": "Tokens per minute" }),
        el("input", { name: "metadata", placeholder: "metadata: team=search, env=prod", "aria-label": "Metadata", size: 28 }),
        el("button", { type: "submit" }, "Create key")),
      el("p", { class: "muted" }, "Limits apply inside the tenant's own; a key with a policy of its own cannot manage keys.")),
    el("div", { class: "panel" },
      table(["Key id", "Name", "Role", "Created", "Expires", "Status", "Models", "Limits", ""],
        keys.map((k) => ({
          attrs: { "data-key-id": k.key_id },
          cells: [k.key_id, k.name, k.role, fmtTime(k.created_at), k.expires_at ? fmtTime(k.expires_at) : "never", status(k), k.models ? k.models.join(", ") : "all",
            [k.monthly_budget && `budget ${k.monthly_budget}`, k.rpm && `${k.rpm} rpm`, k.tpm && `${k.tpm} tpm`].filter(Boolean).join(", ") || "tenant's",
            status(k) === "active" && k.key_id !== (state.account.key || {}).key_id ? el("button", { class: "danger", type: "button", "data-action": "revoke", onclick: (e) => revoke(k, e.target) }, "Revoke") : ""],
        })), { "data-testid": "keys" })));
}

// ---- operator pages --------------------------------------------------------------------------

async function tenantsPage() {
  const t = await api("GET", "/admin/tenants");
  const top = t.data.filter((x) => Number(x.spent) > 0).slice(0, 10);
  return el("div", {},
    el("h2", {}, `Tenants (${t.period})`),
    el("div", { class: "panel" }, el("h3", {}, `Top tenants this month (${t.currency})`), barChart(top.map((x) => ({ label: x.tenant, parts: [x.spent], x })), { horizontal: true, exact: (it) => plain(it.x.spent) })),
    el("div", { class: "panel" },
      table([{ label: "Tenant" }, { label: "Plan" }, { label: "Budget", num: true }, { label: "Spent", num: true }, { label: "Left", num: true }, { label: "Requests", num: true }, { label: "Tokens", num: true }, { label: "RPM", num: true }, { label: "TPM", num: true }],
        t.data.map((x) => ({ attrs: { "data-tenant": x.tenant }, cells: [x.tenant, x.plan, x.monthly_budget === null ? "—" : plain(x.monthly_budget), plain(x.spent), x.remaining === null ? "—" : plain(x.remaining), fmtInt(x.requests), fmtInt(x.prompt_tokens + x.completion_tokens), x.rpm ?? "—", x.tpm ?? "—"] })),
        { "data-testid": "tenants" })));
}

async function spendPage(period) {
  period = period || state.account.period;
  const report = await api("GET", `/admin/usage?period=${encodeURIComponent(period)}`);
  return el("div", {}, el("h2", {}, "Spend across tenants"),
    el("div", { class: "panel" }, monthPicker(period, async (p) => document.getElementById("view").replaceChildren(await spendPage(p)))),
    usageSection(report, { byTenant: true }));
}

async function trafficPage() {
  const t = await api("GET", "/admin/traffic");
  const p = t.plan;
  const act = async (body, button) => {
    button.disabled = true;
    notice(`${body.action}… (deploying a version that is not running yet takes a while)`);
    try {
      const r = await api("POST", "/admin/traffic", body);
      document.getElementById("view").replaceChildren(await trafficPage());
      notice(`${body.action}: ${Object.entries(r.plan.weights).map(([v, w]) => `${v} ${w}%`).join(", ")} (revision ${r.plan.revision}).`);
    } catch (exc) { notice(null); showError(exc); button.disabled = false; }
  };
  if (!p) return el("div", {}, el("h2", {}, "Traffic"), el("p", {}, `${t.model} is not deployed (no traffic plan).`));
  const versions = t.versions.map((v) => v.version).filter((v) => v !== p.stable);
  const canaryForm = el("form", { class: "inline", id: "canary-form", onsubmit: (e) => { e.preventDefault(); act({ action: "canary", version: e.target.elements.version.value, weight: Number(e.target.elements.weight.value) }, e.target.querySelector("button")); } },
    el("label", {}, "Version ", el("select", { name: "version", "aria-label": "Canary version" }, versions.map((v) => el("option", { value: v, selected: v === p.canary }, v)))),
    el("label", {}, "Weight % ", el("input", { name: "weight", type: "number", min: 1, max: 100, value: p.canary_weight || 10, required: true, "aria-label": "Canary weight" })),
    el("button", { type: "submit", disabled: !versions.length }, p.canary ? "Set canary weight" : "Start canary"));
  return el("div", {},
    el("h2", {}, `Traffic plan of ${t.model}`),
    el("div", { class: "cards" },
      card("Stable", p.stable, "stable"),
      card("Canary", p.canary ? `${p.canary} at ${p.canary_weight}%` : "none", "canary"),
      card("Rollback target", p.previous || "none", "previous"),
      card("Revision", `${p.revision} (${p.action})`, "revision"),
      card("Changed by", `${p.updated_by || "—"} ${fmtTime(p.updated_at)}`, "updated-by")),
    el("div", { class: "panel" }, el("h3", {}, "Share of requests"), barChart(Object.entries(p.weights).map(([v, w]) => ({ label: v, parts: [w] })), { horizontal: true, exact: (it) => `${it.parts[0]}%` })),
    el("div", { class: "panel" }, el("h3", {}, "Canary"), canaryForm,
      el("p", { class: "inline" },
        el("button", { type: "button", class: "secondary", id: "promote", disabled: !p.canary, onclick: (e) => act({ action: "promote" }, e.target) }, "Promote canary"), " ",
        el("button", { type: "button", class: "danger", id: "rollback", disabled: !p.canary && !p.previous, onclick: (e) => act({ action: "rollback" }, e.target) }, "Roll back"))),
    el("div", { class: "panel" }, el("h3", {}, "Versions in the store"),
      table(["Version", "Created", "Base", "Held-out loss", "Traffic"], t.versions.map((v) => ({ cells: [v.version, v.created_at || "", v.base ? `${v.base.name} ${v.base.version}` : "", v.eval_loss ?? "", p.weights[v.version] !== undefined ? `${p.weights[v.version]}%` : p.deployed.includes(v.version) ? "deployed" : ""] })))));
}

async function healthPage() {
  const h = await api("GET", "/admin/health");
  const rows = [];
  for (const [app, a] of Object.entries(h.applications)) {
    for (const [dep, d] of Object.entries(a.deployments)) {
      rows.push({ cells: [app, dep, el("span", { class: `status-${d.status}` }, d.status), d.status === "IDLE" ? "none: scaled to zero, its next request starts one" : Object.entries(d.replicas).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", "), d.message || a.message || ""] });
    }
  }
  return el("div", {}, el("h2", {}, "Deployment health"),
    el("div", { class: "cards" }, Object.entries(h.applications).map(([name, a]) => card(name, el("span", { class: `status-${a.status}` }, a.status), `app-${name}`))),
    el("div", { class: "panel" }, table(["Application", "Deployment", "Status", "Replicas", "Message"], rows, { "data-testid": "health" })),
    el("div", { class: "panel" }, el("h3", {}, "HTTP proxies"), table(["Node", "Status"], Object.entries(h.proxies).map(([n, s]) => ({ cells: [n, el("span", { class: `status-${s}` }, s)] })))));
}

async function auditPage(filters = {}) {
  const q = new URLSearchParams({ limit: filters.limit || 100 });
  for (const k of ["action", "actor", "target"]) if (filters[k]) q.set(k, filters[k]);
  const log = await api("GET", `/admin/audit?${q}`);
  const apply = async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    try {
      document.getElementById("view").replaceChildren(await auditPage({ action: f.action.value, actor: f.actor.value, target: f.target.value, limit: f.limit.value }));
    } catch (exc) { showError(exc); }
  };
  return el("div", {}, el("h2", {}, "Audit log"),
    el("div", { class: "panel" },
      el("form", { class: "inline", id: "audit-filters", onsubmit: apply },
        el("select", { name: "action", "aria-label": "Action" }, [["", "every action"], ["model.", "model versions"], ["key.", "keys"], ["tenant.", "tenants"], ["alert.", "alerts"], ["config", "config"]].map(([v, l]) => el("option", { value: v, selected: v === (filters.action || "") }, l))),
        el("input", { name: "actor", placeholder: "who", value: filters.actor || "", "aria-label": "Who" }),
        el("input", { name: "target", placeholder: "target", value: filters.target || "", "aria-label": "Target" }),
        el("input", { name: "limit", type: "number", min: 1, max: 10000, value: filters.limit || 100, "aria-label": "Limit" }),
        el("button", { type: "submit" }, "Filter"))),
    el("div", { class: "panel" }, table(["When", "Who", "Action", "Target", "Detail"], log.data.map((r) => ({ cells: [fmtTime(r.ts), r.who, r.action, r.target, r.detail] })), { "data-testid": "audit" })));
}

const PAGES = { usage: () => usagePage(), keys: () => keysPage(), models: () => modelsPage(), batches: () => batchesPage(), tenants: tenantsPage, spend: () => spendPage(), traffic: trafficPage, health: healthPage, audit: () => auditPage() };

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = document.getElementById("key-input");
    const key = input.value.trim();
    input.value = "";
    try {
      await signIn(key);
      notice(null);
      await render();
    } catch (exc) {
      showError(exc.status === 401 ? new ApiError(401, { error: { message: `This key was not accepted: ${exc.message}`, code: exc.code } }) : exc);
    }
  });
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => { notice(null); render(); });
  render();
});
