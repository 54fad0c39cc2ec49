#!/usr/bin/env node
// End-to-end check of the wsbridge demo chat in a real browser.
//
//   node tests/browser/chat.mjs [--ignore-spki HASH]... [--timeout SECONDS] URL
//
// Launches Debian's Chromium (/usr/bin/chromium, or $CHROMIUM) headless through playwright-core,
// opens URL (the page `wsbridge demo` serves), waits for the page's WebSocket to be open, types a
// unique line into #line, presses Enter, and waits until #log shows `guest-N: <that line>`: the
// line went browser -> wsbridge -> the real TCP chat server -> wsbridge -> browser. The page must
// log no console errors and throw no uncaught exceptions.
//
// Prints one line of JSON on stdout ({"ok":true,...} or {"ok":false,"error":...}); on failure
// also a `chat.mjs: FAIL: ...` line on stderr. Exit code: 0 success, 1 failure, 2 bad usage.
// If $WSBRIDGE_SCREENSHOT is set, a PNG of the page is saved there (on failure too, if the page
// got that far). Everything is bounded: the whole run ends within --timeout (default 50 s).
//
// --ignore-spki HASH is passed to Chromium as --ignore-certificate-errors-spki-list=HASH (base64
// SHA-256 of a certificate's SubjectPublicKeyInfo), so that a wss:// test can use a self-signed
// certificate; it may be given several times.

import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { brief, startRun } from './run.mjs';

const USAGE = 'usage: node chat.mjs [--ignore-spki HASH]... [--timeout SECONDS] URL';
const started = Date.now();

