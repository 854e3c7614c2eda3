// nearblock console: four live pages over /api/v1 (no framework, no build
// step). Data is only ever put in the page as text (textContent, SVG
// attributes), never as markup. The API token is kept in sessionStorage and
// sent as a bearer header; the live feeds are server-sent events read with
// fetch, since EventSource cannot send a header.
'use strict';

const TOKEN_KEY = 'nearblock.token';
const state = { inventory: null, network: null, jobs: null, page: null };
let feedAbort = null;

// ---- helpers ---------------------------------------------------------------

function h(tag, attrs, ...children) {
  const svg = ['svg', 'g', 'line', 'circle', 'rect', 'text', 'title'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.setAttribute('class', v);
    else if (svg || k.startsWith('data-') || k === 'id' || k === 'href' || k === 'type' || k === 'for' || k === 'colspan') el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + ' ' + units[i];
}
const pct = (x) => (x === null || x === undefined ? '–' : (100 * x).toFixed(0) + '%');
const num = (x, d = 1) => (x === null || x === undefined ? '–' : Number(x).toFixed(d));

function table(headers, rows, attrs) {
  return h('table', attrs || {},
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows));
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: 'Bearer ' + token() }, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, { headers }));
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!r.ok) {
    if (r.status === 401) askToken('the manager refused the token');
    throw new ApiError(r.status, body && body.code, (body && body.message) || text || r.statusText);
  }
  return body;
}

// Server-sent events over fetch: `onEvent(name, data)` per event, until the
// stream ends or `signal` aborts it.
async function stream(path, onEvent, signal) {
  const r = await fetch(path, { headers: { Authorization: 'Bearer ' + token() }, signal });
  if (!r.ok) {
    if (r.status === 401) askToken('the manager refused the token');
    throw new ApiError(r.status, null, r.statusText);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length) onEvent(name, JSON.parse(data.join('\n')));
    }
  }
}

// ---- token and feed --------------------------------------------------------

function askToken(why) {
  if (feedAbort) feedAbort.abort();
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('login').hidden = false;
  document.getElementById('page').hidden = true;
  document.getElementById('signout').hidden = true;
  document.getElementById('login-error').textContent = why || '';
}

async function useToken(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    await api('/api/v1/jobs');
  } catch (e) {
    if (e.status !== 401) document.getElementById('login-error').textContent = e.message;
    return;
  }
  document.getElementById('login').hidden = true;
  document.getElementById('page').hidden = false;
  document.getElementById('signout').hidden = false;
  startFeed();
  route();
}

