// Browser tests, JWT mode (?token=, HS256): getToken is asked for a fresh token before every
// attempt; a refused handshake stops the client instead of looping.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { Broker, Gateway, TestPage, freePort, jwtClaims, launchBrowser, probeRoute, randomId, signJwt, startStaticServer } from './harness.mjs';

let browser;
let web;
let broker;

before(async () => {
  [browser, web, broker] = await Promise.all([launchBrowser(), startStaticServer(), Broker.connect()]);
});

after(async () => {
  await Promise.allSettled([browser?.close(), web?.close()]);
  await broker?.close();
});

async function startJwtGateway(t) {
  const queue = randomId('wsnotify_client_test');
  const secret = randomId('secret');
  // PING_INTERVAL_MS: the gateway checks token expiry on its keepalive sweep; keep it short here.
  const gw = new Gateway({ port: await freePort(), queue, env: { AUTH_MODE: 'jwt', JWT_SECRET: secret, PING_INTERVAL_MS: '500' } });
  t.after(async () => {
    await gw.kill();
    await broker.deleteQueues(queue);
  });
  await broker.declare(queue);
  await gw.start();
  return { gw, secret };
}

/**
 * A page whose getToken() calls back into node, where `mint(n)` makes the n-th token (n from 1).
 * Returns the page and the list of tokens handed out.
 */
async function openPage(t, mint) {
  const issued = [];
  const tp = await TestPage.open(browser, `${web.origin}/`, {
    exposeBeforeLoad: {
      __getToken: () => {
        const token = mint(issued.length + 1);
        issued.push(token);
        return token;
      },
    },
  });
  t.after(() => tp.close());
  await tp.page.waitForFunction(() => typeof window.makeService === 'function', null, { timeout: 10000 });
  return { tp, issued };
}

const now = () => Math.floor(Date.now() / 1000);
const isStatus = (svc, status) => (e) => e.kind === 'status' && e.svc === svc && e.status === status;
const isMessage = (svc, label, pred = () => true) => (e) => e.kind === 'message' && e.svc === svc && e.label === label && pred(e);
const tokenOf = (url) => new URL(url).searchParams.get('token');

/** The HTTP status the gateway answers a WebSocket handshake with this token (no browser involved). */
function handshakeStatus(gw, token) {
  return new Promise((resolve, reject) => {
    const req = request(`${gw.httpUrl}/ws?token=${encodeURIComponent(token)}`, {
      headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==' },
      timeout: 5000,
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve(res.statusCode);
    });
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('timeout', () => req.destroy(new Error('handshake request timed out')));
    req.on('error', reject);
    req.end();
  });
}

test('getToken returns a fresh token for every attempt; after a gateway restart the page reconnects with a new one', async (t) => {
  const { gw, secret } = await startJwtGateway(t);
  const user = randomId('jwt_user');
  const { tp, issued } = await openPage(t, (n) => signJwt({ sub: user, exp: now() + 120, iat: now(), jti: `t${n}` }, secret));
  await tp.eval(({ url }) => {
    window.makeService('j', { url, initialDelayMs: 200, backoffFactor: 2, maxDelayMs: 5000, maxReconnectAttempts: 10 });
    window.sub('j', 'update', 'u');
    window.connectWithNodeTokens('j');
  }, { url: gw.wsUrl });
  const firstOpen = await tp.waitFor(isStatus('j', 'open'), 'open');
  assert.equal(firstOpen.attempt, 0);
  assert.equal(issued.length, 1);
  assert.equal(tokenOf(tp.sockets[0]), issued[0]);
  assert.equal(new URL(tp.sockets[0]).searchParams.get('user_id'), null);
  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'j' });
  broker.publish(gw.queue, { user_id: user, message_type: 'update', data: { seq: 1 } });
  const m1 = await tp.waitFor(isMessage('j', 'u', (e) => e.data?.seq === 1), 'update 1');
  assert.equal(m1.frame.user_id, user, 'the frame names the token subject');

  assert.deepEqual(await gw.stop(), { code: 0, signal: null });
  await tp.waitFor((e) => isStatus('j', 'reconnecting')(e) && e.closeCode === 1001, 'reconnecting after 1001');
  await tp.waitFor((e) => isStatus('j', 'reconnecting')(e) && e.attempt === 2, 'reconnect attempt 2 scheduled', 15000);
  await gw.start();
  const reopened = await tp.waitForNext(isStatus('j', 'open'), 'open after restart', 15000);
  assert.ok(reopened.attempt >= 2);

  // one getToken call per attempt: first connection, free retry after 1001, attempts 1..n
  assert.equal(issued.length, 2 + reopened.attempt, `tokens issued: ${issued.length}, reopened on attempt ${reopened.attempt}`);
  assert.equal(new Set(issued).size, issued.length, 'every token is new');
  assert.deepEqual(issued.map((tok) => jwtClaims(tok).jti), issued.map((_, i) => `t${i + 1}`));
  // every socket the browser opened carried a token just handed out, never a reused one
  const used = tp.sockets.map(tokenOf);
  assert.equal(new Set(used).size, used.length);
  assert.ok(used.every((tok) => issued.includes(tok)));
  assert.equal(used.at(-1), issued.at(-1), 'the connection that opened used the newest token');

  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'j' });
  broker.publish(gw.queue, { user_id: user, message_type: 'update', data: { seq: 2 } });
  await tp.waitFor(isMessage('j', 'u', (e) => e.data?.seq === 2), 'update 2 after restart');
  assert.equal(tp.events.filter((e) => e.kind === 'error' && e.svc === 'j').length, 0);
});

