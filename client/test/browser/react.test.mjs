// Browser test of the React entry point (`@wsnotify/client/react`): a small React 19 app
// (fixtures/react-app.jsx, StrictMode, bundled with esbuild from node_modules) in headless
// Chromium, against the real wsnotify gateway and the real RabbitMQ.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { build } from 'esbuild';
import { Broker, CLIENT_DIR, Gateway, TestPage, freePort, launchBrowser, probeRoute, randomId, startStaticServer } from './harness.mjs';

let browser;
let web;
let broker;

before(async () => {
  // Development React, so StrictMode mounts every effect twice, as in an app under development.
  const bundle = build({
    entryPoints: [join(CLIENT_DIR, 'test', 'browser', 'fixtures', 'react-app.jsx')],
    outfile: join(CLIENT_DIR, 'test', 'browser', 'build', 'react-app.js'),
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2020',
    jsx: 'automatic',
    define: { 'process.env.NODE_ENV': '"development"' },
    sourcemap: 'inline',
    logLevel: 'warning',
  });
  // allSettled: if one fails, `after` still closes the others (an open handle would hold the file until its timeout).
  const started = await Promise.allSettled([launchBrowser(), startStaticServer(), Broker.connect(), bundle]);
  [browser, web, broker] = started.map((r) => (r.status === 'fulfilled' ? r.value : undefined));
  const failed = started.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
});

after(async () => {
  await Promise.allSettled([browser?.close(), web?.close()]);
  await broker?.close();
});

test('useNotification and useNotificationStatus render notifications and the connection status', async (t) => {
  const queue = randomId('wsnotify_client_test');
  const gw = new Gateway({ port: await freePort(), queue, env: { AUTH_MODE: 'insecure' } });
  t.after(async () => {
    await gw.kill();
    await broker.deleteQueues(queue);
  });
  await broker.declare(queue);
  await gw.start();

  const user = randomId('react');
  const url = `${web.origin}/test/browser/fixtures/react.html?url=${encodeURIComponent(gw.wsUrl)}&user_id=${encodeURIComponent(user)}`;
  const tp = await TestPage.open(browser, url);
  t.after(() => tp.close());
  const { page } = tp;
  const welcome = (message) => broker.publish(queue, { user_id: user, message_type: 'welcome', data: { message } });
  const inboxItems = () => page.locator('#inbox li').allTextContents();
  const counts = () => page.evaluate(() => window.subscriptionCounts());

  // The status hook renders the connection opening; the route is live once a probe arrives.
  await page.waitForSelector('#status[data-status="open"]', { timeout: 10000 });
  await probeRoute(tp, (nonce) => broker.publish(queue, { user_id: user, message_type: 'probe', data: { nonce } }));
  // Probe, Inbox, WelcomeCounter: one live subscription each, StrictMode's double mount included.
  assert.equal((await counts()).live, 3);

  welcome('first');
  await page.waitForSelector('#inbox li:has-text("A: first")', { timeout: 10000 });

  // Re-renders hand the hook a new handler each time: no new subscription, and the latest
  // handler (which sees label B) is the one called.
  const initial = await counts();
  for (let i = 1; i <= 3; i++) {
    await page.click('#rerender');
    await page.waitForSelector(`#rerender:has-text("(${i})")`);
  }
  await page.click('#relabel');
  welcome('second');
  await page.waitForSelector('#inbox li:has-text("B: second")', { timeout: 10000 });
  assert.deepEqual(await counts(), initial, 're-rendering must not resubscribe');
  assert.deepEqual(await inboxItems(), ['A: first', 'B: second'], 'each notification once, in order');
  assert.equal(await page.textContent('#welcome-count'), '2');

  // Unmounting the inbox unsubscribes it; the other component still receives.
  await page.click('#toggle-inbox');
  await page.waitForSelector('#inbox', { state: 'detached' });
  assert.equal((await counts()).live, 2);
  welcome('third');
  await page.waitForSelector('#welcome-count:has-text("3")', { timeout: 10000 });

  // The gateway restarts: the status shows reconnecting, then open again, useRecovery reports
  // the reconnect as recovered, and delivery resumes (what was published meanwhile, once).
  assert.equal(await page.getAttribute('#recovery', 'data-recovered'), '');
  await gw.stop();
  await page.waitForSelector('#status[data-status="reconnecting"]', { timeout: 10000 });
  welcome('while down');
  await gw.start();
  await page.waitForSelector('#status[data-status="open"]', { timeout: 15000 });
  await page.waitForSelector('#recovery[data-recovered="true"]', { timeout: 10000 });
  await probeRoute(tp, (nonce) => broker.publish(queue, { user_id: user, message_type: 'probe', data: { nonce } }));
  await page.click('#toggle-inbox');
  welcome('after restart');
  await page.waitForSelector('#inbox li:has-text("B: after restart")', { timeout: 10000 });
  assert.deepEqual(await inboxItems(), ['B: after restart'], 'a remounted inbox starts empty and subscribes again');
  await page.waitForSelector('#welcome-count:has-text("5")', { timeout: 10000 });
  assert.equal(await page.textContent('#welcome-count'), '5', 'the one published while down, once');

  await page.click('#disconnect');
  await page.waitForSelector('#status[data-status="closed"]', { timeout: 5000 });
  assert.deepEqual(tp.pageErrors, [], 'no uncaught errors in the page');
});
