// What the browser scripts share: a run that ends one way only, with one JSON line on stdout
// (and a `NAME: FAIL: ...` line on stderr when it fails), its browser closed and its profile
// directory removed, within its deadline whatever hangs (a watchdog), on SIGINT/SIGTERM too.
//
//   const run = startRun('chat.mjs', opts, started);   // opts: { url, timeoutMs }
//   const page = await run.launch(chromium, path, {}); // Chromium on a profile cleanup removes
//   return run.fail('why');                             // the report, cleanup, exit 1
//   await run.finish(); run.result({ ok: true, ... });  // cleanup, then the report

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// The flags every run starts Chromium with: headless, and nothing of its own on the network.
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
  '--no-proxy-server',
];

// An error's message, short: playwright's carry the whole browser command line and call log.
export function brief(e, maxLines = 1) {
  return String(e && e.message ? e.message : e)
    .replace(/\u001b\[[0-9;]*m/g, '')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !/<launching>|^Call log:$|^- /.test(l))
    .slice(0, maxLines)
    .map((l) => (l.length > 300 ? `${l.slice(0, 300)}...` : l))
    .join(' | ');
}

export function startRun(name, opts, started) {
  const run = { context: null, userDataDir: null, finished: false };

  run.result = (obj) => console.log(JSON.stringify({ ...obj, ms: Date.now() - started }));

  run.cleanup = async () => {
    const c = run.context;
    run.context = null;
    if (c) {
      // Bounded: a wedged browser must not hold the run past its deadline. Playwright also kills
      // the browser process when node exits.
      await Promise.race([c.close().catch(() => {}), new Promise((r) => setTimeout(r, 5_000).unref())]);
    }
    if (run.userDataDir) await rm(run.userDataDir, { recursive: true, force: true, maxRetries: 3 }).catch(() => {});
  };

  run.fail = async (message) => {
    if (run.finished) return;
    run.finished = true;
    console.error(`${name}: FAIL: ${message}`);
    run.result({ ok: false, url: opts.url, error: message });
    await run.cleanup();
    process.exit(1);
  };

  // The run went well: no failure is reported after this.
  run.finish = async () => {
    run.finished = true;
    await run.cleanup();
  };

  // Starts Chromium (playwright's `chromium`) on a fresh profile that cleanup removes, with
  // CHROMIUM_ARGS and `args`, and playwright's own signal handlers off (ours close the browser
  // and report); `options` go to launchPersistentContext (timeout, viewport, httpCredentials).
  // Returns its first page, or null once the failure is reported through `fail`.
  run.launch = async (chromium, executablePath, { args = [], fail = run.fail, ...options } = {}) => {
    run.userDataDir = await mkdtemp(join(tmpdir(), 'wsbridge-chromium-'));
    try {
      run.context = await chromium.launchPersistentContext(run.userDataDir, {
        executablePath,
        headless: true,
        args: [...CHROMIUM_ARGS, ...args],
        handleSIGINT: false,
        handleSIGTERM: false,
        handleSIGHUP: false,
        ...options,
      });
    } catch (e) {
      await fail(`cannot start ${executablePath}: ${brief(e, 6)}`);
      return null;
    }
    return run.context.pages()[0] ?? (await run.context.newPage());
  };

  // The watchdog: whatever hangs, the run ends a little after its deadline, browser closed.
  setTimeout(() => {
    run.fail(`timed out after ${opts.timeoutMs / 1000} s overall`);
  }, opts.timeoutMs + 1_000).unref();

  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => run.fail(`interrupted by ${sig}`));
  return run;
}
