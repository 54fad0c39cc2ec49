#!/usr/bin/env node
// Cross-site WebSocket hijacking, tried in a real browser against `wsbridge demo` (whose routes
// admit their own origin only).
//
//   node tests/browser/origin.mjs [--timeout SECONDS] URL
//
// URL is the demo's page. In Debian's Chromium (/usr/bin/chromium, or $CHROMIUM), driven by
// playwright-core: the demo's page itself opens a WebSocket to the demo's /chat and must get it
// open; then a page served by this script from another origin (a node:http server on another
// 127.0.0.1 port) opens a WebSocket to the same /chat and must be refused (the socket closes
// without ever opening). Prints one line of JSON ({"ok":true,...} or {"ok":false,"error":...});
// exit code 0 success, 1 failure, 2 bad usage. Bounded by --timeout (default 40 s).

import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const started = Date.now();
let url = null;
let timeoutMs = 40_000;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--timeout' && i + 1 < argv.length) timeoutMs = Number(argv[++i]) * 1000;
  else if (url === null && /^https?:\/\//.test(argv[i])) url = argv[i];
  else {
    console.error(`origin.mjs: unexpected argument ${argv[i]}\nusage: node origin.mjs [--timeout SECONDS] URL`);
    process.exit(2);
  }
}
if (url === null || !(timeoutMs > 0 && timeoutMs <= 55_000)) {
  console.error('usage: node origin.mjs [--timeout SECONDS] URL');
  process.exit(2);
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
let context = null;
let userDataDir = null;
let server = null;

async function cleanup() {
  const c = context;
  context = null;
  if (c) await Promise.race([c.close().catch(() => {}), new Promise((r) => setTimeout(r, 5_000).unref())]);
  if (server) server.close();
  if (userDataDir) await rm(userDataDir, { recursive: true, force: true, maxRetries: 3 }).catch(() => {});
}

async function finish(obj, code) {
  console.log(JSON.stringify({ ...obj, ms: Date.now() - started }));
  if (code !== 0) console.error(`origin.mjs: FAIL: ${obj.error}`);
  await cleanup();
  process.exit(code);
}

setTimeout(() => finish({ ok: false, error: `timed out after ${timeoutMs / 1000} s` }, 1), timeoutMs).unref();

// In the page: open a WebSocket and tell how it went, within `ms`.
function tryWebSocket([wsUrl, ms]) {
  return new Promise((resolve) => {
    let opened = false;
    const ws = new WebSocket(wsUrl, ['binary']);
    const done = (outcome) => resolve(outcome);
    ws.onopen = () => {
      opened = true;
      ws.close(1000);
      done({ opened: true });
    };
    ws.onclose = (e) => {
      if (!opened) done({ opened: false, code: e.code });
    };
    setTimeout(() => done({ opened, code: null, timedOut: true }), ms);
  });
}

async function main() {
  if (!existsSync(executablePath)) return finish({ ok: false, error: `${executablePath} not found` }, 1);
  const { chromium } = await import('playwright-core');
  // The other site: a blank page on another port of 127.0.0.1, so another origin.
  server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>another site</title><p>another site');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const other = `http://127.0.0.1:${server.address().port}/`;
  const wsUrl = url.replace(/^http/, 'ws').replace(/\/?$/, '/').replace(/\/$/, '/chat');

  userDataDir = await mkdtemp(join(tmpdir(), 'wsbridge-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--disable-dev-shm-usage', '--no-proxy-server',
    ],
    timeout: 15_000,
    handleSIGINT: false,
    handleSIGTERM: false,
    handleSIGHUP: false,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(15_000);

  await page.goto(url, { waitUntil: 'load' });
  const same = await page.evaluate(tryWebSocket, [wsUrl, 10_000]);
  if (!same.opened) return finish({ ok: false, error: `the demo's own page could not open ${wsUrl}: ${JSON.stringify(same)}` }, 1);

  await page.goto(other, { waitUntil: 'load' });
  const cross = await page.evaluate(tryWebSocket, [wsUrl, 10_000]);
  if (cross.opened || cross.timedOut) {
    return finish({ ok: false, error: `a page from ${other} ${cross.opened ? 'opened' : 'was left hanging on'} ${wsUrl}: ${JSON.stringify(cross)}` }, 1);
  }
  return finish({ ok: true, url, ws: wsUrl, allowed: url, refused: other, refusedCode: cross.code }, 0);
}

main().catch((e) => finish({ ok: false, error: `unexpected error: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}` }, 1));