async function startFeed() {
  if (feedAbort) feedAbort.abort();
  const abort = new AbortController();
  feedAbort = abort;
  const badge = document.getElementById('feed');
  for (let attempt = 0; !abort.signal.aborted; attempt++) {
    try {
      badge.textContent = 'live';
      badge.className = 'feed live';
      await stream('/api/v1/events', (name, data) => {
        state[name] = data;
        if (renderers[state.page] && renderers[state.page].on && renderers[state.page].on.includes(name)) {
          renderers[state.page].update(name);
        }
      }, abort.signal);
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    badge.textContent = 'reconnecting…';
    badge.className = 'feed down';
    await new Promise((r) => setTimeout(r, Math.min(5000, 500 * (attempt + 1))));
  }
}

// ---- pages -----------------------------------------------------------------

const page = () => document.getElementById('page');
const rackOf = (host) => {
  const hs = state.inventory && state.inventory.hosts.find((x) => x.host === host);
  return hs ? hs.rack : null;
};

const inventoryPage = {
  on: ['inventory'],
  show() { this.update(); },
  update() {
    const inv = state.inventory;
    const root = page();
    root.replaceChildren(h('h2', {}, 'Inventory'));
    if (!inv) { root.append(h('p', { class: 'muted' }, 'waiting for the inventory…')); return; }
    root.append(
      h('h3', {}, 'Library images'),
      table(['image', 'host', 'size', 'blocks', 'zero blocks', ''],
        inv.images.map((i) => h('tr', { 'data-image': i.image },
          h('td', {}, i.image), h('td', {}, i.host), h('td', { class: 'n' }, bytes(i.size)),
          h('td', { class: 'n' }, i.blocks), h('td', { class: 'n' }, pct(i.blocks ? i.zero_blocks / i.blocks : 0)),
          h('td', {}, h('a', { href: '#/place?image=' + encodeURIComponent(i.image) }, 'place…')))),
        { id: 'images' }),
      h('h3', {}, 'VMs'),
      table(['VM', 'state', 'host', 'rack', 'image', 'size', 'indexed', 'held elsewhere', ''],
        inv.vms.map((v) => h('tr', { 'data-vm': v.name },
          h('td', {}, v.name), h('td', {}, h('span', { class: 'badge ' + v.state }, v.state)),
          h('td', {}, v.host), h('td', {}, v.rack || '–'), h('td', {}, v.image || '–'),
          h('td', { class: 'n' }, bytes(v.size)), h('td', {}, v.indexed ? 'yes' : 'no'),
          h('td', { class: 'n' }, pct(v.held_elsewhere)),
          h('td', {}, v.state === 'running'
            ? h('a', { href: '#/place?image=' + encodeURIComponent('vm/' + v.name) + '&name=' + encodeURIComponent(v.name) }, 'migrate…')
            : ''))),
        { id: 'vms' }),
      h('h3', {}, 'Hosts'),
      table(['host', 'rack', 'reporting', 'CPU', 'memory', 'disk', 'disk free', 'VMs'],
        inv.hosts.map((x) => h('tr', { 'data-host': x.host },
          h('td', {}, x.host), h('td', {}, x.rack || '–'), h('td', {}, x.reporting ? 'yes' : 'stale'),
          h('td', { class: 'n' }, pct(x.cpu)), h('td', { class: 'n' }, pct(x.mem)), h('td', { class: 'n' }, pct(x.disk)),
          h('td', { class: 'n' }, bytes(x.resources && x.resources.disk_free_bytes)), h('td', { class: 'n' }, x.vms))),
        { id: 'hosts' }));
  },
};

const CLASSES = ['self', 'cache', 'rack', 'other_rack', 'library'];

const placePage = {
  on: ['inventory'],
  form: null,
  lastFetch: 0,
  params: null,
  show(params) {
    this.params = params;
    const inv = state.inventory;
    const images = inv ? [...new Set(inv.images.map((i) => i.image))] : [];
    const running = inv ? inv.vms.filter((v) => v.state === 'running').map((v) => 'vm/' + v.name) : [];
    const chosen = params.get('image') || images[0] || '';
    const f = {
      image: h('select', { id: 'image', onchange: () => { this.defaultName(); this.refresh(); } },
        [...images, ...running, ...(chosen && ![...images, ...running].includes(chosen) ? [chosen] : [])]
          .map((i) => h('option', { value: i, selected: i === chosen }, i))),
      name: h('input', { id: 'vm-name', type: 'text', value: params.get('name') || '' }),
      kind: h('select', { id: 'policy-kind', onchange: () => this.refresh() },
        ['best', 'top', 'within'].map((k) => h('option', { value: k }, k))),
      count: h('input', { id: 'policy-count', type: 'number', value: 3, min: 1, onchange: () => this.refresh() }),
      percent: h('input', { id: 'policy-percent', type: 'number', value: 20, min: 0, onchange: () => this.refresh() }),
      metric: h('select', { id: 'policy-metric', onchange: () => this.refresh() },
        ['cpu', 'mem', 'disk'].map((m) => h('option', { value: m }, m))),
      result: h('div', { id: 'ranking' }),
      confirm: h('div', { id: 'confirm', class: 'panel', hidden: true }),
    };
    this.form = f;
    if (!f.name.value) this.defaultName();
    page().replaceChildren(
      h('h2', {}, 'Place'),
      h('div', { class: 'controls' },
        h('label', {}, 'image or running VM ', f.image),
        h('label', {}, 'VM name ', f.name),
        h('label', {}, 'policy ', f.kind),
        h('label', { class: 'for-top' }, 'X ', f.count),
        h('label', { class: 'for-within' }, 'P% ', f.percent),
        h('label', { class: 'for-metric' }, 'by ', f.metric)),
      f.confirm, f.result);
    this.refresh();
  },
  defaultName() {
    const img = this.form.image.value;
    this.form.name.value = img.startsWith('vm/') ? img.slice(3)
      : 'vm-' + img.replace(/[^A-Za-z0-9-]/g, '-').replace(/-+/g, '-').slice(-24).replace(/^-/, '');
  },
  policy() {
    const f = this.form;
    document.querySelectorAll('.for-top').forEach((e) => { e.hidden = f.kind.value !== 'top'; });
    document.querySelectorAll('.for-within').forEach((e) => { e.hidden = f.kind.value !== 'within'; });
    document.querySelectorAll('.for-metric').forEach((e) => { e.hidden = f.kind.value === 'best'; });
    if (f.kind.value === 'top') return 'top:' + f.count.value + ':' + f.metric.value;
    if (f.kind.value === 'within') return 'within:' + f.percent.value + '%:' + f.metric.value;
    return 'best';
  },
  update() {
    // The first inventory: the image list can be filled now.
    if (this.form && this.form.image.options.length === 0) { this.show(this.params); return; }
    // Hosts' load changed: re-rank, at most every 5 s.
    if (this.form && Date.now() - this.lastFetch > 5000) this.refresh();
  },
  async refresh() {
    const f = this.form;
    const image = f.image.value;
    const policy = this.policy();
    this.lastFetch = Date.now();
    if (!image) { f.result.replaceChildren(h('p', { class: 'muted' }, 'no image in the index yet')); return; }
    let t;
    try {
      t = await api('/api/v1/vms/' + encodeURIComponent(image) + '/targets?policy=' + encodeURIComponent(policy));
    } catch (e) {
      f.result.replaceChildren(h('p', { class: 'error' }, e.message));
      return;
    }
    if (this.form !== f || f.image.value !== image || this.policy() !== policy) return; // stale answer
    const p = t.placement;
    const by = Object.fromEntries(p.candidates.map((c) => [c.host, c]));
    const order = [...p.ranked, ...p.candidates.filter((c) => !p.ranked.includes(c.host)).map((c) => c.host)];
    const rows = order.map((host, i) => {
      const c = by[host];
      const cls = c.bytes_by_class || {};
      return h('tr', { 'data-host': host, class: host === p.chosen ? 'chosen' : (c.error ? 'unbuildable' : '') },
        h('td', { class: 'n' }, c.error ? '–' : String(i + 1)), h('td', {}, host), h('td', {}, rackOf(host) || '–'),
        h('td', { class: 'n cost' }, c.total_cost === null || c.total_cost === undefined ? '–' : c.total_cost.toFixed(2)),
        CLASSES.map((k) => h('td', { class: 'n' }, cls[k] ? bytes(cls[k]) : (Object.keys(cls).length ? '0' : '–'))),
        h('td', { class: 'n' }, pct(c.cpu)), h('td', { class: 'n' }, pct(c.mem)),
        h('td', {}, c.error ? h('span', { class: 'error' }, c.error)
          : h('button', { type: 'button', class: 'place', onclick: () => this.ask(image, host, policy) }, 'place here')));
    });
    f.result.replaceChildren(
      h('p', {}, 'policy ', h('code', {}, p.policy), ' picks ', h('strong', { id: 'chosen' }, p.chosen || 'nothing'),
        t.mode === 'agent' ? '' : ' (mode ' + t.mode + ')'),
      table(['#', 'host', 'rack', 'cost', 'local', 'cache', 'rack', 'other racks', 'library', 'CPU', 'memory', ''], rows,
        { id: 'targets' }),
      t.notes.length ? h('ul', { class: 'notes' }, t.notes.map((n) => h('li', {}, n))) : '');
  },
  ask(image, host, policy) {
    const f = this.form;
    const name = f.name.value.trim();
    const migrate = image.startsWith('vm/');
    f.confirm.hidden = false;
    f.confirm.replaceChildren(
      h('p', {}, migrate ? 'Migrate ' : 'Build VM ', h('strong', {}, name), migrate ? '' : ' from ' + image,
        ' to ', h('strong', {}, host), ' (policy ' + policy + ')?'),
      h('button', { type: 'button', id: 'confirm-place', onclick: () => this.place(image, name, host, policy) }, migrate ? 'migrate' : 'place'),
      ' ',
      h('button', { type: 'button', onclick: () => { f.confirm.hidden = true; } }, 'cancel'),
      h('p', { class: 'error', id: 'place-error' }));
  },
  async place(image, name, host, policy) {
    try {
      const job = await api('/api/v1/vms/' + encodeURIComponent(image) + '/place', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ name, policy, target: host }),
      });
      location.hash = '#/job/' + job.id;
    } catch (e) {
      document.getElementById('place-error').textContent = e.status === 403
        ? 'this token may only watch: placing needs an admin token (' + e.message + ')'
        : e.message;
    }
  },
};