function parseArgs(argv) {
  const opts = { url: null, spki: [], timeoutMs: 50_000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--ignore-spki') opts.spki.push(value());
    else if (a.startsWith('--ignore-spki=')) opts.spki.push(a.slice('--ignore-spki='.length));
    else if (a === '--timeout') opts.timeoutMs = Number(value()) * 1000;
    else if (a === '-h' || a === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else if (a.startsWith('-')) throw new Error(`unknown option ${a}`);
    else if (opts.url === null) opts.url = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  if (opts.url === null) throw new Error('missing URL');
  if (!/^https?:\/\//.test(opts.url)) throw new Error(`URL must start with http:// or https://, got ${opts.url}`);
  if (!(opts.timeoutMs > 0 && opts.timeoutMs <= 55_000)) throw new Error('--timeout must be between 0 and 55 seconds');
  for (const h of opts.spki) if (!/^[A-Za-z0-9+/=]+$/.test(h)) throw new Error(`--ignore-spki: not a base64 hash: ${h}`);
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error(`chat.mjs: ${e.message}\n${USAGE}`);
  process.exit(2);
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const screenshot = process.env.WSBRIDGE_SCREENSHOT ? resolve(process.env.WSBRIDGE_SCREENSHOT) : null;
const stepMs = Math.min(15_000, opts.timeoutMs);
const deadline = started + opts.timeoutMs;
// Each wait gets at most stepMs, and never more than is left of the whole run.
const left = () => Math.max(1, Math.min(stepMs, deadline - Date.now()));

const run = startRun('chat.mjs', opts, started);
const { result, fail } = run;

async function main() {
  if (!existsSync(executablePath)) {
    return fail(`${executablePath} not found: install Debian's chromium (scripts/test.sh does it), or set CHROMIUM`);
  }
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    return fail(`cannot load playwright-core (${e.message}): run \`npm ci\` in tests/browser (scripts/test.sh does it)`);
  }

  const args = [];
  if (opts.spki.length) args.push(`--ignore-certificate-errors-spki-list=${opts.spki.join(',')}`);
  const page = await run.launch(chromium, executablePath, { args, fail, timeout: left(), viewport: { width: 1000, height: 720 } });
  if (!page) return;
  const context = run.context;
  page.setDefaultTimeout(stepMs);

  const problems = [];
  const ignored = [];
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const loc = msg.location();
    const where = loc && loc.url ? loc.url : '';
    const line = `console error: ${msg.text()}${where ? ` (${where})` : ''}`;
    // Chromium asks for /favicon.ico by itself; the page never refers to one, so a 404 for it is
    // no error of the page's. It is still reported, under "ignored".
    if (/^https?:\/\/[^/]+\/favicon\.ico$/.test(where) && / 404 /.test(msg.text())) ignored.push(line);
    else problems.push(line);
  });
  page.on('pageerror', (err) => problems.push(`uncaught exception: ${err.message}`));
  page.on('crash', () => problems.push('the page crashed'));
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));

  // What the page shows, for failure messages.
  const snapshot = async () => {
    try {
      const s = await page.evaluate(() => ({
        status: document.querySelector('#status')?.textContent ?? null,
        log: [...document.querySelectorAll('#log > div')].map((d) => d.textContent),
      }));
      return ` [status: ${JSON.stringify(s.status)}; log: ${JSON.stringify(s.log)}${problems.length ? `; ${problems.join('; ')}` : ''}]`;
    } catch {
      return problems.length ? ` [${problems.join('; ')}]` : '';
    }
  };
  const shoot = async () => {
    if (!screenshot) return null;
    await page.screenshot({ path: screenshot, fullPage: true, timeout: left() });
    return screenshot;
  };
  const failWithPage = async (message) => {
    const extra = await snapshot();
    await shoot().catch(() => {});
    return fail(message + extra);
  };

  const response = await page.goto(opts.url, { waitUntil: 'load', timeout: left() }).catch((e) => e);
  if (response instanceof Error) return failWithPage(`cannot open ${opts.url}: ${brief(response)}`);
  if (!response || !response.ok()) return failWithPage(`${opts.url} answered HTTP ${response ? response.status() : '(no response)'}`);

  // The status line says `connected to ws://...` once the WebSocket is open, `closed: CODE ...`
  // if it closed instead: wait for either and tell which.
  let status;
  try {
    const handle = await page.waitForFunction(
      () => {
        const t = document.querySelector('#status')?.textContent ?? '';
        return t.startsWith('connected to ') || t.startsWith('closed') ? t : false;
      },
      null,
      { timeout: left() },
    );
    status = await handle.jsonValue();
  } catch (e) {
    return failWithPage(`the page's WebSocket did not open in time (${brief(e)})`);
  }
  if (!/^connected to wss?:\/\//.test(status)) return failWithPage(`the page's WebSocket did not connect: ${JSON.stringify(status)}`);

  const text = `hello from chromium ${randomBytes(6).toString('hex')}`;
  try {
    const input = page.locator('#line');
    await input.click({ timeout: left() });
    await input.pressSequentially(text, { timeout: left() });
    await input.press('Enter', { timeout: left() });
  } catch (e) {
    return failWithPage(`cannot type into #line: ${brief(e)}`);
  }

  // The chat server broadcasts each line as `guest-N: LINE`; wsbridge makes it one message, the
  // page one <div> in #log.
  let echoed;
  try {
    const handle = await page.waitForFunction(
      (want) => {
        for (const d of document.querySelectorAll('#log > div')) {
          const m = /^(guest-\d+): (.*)$/s.exec(d.textContent);
          if (m && m[2] === want) return { line: d.textContent, guest: m[1] };
        }
        return false;
      },
      text,
      { timeout: left() },
    );
    echoed = await handle.jsonValue();
  } catch (e) {
    return failWithPage(`#log never showed "guest-N: ${text}" (${brief(e)})`);
  }

  // The greeting, when there is one, must name the same guest the echo came from.
  const welcome = await page.evaluate(() =>
    [...document.querySelectorAll('#log > div')].map((d) => d.textContent).find((t) => t.startsWith('* welcome')),
  );
  const named = welcome && /(guest-\d+)/.exec(welcome);
  if (named && named[1] !== echoed.guest) {
    return failWithPage(`the greeting names ${named[1]} but the echo came from ${echoed.guest}`);
  }
  const inputLeft = await page.inputValue('#line', { timeout: left() });
  if (inputLeft !== '') return failWithPage(`#line was not cleared after sending: ${JSON.stringify(inputLeft)}`);

  if (problems.length) return failWithPage(`the page reported ${problems.length} problem(s)`);

  let shot;
  try {
    shot = await shoot();
  } catch (e) {
    return fail(`cannot save the screenshot to ${screenshot}: ${brief(e)}`);
  }
  const browserVersion = context.browser()?.version() ?? null;
  await run.finish();
  result({
    ok: true,
    url: opts.url,
    browser: browserVersion,
    websocket: sockets[0] ?? null,
    status,
    welcome: welcome ?? null,
    sent: text,
    received: echoed.line,
    screenshot: shot,
    ignored,
  });
  process.exit(0);
}

main().catch((e) => fail(`unexpected error: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`));
