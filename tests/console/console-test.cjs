// The console in a real browser (headless Chromium driven by playwright-core),
// against a live lab; run by tests/tests/console.rs inside the manager's
// namespace. Every wait is bounded. Arguments: a JSON object
//   { url, readToken, adminToken, image, vm, hosts: [..], links: [..],
//     appliances: [..], best, topCpu, shots, userDataDir }
// It asserts on the DOM, saves a screenshot of each page into `shots`, and
// prints one JSON line: { job, target } of the VM it placed.
'use strict';

const { chromium } = require('playwright-core');
const assert = require('node:assert/strict');
const path = require('node:path');

const cfg = JSON.parse(process.argv[2]);
const WAIT = 30_000;

function log(...args) {
  console.error('[console-test]', ...args);
}

async function texts(page, selector) {
  return page.$$eval(selector, (els) => els.map((e) => e.textContent.trim()));
}

async function signIn(page, token) {
  await page.waitForSelector('#login:not([hidden])', { timeout: WAIT });
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await page.waitForSelector('#login', { state: 'hidden', timeout: WAIT });
}

// The ranking table's rows as [host, cost]; waits until it has rows.
async function ranking(page) {
  await page.waitForSelector('#targets tbody tr', { timeout: WAIT });
  return page.$$eval('#targets tbody tr', (rows) => rows.map((r) => [
    r.dataset.host,
    r.querySelector('td.cost').textContent.trim(),
  ]));
}