const jobsPage = {
  on: ['jobs'],
  show() { this.update(); },
  update() {
    const jobs = state.jobs || [];
    page().replaceChildren(h('h2', {}, 'Jobs'),
      jobs.length === 0 ? h('p', { class: 'muted' }, 'no job yet') :
        table(['job', 'kind', 'VM', 'image', 'target', 'state', 'progress'],
          jobs.map((j) => h('tr', { 'data-job': j.id },
            h('td', {}, h('a', { href: '#/job/' + j.id }, '#' + j.id)), h('td', {}, j.kind), h('td', {}, j.name),
            h('td', {}, j.image), h('td', {}, j.target || '–'), h('td', {}, h('span', { class: 'badge ' + j.state }, j.state)),
            h('td', {}, j.blocks_total ? h('progress', { max: j.blocks_total, value: j.blocks_done }) : ''))),
          { id: 'jobs' }));
  },
};

const jobPage = {
  on: ['network'],
  abort: null,
  samples: [],
  job: null,
  show(params, id) {
    if (this.abort) this.abort.abort();
    this.abort = new AbortController();
    this.samples = [];
    this.job = null;
    page().replaceChildren(h('h2', {}, 'Job #' + id), h('p', { class: 'muted' }, 'loading…'));
    const signal = this.abort.signal;
    stream('/api/v1/jobs/' + encodeURIComponent(id) + '/events', (_, job) => {
      this.samples.push({ t: Date.now(), done: job.progress.blocks_done, links: Object.assign({}, job.progress.by_link) });
      if (this.samples.length > 30) this.samples.shift();
      this.job = job;
      this.render();
    }, signal).catch((e) => {
      if (!signal.aborted) page().replaceChildren(h('h2', {}, 'Job #' + id), h('p', { class: 'error' }, e.message));
    });
  },
  hide() { if (this.abort) this.abort.abort(); },
  update() { if (this.job) this.render(); },
  // Rates over the samples of the last ~5 s.
  rates() {
    const s = this.samples;
    if (s.length < 2) return { blocks: null, links: {} };
    const last = s[s.length - 1];
    const first = s.find((x) => last.t - x.t <= 5000) || s[0];
    const dt = (last.t - first.t) / 1000;
    if (dt <= 0) return { blocks: null, links: {} };
    const links = {};
    for (const [l, b] of Object.entries(last.links)) links[l] = Math.max(0, b - (first.links[l] || 0)) * 8 / dt / 1e6;
    return { blocks: (last.done - first.done) / dt, links };
  },
  render() {
    const j = this.job;
    const p = j.progress;
    // A finished job moves nothing: no rate.
    const r = j.state === 'done' || j.state === 'failed' || j.state === 'cancelled' ? { blocks: null, links: {} } : this.rates();
    const budgets = {};
    for (const l of (state.network && state.network.links) || []) budgets[l.name] = l.budget_mbps;
    let eta = '–';
    if (j.state === 'done') eta = 'done';
    else if (r.blocks > 0 && p.blocks_total) eta = Math.ceil((p.blocks_total - p.blocks_done) / r.blocks) + ' s';
    const m = j.migration;
    page().replaceChildren(
      h('h2', {}, 'Job #' + j.id + ' ', h('span', { id: 'job-state', class: 'badge ' + j.state }, j.state)),
      h('p', {}, j.kind === 'migrate' ? 'Migration of ' : j.kind === 'prestage' ? 'Pre-staging of ' : 'VM ',
        h('strong', {}, j.spec.name), ' from ', h('code', {}, j.spec.image),
        j.plan ? [' to ', h('strong', { id: 'job-target' }, j.plan.target)] : '',
        ' (policy ' + j.spec.policy + ', mode ' + j.spec.mode + ')'),
      h('div', { class: 'progress' },
        h('progress', { id: 'job-progress', max: p.blocks_total || 1, value: p.blocks_done }),
        h('span', {}, ' ' + p.blocks_done + ' / ' + p.blocks_total + ' blocks, ' + bytes(p.bytes_written) + ' written; ETA ',
          h('span', { id: 'job-eta' }, eta))),
      j.error ? h('p', { class: 'error' }, j.error) : '',
      h('div', { class: 'cols' },
        h('div', {}, h('h3', {}, 'Bytes by source'),
          table(['source', 'class', 'hops', 'blocks', 'bytes', 'on the wire'],
            Object.entries(p.by_source).map(([n, x]) => h('tr', {}, h('td', {}, n), h('td', {}, x.class),
              h('td', { class: 'n' }, x.hops ?? '–'), h('td', { class: 'n' }, x.blocks), h('td', { class: 'n' }, bytes(x.bytes)),
              h('td', { class: 'n' }, bytes(x.wire_bytes)))), { id: 'by-source' })),
        h('div', {}, h('h3', {}, 'By class and hop'),
          table(['class', 'bytes'], Object.entries(p.by_class).map(([k, b]) => h('tr', {}, h('td', {}, k), h('td', { class: 'n' }, bytes(b))))),
          table(['hops', 'bytes'], Object.entries(p.by_hops).map(([k, b]) => h('tr', {}, h('td', {}, k), h('td', { class: 'n' }, bytes(b)))))),
        h('div', {}, h('h3', {}, 'Links'),
          table(['link', 'bytes', 'Mbit/s now', 'budget'],
            Object.entries(p.by_link).map(([l, b]) => h('tr', {}, h('td', {}, l), h('td', { class: 'n' }, bytes(b)),
              h('td', { class: 'n' }, num(r.links[l])), h('td', { class: 'n' }, budgets[l] ? num(budgets[l], 0) : '–'))),
            { id: 'by-link' }))),
      m ? [h('h3', {}, 'Pre-copy rounds from ' + m.source + ' (' + (m.tracking || '–') + ')'),
        table(['round', 'dirty', 'rehashed', 'blocks changed', 'from source host', 'moved', 'ms', ''],
          m.rounds.map((x) => h('tr', {}, h('td', { class: 'n' }, x.round), h('td', { class: 'n' }, bytes(x.bytes_dirty)),
            h('td', { class: 'n' }, bytes(x.bytes_hashed)), h('td', { class: 'n' }, x.blocks_changed),
            h('td', { class: 'n' }, bytes(x.bytes_by_source[m.source] || 0)),
            h('td', { class: 'n' }, bytes(Object.values(x.bytes_by_source).reduce((a, b) => a + b, 0))),
            h('td', { class: 'n' }, x.ms), h('td', {}, x.paused ? 'paused' : ''))), { id: 'rounds' }),
        h('p', {}, 'pause to resume: ', m.pause_to_resume_ms === null || m.pause_to_resume_ms === undefined ? '–' : m.pause_to_resume_ms + ' ms',
          '; verified: ' + (m.verified ? 'yes' : 'no') + '; source retired: ' + (m.source_retired ? 'yes' : 'no'))] : '',
      h('h3', {}, 'Events'),
      h('ol', { id: 'events', class: 'events' }, j.events.map((e) =>
        h('li', {}, h('time', {}, new Date(e.at_ms).toLocaleTimeString()), ' ', e.message))));
  },
};