test('token expiry on an open connection: close 1008, getToken called again, connection resumes', async (t) => {
  const { gw, secret } = await startJwtGateway(t);
  const user = randomId('jwt_user');
  // the first token expires in ~2 s, later ones are long-lived
  const { tp, issued } = await openPage(t, (n) => signJwt({ sub: user, exp: now() + (n === 1 ? 2 : 120), jti: `t${n}` }, secret));
  await tp.eval(({ url }) => {
    window.makeService('x', { url, initialDelayMs: 200 });
    window.sub('x', 'update', 'u');
    window.connectWithNodeTokens('x');
  }, { url: gw.wsUrl });
  await tp.waitFor(isStatus('x', 'open'), 'open');
  const closed = await tp.waitFor((e) => isStatus('x', 'reconnecting')(e) && e.closeCode === 1008, 'close 1008 when the token expires', 10000);
  assert.equal(closed.wasOpen, true);
  assert.equal(closed.attempt, 1);
  await tp.waitForNext(isStatus('x', 'open'), 'open with a fresh token', 10000);
  assert.equal(issued.length, 2);
  assert.equal(tokenOf(tp.sockets.at(-1)), issued[1]);
  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'x' });
  broker.publish(gw.queue, { user_id: user, message_type: 'update', data: { seq: 1 } });
  await tp.waitFor(isMessage('x', 'u', (e) => e.data?.seq === 1), 'update after token refresh');
});

test('a refused handshake (HTTP 401) stops and reports instead of looping', async (t) => {
  const { gw, secret } = await startJwtGateway(t);
  const user = randomId('jwt_user');
  const cases = {
    wrongSecret: () => signJwt({ sub: user, exp: now() + 120 }, 'not-the-secret'),
    expired: () => signJwt({ sub: user, exp: now() - 30 }, secret),
  };
  for (const [name, mint] of Object.entries(cases)) {
    // the premise: the gateway answers such a handshake with 401, which the page cannot see
    assert.equal(await handshakeStatus(gw, mint()), 401, `${name}: gateway status`);
    const { tp, issued } = await openPage(t, mint);
    await tp.eval(({ url }) => {
      window.makeService('r', { url, initialDelayMs: 100, maxReconnectAttempts: 5 });
      window.connectWithNodeTokens('r');
    }, { url: gw.wsUrl });
    const closed = await tp.waitFor(isStatus('r', 'closed'), `${name}: closed`, 10000);
    assert.equal(closed.reason, 'auth', name);
    const err = await tp.waitFor((e) => e.kind === 'error' && e.svc === 'r', `${name}: error reported`);
    assert.equal(err.errKind, 'auth');
    assert.match(err.message, /401/);
    assert.equal(issued.length, 2, `${name}: one retry with a fresh token, then stop`);
    assert.ok(tp.events.filter((e) => e.kind === 'status' && e.svc === 'r').every((e) => e.status !== 'open'));
    assert.equal(await tp.eval(() => window.svcs.r.status), 'closed');
  }

  // a valid static token (no getToken) works
  const good = signJwt({ sub: user, exp: now() + 120 }, secret);
  assert.equal(await handshakeStatus(gw, good), 101);
  const { tp } = await openPage(t, () => assert.fail('getToken must not be called'));
  await tp.eval(({ url, token }) => {
    window.makeService('s', { url });
    window.svcs.s.connect({ token });
  }, { url: gw.wsUrl, token: good });
  await tp.waitFor(isStatus('s', 'open'), 'open with a static token');
  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 's' });
});