async function main() {
  const context = await chromium.launchPersistentContext(cfg.userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-dev-shm-usage',
    ],
    viewport: { width: 1400, height: 1000 },
  });
  const page = context.pages()[0] || (await context.newPage());
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  // Script errors count; a refused request is the test's own doing (the read
  // token placing) and is checked on the page instead.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  page.on('response', (r) => { if (r.status() === 404) errors.push('404: ' + r.url()); });
  const shot = (name) => page.screenshot({ path: path.join(cfg.shots, name + '.png'), fullPage: true });

  try {
    // The page asks for a token once; a read token shows every page.
    await page.goto(cfg.url, { timeout: WAIT });
    await signIn(page, cfg.readToken);
    log('signed in with the read token');

    // Inventory: the lab's image, hosts and VMs, live (no reload).
    await page.goto(cfg.url + '#/inventory');
    await page.waitForSelector('#hosts tbody tr', { timeout: WAIT });
    await page.waitForFunction((n) => document.querySelectorAll('#hosts tbody tr').length >= n,
      cfg.hosts.length, { timeout: WAIT });
    const hosts = await page.$$eval('#hosts tbody tr', (rows) => rows.map((r) => r.dataset.host));
    for (const h of cfg.hosts) assert.ok(hosts.includes(h), `host ${h} in ${hosts}`);
    const images = await page.$$eval('#images tbody tr', (rows) => rows.map((r) => r.dataset.image));
    assert.ok(images.includes(cfg.image), `image ${cfg.image} in ${images}`);
    const vms = await page.$$eval('#vms tbody tr', (rows) => rows.map((r) => r.dataset.vm));
    assert.ok(vms.includes(cfg.storedVm), `VM ${cfg.storedVm} in ${vms}`);
    await shot('inventory');

    // Place: ranked by cost under `best`; another policy re-ranks.
    await page.goto(cfg.url + '#/place?image=' + encodeURIComponent(cfg.image));
    await page.waitForFunction(() => document.querySelector('#chosen'), null, { timeout: WAIT });
    let rows = await ranking(page);
    const costs = rows.filter(([, c]) => c !== '–').map(([, c]) => Number(c));
    assert.ok(costs.length >= 2 && costs.every((c) => Number.isFinite(c)), `numeric costs: ${rows}`);
    for (let i = 1; i < costs.length; i++) assert.ok(costs[i - 1] <= costs[i], `cost order: ${rows}`);
    assert.equal(rows[0][0], cfg.best, `best ranks ${cfg.best} first: ${rows}`);
    assert.equal(await page.textContent('#chosen'), cfg.best);
    await page.selectOption('#policy-kind', 'top');
    await page.fill('#policy-count', '3');
    await page.dispatchEvent('#policy-count', 'change');
    await page.selectOption('#policy-metric', 'cpu');
    await page.waitForFunction((h) => document.querySelector('#chosen')?.textContent === h
      && document.querySelector('#targets tbody tr')?.dataset.host === h, cfg.topCpu, { timeout: WAIT });
    rows = await ranking(page);
    log('ranking under top:3:cpu', JSON.stringify(rows));
    await shot('place');

    // A read token cannot place: the page says so.
    await page.fill('#vm-name', cfg.vm);
    await page.click(`#targets tr[data-host="${cfg.topCpu}"] button.place`);
    await page.click('#confirm-place');
    await page.waitForFunction(() => /admin token/.test(document.querySelector('#place-error')?.textContent || ''),
      null, { timeout: WAIT });
    log('the read token was refused for placing');

    // Network: the topology drawn, links with their budgets, the appliances.
    await page.goto(cfg.url + '#/network');
    await page.waitForSelector('#topology', { timeout: WAIT });
    const nodes = await page.$$eval('#topology g.node', (gs) => gs.map((g) => g.dataset.node));
    for (const h of cfg.hosts) assert.ok(nodes.includes(h), `node ${h} drawn: ${nodes}`);
    const links = await page.$$eval('#links tbody tr', (rs) => rs.map((r) => r.dataset.link));
    for (const l of cfg.links) assert.ok(links.includes(l), `link ${l} in ${links}`);
    await page.waitForFunction((names) => {
      const shown = [...document.querySelectorAll('#appliances tbody tr')].map((r) => r.dataset.appliance);
      return names.every((n) => shown.includes(n));
    }, cfg.appliances, { timeout: WAIT });
    await shot('network');

    // The admin token places; the job page follows the build to done.
    await page.click('#signout');
    await signIn(page, cfg.adminToken);
    await page.goto(cfg.url + '#/place?image=' + encodeURIComponent(cfg.image));
    await page.waitForSelector('#targets tbody tr', { timeout: WAIT });
    await page.selectOption('#policy-kind', 'top');
    await page.fill('#policy-count', '3');
    await page.dispatchEvent('#policy-count', 'change');
    await page.selectOption('#policy-metric', 'cpu');
    await page.waitForFunction((h) => document.querySelector('#chosen')?.textContent === h, cfg.topCpu, { timeout: WAIT });
    await page.fill('#vm-name', cfg.vm);
    await page.click(`#targets tr[data-host="${cfg.topCpu}"] button.place`);
    await page.click('#confirm-place');
    await page.waitForURL(/#\/job\/\d+$/, { timeout: WAIT });
    const job = Number(page.url().split('/').pop());
    log('placed: job', job);
    await page.waitForFunction(() => document.querySelector('#job-state')?.textContent === 'done', null, { timeout: 120_000 });
    const target = await page.textContent('#job-target');
    assert.equal(target, cfg.topCpu);
    const sources = await page.$$eval('#by-source tbody tr', (rs) => rs.length);
    assert.ok(sources >= 1, 'bytes by source shown');
    const events = await texts(page, '#events li');
    assert.ok(events.length >= 2, `events: ${events}`);
    await shot('job');

    // The job list has it, done.
    await page.goto(cfg.url + '#/jobs');
    await page.waitForSelector(`#jobs tr[data-job="${job}"]`, { timeout: WAIT });
    assert.match(await page.textContent(`#jobs tr[data-job="${job}"]`), /done/);
    await shot('jobs');

    assert.deepEqual(errors, [], 'no script errors');
    process.stdout.write(JSON.stringify({ job, target }) + '\n');
  } catch (e) {
    await shot('failure').catch(() => {});
    throw e;
  } finally {
    await context.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
