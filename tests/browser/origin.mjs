#!/usr/bin/env node
// Cross-site WebSocket hijacking, tried in a real browser against `wsbridge demo` (whose routes
// admit their own origin only).
//
//   node tests/browser/origin.mjs [--agent-path PATH] [--timeout SECONDS] URL
//
// URL is the demo's page. In Debian's Chromium (/usr/bin/chromium, or $CHROMIUM), driven by
// playwright-core: the demo's page itself opens a WebSocket to the demo's /chat and must get it
// open; then a page served by this script from another origin (a node:http server on another
// 127.0.0.1 port) opens a WebSocket to the same /chat and must be refused (the socket closes
// without ever opening). With --agent-path (the demo with --agent), that page also opens a
// WebSocket to the agent endpoint with the agents' control protocol, as a page trying to brake
// the agents behind its visitor's address would, and must be refused too. Prints one line of
// JSON ({"ok":true,...} or {"ok":false,"error":...}); exit code 0 success, 1 failure, 2 bad
// usage. Bounded by --timeout (default 40 s).

import { existsSync } from 'node:fs';
import { createServer } from 'node:http';
import { brief, startRun } from './run.mjs';

const USAGE = 'usage: node origin.mjs [--agent-path PATH] [--timeout SECONDS] URL';
const started = Date.now();
const opts = { url: null, agentPath: null, timeoutMs: 40_000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--timeout' && i + 1 < argv.length) opts.timeoutMs = Number(argv[++i]) * 1000;
  else if (argv[i] === '--agent-path' && i + 1 < argv.length) opts.agentPath = argv[++i];
  else if (opts.url === null && /^https?:\/\//.test(argv[i])) opts.url = argv[i];
  else {
    console.error(`origin.mjs: unexpected argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (opts.url === null || !(opts.timeoutMs > 0 && opts.timeoutMs <= 55_000)) {
  console.error(USAGE);
  process.exit(2);
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const run = startRun('origin.mjs', opts, started);

// In the page: open a WebSocket (with `protocols`) and tell how it went, within `ms`.
function tryWebSocket([wsUrl, protocols, ms]) {
  return new Promise((resolve) => {
    let opened = false;
    const ws = new WebSocket(wsUrl, protocols);
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
  if (!existsSync(executablePath)) return run.fail(`${executablePath} not found`);
  const { chromium } = await import('playwright-core');
  // The other site: a blank page on another port of 127.0.0.1, so another origin.
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>another site</title><p>another site');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  server.unref();
  const other = `http://127.0.0.1:${server.address().port}/`;
  const base = opts.url.replace(/^http/, 'ws').replace(/\/?$/, '/');
  const wsUrl = `${base}chat`;

  const page = await run.launch(chromium, executablePath, { timeout: 15_000 });
  if (!page) return;
  page.setDefaultTimeout(15_000);

  await page.goto(opts.url, { waitUntil: 'load' });
  const same = await page.evaluate(tryWebSocket, [wsUrl, ['binary'], 10_000]);
  if (!same.opened) return run.fail(`the demo's own page could not open ${wsUrl}: ${JSON.stringify(same)}`);

  await page.goto(other, { waitUntil: 'load' });
  const cross = await page.evaluate(tryWebSocket, [wsUrl, ['binary'], 10_000]);
  if (cross.opened || cross.timedOut) {
    return run.fail(`a page from ${other} ${cross.opened ? 'opened' : 'was left hanging on'} ${wsUrl}: ${JSON.stringify(cross)}`);
  }
  const report = { ok: true, url: opts.url, ws: wsUrl, allowed: opts.url, refused: other, refusedCode: cross.code };
  if (opts.agentPath) {
    const agentUrl = `${base}${opts.agentPath.replace(/^\//, '')}`;
    const agent = await page.evaluate(tryWebSocket, [agentUrl, ['wsbridge-agent.v1'], 10_000]);
    if (agent.opened || agent.timedOut) {
      return run.fail(`a page from ${other} ${agent.opened ? 'opened' : 'was left hanging on'} the agent endpoint ${agentUrl}: ${JSON.stringify(agent)}`);
    }
    report.agentEndpoint = agentUrl;
  }
  await run.finish();
  run.result(report);
}

main().catch((e) => run.fail(`unexpected error: ${brief(e, 3)}`));