function colour(u) {
  if (u === null || u === undefined) return '#9aa0a6';
  if (u < 0.5) return '#2a9d8f';
  if (u < 0.8) return '#e9a23b';
  return '#d1495b';
}

// Layers by distance from the library; each layer spread evenly.
function layout(net) {
  const adj = {};
  for (const n of net.nodes) adj[n.name] = [];
  for (const l of net.links) { adj[l.a].push(l.b); adj[l.b].push(l.a); }
  const depth = {};
  const queue = net.nodes.filter((n) => n.role === 'library').map((n) => n.name);
  if (!queue.length && net.nodes.length) queue.push(net.nodes[0].name);
  for (const q of queue) depth[q] = 0;
  for (let i = 0; i < queue.length; i++) {
    for (const m of adj[queue[i]]) if (!(m in depth)) { depth[m] = depth[queue[i]] + 1; queue.push(m); }
  }
  const layers = [];
  for (const n of net.nodes) { const d = depth[n.name] ?? 0; (layers[d] = layers[d] || []).push(n.name); }
  const width = Math.max(640, 90 * Math.max(...layers.map((l) => l.length)));
  const pos = {};
  layers.forEach((names, d) => names.forEach((name, i) => {
    pos[name] = { x: (width * (i + 0.5)) / names.length, y: 40 + d * 110 };
  }));
  return { pos, width, height: 80 + (layers.length - 1) * 110 };
}

const networkPage = {
  on: ['network'],
  show() { this.update(); },
  update() {
    const net = state.network;
    const root = page();
    root.replaceChildren(h('h2', {}, 'Network'));
    if (!net) { root.append(h('p', { class: 'muted' }, 'waiting for the network view…')); return; }
    const { pos, width, height } = layout(net);
    const role = Object.fromEntries(net.nodes.map((n) => [n.name, n.role]));
    const svg = h('svg', { id: 'topology', viewBox: '0 0 ' + width + ' ' + height, width: '100%', role: 'img' },
      net.links.map((l) => {
        const a = pos[l.a], b = pos[l.b];
        const u = l.utilisation;
        return h('g', { class: 'link', 'data-link': l.name },
          h('line', { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: colour(u), 'stroke-width': 2 + 10 * Math.min(1, u || 0) }),
          h('text', { x: (a.x + b.x) / 2 + 6, y: (a.y + b.y) / 2, class: 'link-label' },
            (l.nearblock_mbps ? num(l.nearblock_mbps) + ' Mb/s nb' : '') + (l.budget_mbps ? ' / ' + num(l.budget_mbps, 0) : '')),
          h('title', {}, l.name + ': utilisation ' + pct(u) + ', nearblock ' + num(l.nearblock_mbps) + ' Mbit/s' +
            (l.budget_mbps ? ' of a ' + l.budget_mbps + ' Mbit/s budget' : '')));
      }),
      net.nodes.map((n) => h('g', { class: 'node ' + n.role, 'data-node': n.name },
        n.role === 'hypervisor'
          ? h('rect', { x: pos[n.name].x - 28, y: pos[n.name].y - 13, width: 56, height: 26, rx: 4 })
          : h('circle', { cx: pos[n.name].x, cy: pos[n.name].y, r: 18 }),
        h('text', { x: pos[n.name].x, y: pos[n.name].y + (n.role === 'hypervisor' ? 4 : 34), 'text-anchor': 'middle' }, n.name),
        h('title', {}, n.name + ' (' + n.role + (n.rack ? ', rack ' + n.rack : '') + ')'))));
    const share = (l) => {
      if (!l.capacity_mbps || !l.utilisation) return '–';
      return pct(Math.min(1, l.nearblock_mbps / (l.utilisation * l.capacity_mbps)));
    };
    root.append(svg,
      h('p', { class: 'legend' }, 'link colour: utilisation (green < 50% < amber < 80% < red, grey: not measured); width grows with utilisation; label: nearblock\'s Mbit/s / its budget'),
      h('h3', {}, 'Links'),
      table(['link', 'capacity Mbit/s', 'utilisation', 'nearblock Mbit/s', 'nearblock share', 'budget Mbit/s'],
        net.links.map((l) => h('tr', { 'data-link': l.name }, h('td', {}, l.name), h('td', { class: 'n' }, num(l.capacity_mbps, 0)),
          h('td', { class: 'n' }, pct(l.utilisation)), h('td', { class: 'n' }, num(l.nearblock_mbps)),
          h('td', { class: 'n' }, share(l)), h('td', { class: 'n' }, l.budget_mbps ? num(l.budget_mbps, 0) : '–'))),
        { id: 'links' }),
      h('h3', {}, 'Appliances'),
      table(['appliance', 'API', 'steering', 'cache', 'hit ratio', 'pinned', 'LUNs served', 'served bytes'],
        net.appliances.map((a) => {
          const v = a.view;
          if (!v) return h('tr', {}, h('td', {}, '?'), h('td', {}, a.api), h('td', { colspan: 6, class: 'error' }, a.error || 'no answer'));
          const c = v.cache;
          const served = v.luns.filter((x) => x.served);
          return h('tr', { 'data-appliance': v.name }, h('td', {}, v.name), h('td', {}, a.api), h('td', {}, v.steering ? 'yes' : 'no'),
            h('td', { class: 'n' }, c ? bytes(c.bytes) + ' / ' + bytes(c.capacity_bytes) : 'none'),
            h('td', { class: 'n' }, c && c.hits + c.misses ? pct(c.hits / (c.hits + c.misses)) : '–'),
            h('td', { class: 'n' }, c ? bytes(c.pinned_bytes) : '–'),
            h('td', {}, served.length ? served.map((x) => x.target + '/' + x.lun).join(', ') : (v.luns.length ? '0 of ' + v.luns.length : '–')),
            h('td', {}, Object.entries(v.served_bytes).filter(([, b]) => b).map(([k, b]) => k + ' ' + bytes(b)).join(', ') || '–'));
        }), { id: 'appliances' }),
      h('h3', {}, 'Discovery (logins seen)'),
      table(['initiator', 'initiator IQN', 'target IQN', 'portal', 'type', 'logins'],
        net.discovery.map((d) => h('tr', {}, h('td', {}, d.initiator_addr), h('td', {}, d.initiator_iqn), h('td', {}, d.target_iqn),
          h('td', {}, d.portal), h('td', {}, d.session_type), h('td', { class: 'n' }, d.logins))), { id: 'discovery' }));
  },
};

const renderers = { inventory: inventoryPage, place: placePage, jobs: jobsPage, job: jobPage, network: networkPage };

function route() {
  if (!token()) { askToken(''); return; }
  const hash = location.hash.replace(/^#\/?/, '') || 'inventory';
  const [path, query] = hash.split('?');
  const [name, arg] = path.split('/');
  const next = renderers[name] ? name : 'inventory';
  if (state.page && state.page !== next && renderers[state.page].hide) renderers[state.page].hide();
  state.page = next;
  for (const a of document.querySelectorAll('#nav a')) {
    a.className = a.dataset.page === next || (next === 'job' && a.dataset.page === 'jobs') ? 'current' : '';
  }
  renderers[next].show(new URLSearchParams(query || ''), arg);
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('login').addEventListener('submit', (e) => {
    e.preventDefault();
    useToken(document.getElementById('token').value.trim());
  });
  document.getElementById('signout').addEventListener('click', () => askToken(''));
  window.addEventListener('hashchange', route);
  if (token()) useToken(token()); else askToken('');
});
