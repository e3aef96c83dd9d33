// Backoff schedule and reconnection rules, with fake timers and a fake WebSocket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay } from '../../dist/websocketService.js';
import { FakeWebSocket, fakeTimers, flush, makeService } from './helpers.mjs';

const SEED = { initialDelayMs: 1000, backoffFactor: 2, maxDelayMs: 30000, jitter: 0.2 };

test('backoffDelay: seed schedule 1 s, 2 s, 4 s, 8 s, 16 s at the jitter midpoint', () => {
  assert.deepEqual(
    [1, 2, 3, 4, 5].map((n) => backoffDelay(n, SEED, () => 0.5)),
    [1000, 2000, 4000, 8000, 16000],
  );
});

test('backoffDelay: jitter spreads each delay over ±jitter', () => {
  assert.equal(backoffDelay(1, SEED, () => 0), 800);
  assert.equal(backoffDelay(1, SEED, () => 0.999999), 1200);
  assert.equal(backoffDelay(3, SEED, () => 0), 3200);
  assert.equal(backoffDelay(3, SEED, () => 0.999999), 4800);
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(2, SEED);
    assert.ok(d >= 1600 && d <= 2400, `attempt 2 delay ${d} outside [1600, 2400]`);
  }
  // jitter 0 is exact, out-of-range jitter is clamped to [0, 1]
  assert.equal(backoffDelay(4, { ...SEED, jitter: 0 }, () => 0.99), 8000);
  assert.equal(backoffDelay(1, { ...SEED, jitter: 5 }, () => 0), 0);
});

test('backoffDelay: maxDelayMs bounds every delay, jitter included, without piling up on the cap', () => {
  const cap = { ...SEED, maxDelayMs: 10000 };
  for (const r of [0, 0.25, 0.5, 0.75, 0.999999]) {
    for (let n = 1; n <= 30; n++) assert.ok(backoffDelay(n, cap, () => r) <= 10000);
  }
  // at the cap the nominal value is maxDelayMs / (1 + jitter), so the spread survives
  assert.equal(backoffDelay(20, cap, () => 0.5), Math.round(10000 / 1.2));
  assert.equal(backoffDelay(20, cap, () => 0), Math.round((10000 / 1.2) * 0.8));
  assert.equal(backoffDelay(20, cap, () => 0.999999), 10000);
});

test('connect(userId): seed defaults, 5 reconnect attempts at 1/2/4/8/16 s, then closed + reconnect_exhausted', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses, errors } = makeService(t);
  svc.connect('u1');
  assert.equal(statuses[0].status, 'connecting');
  await flush();
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(FakeWebSocket.latest().params.get('user_id'), 'u1');

  const expected = [1000, 2000, 4000, 8000, 16000];
  for (let i = 0; i < expected.length; i++) {
    FakeWebSocket.latest().failHandshake();
    const s = statuses.at(-1);
    assert.deepEqual(
      { status: s.status, attempt: s.attempt, delayMs: s.delayMs, closeCode: s.closeCode, wasOpen: s.wasOpen, maxAttempts: s.maxAttempts },
      { status: 'reconnecting', attempt: i + 1, delayMs: expected[i], closeCode: 1006, wasOpen: false, maxAttempts: 5 },
    );
    timers.tick(expected[i] - 1);
    await flush();
    assert.equal(FakeWebSocket.instances.length, i + 1, `attempt ${i + 1} must not start before ${expected[i]} ms`);
    timers.tick(1);
    await flush();
    assert.equal(FakeWebSocket.instances.length, i + 2, `attempt ${i + 1} starts after ${expected[i]} ms`);
  }
  FakeWebSocket.latest().failHandshake();
  assert.equal(svc.status, 'closed');
  assert.equal(statuses.at(-1).reason, 'reconnect_exhausted');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].kind, 'reconnect_exhausted');
  assert.match(errors[0].message, /5 reconnect attempt/);
  timers.tick(10 * 60_000);
  await flush();
  assert.equal(FakeWebSocket.instances.length, 6, 'no attempt after giving up');
});

test('custom schedule with jitter: delays follow the random source', async (t) => {
  const timers = fakeTimers(t);
  const rnd = [0, 0.999999, 0.25];
  const { svc, statuses } = makeService(t, { random: () => rnd.shift() ?? 0.5 });
  svc.connect({ userId: 'u1', initialDelayMs: 100, backoffFactor: 3, maxDelayMs: 60000, jitter: 0.5, maxReconnectAttempts: 3 });
  await flush();
  const delays = [];
  for (let i = 0; i < 3; i++) {
    FakeWebSocket.latest().failHandshake();
    delays.push(statuses.at(-1).delayMs);
    timers.tick(statuses.at(-1).delayMs);
    await flush();
  }
  // nominal 100, 300, 900 with ±50 %: r=0 -> 50, r≈1 -> 450, r=0.25 -> 675
  assert.deepEqual(delays, [50, 450, 675]);
  FakeWebSocket.latest().failHandshake();
  assert.equal(svc.status, 'closed');
  assert.equal(FakeWebSocket.instances.length, 4);
});

test('a successful open resets the attempt counter', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses } = makeService(t);
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().failHandshake(); // attempt 1 in 1000
  timers.tick(1000);
  await flush();
  FakeWebSocket.latest().failHandshake(); // attempt 2 in 2000
  assert.equal(statuses.at(-1).delayMs, 2000);
  timers.tick(2000);
  await flush();
  FakeWebSocket.latest().open();
  assert.equal(svc.status, 'open');
  assert.equal(statuses.at(-1).attempt, 2, 'open reports the attempt that opened');
  FakeWebSocket.latest().serverClose(1006);
  assert.deepEqual([statuses.at(-1).status, statuses.at(-1).attempt, statuses.at(-1).delayMs], ['reconnecting', 1, 1000]);
});

test('close 1001 (gateway going away): one immediate free retry, then the normal schedule from attempt 1', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses } = makeService(t);
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().serverClose(1001, 'server shutting down');
  const s = statuses.at(-1);
  assert.deepEqual(
    { status: s.status, attempt: s.attempt, delayMs: s.delayMs, closeCode: s.closeCode, closeReason: s.closeReason, wasOpen: s.wasOpen },
    { status: 'reconnecting', attempt: 0, delayMs: 0, closeCode: 1001, closeReason: 'server shutting down', wasOpen: true },
  );
  timers.tick(0);
  await flush();
  assert.equal(FakeWebSocket.instances.length, 2, 'reconnects at once');
  // the replica behind the balancer is gone too: the normal schedule follows, with its full budget
  const delays = [];
  for (let i = 0; i < 5; i++) {
    FakeWebSocket.latest().failHandshake();
    delays.push([statuses.at(-1).attempt, statuses.at(-1).delayMs]);
    timers.tick(statuses.at(-1).delayMs);
    await flush();
  }
  assert.deepEqual(delays, [[1, 1000], [2, 2000], [3, 4000], [4, 8000], [5, 16000]]);
  FakeWebSocket.latest().open();
  assert.equal(svc.status, 'open');
  assert.equal(FakeWebSocket.instances.length, 7);
});

test('close 1008 with getToken: a new token is fetched before retrying', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses, errors } = makeService(t);
  let n = 0;
  svc.connect({ getToken: async () => `token-${++n}` });
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('token'), 'token-1');
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().serverClose(1008, 'token expired');
  assert.deepEqual([statuses.at(-1).status, statuses.at(-1).attempt, statuses.at(-1).delayMs, statuses.at(-1).closeCode], ['reconnecting', 1, 1000, 1008]);
  timers.tick(1000);
  await flush();
  assert.equal(n, 2);
  assert.equal(FakeWebSocket.latest().params.get('token'), 'token-2');
  assert.equal(FakeWebSocket.latest().params.get('user_id'), null);
  FakeWebSocket.latest().open();
  assert.equal(svc.status, 'open');
  assert.equal(errors.length, 0);
});

test('close 1008 without getToken (static token or user id): stop and report, no retry', async (t) => {
  for (const args of [{ token: 'static.jwt.token' }, { userId: 'u1' }]) {
    await t.test(Object.keys(args)[0], async (t) => {
      const timers = fakeTimers(t);
      const { svc, statuses, errors } = makeService(t);
      svc.connect(args);
      await flush();
      FakeWebSocket.latest().open();
      FakeWebSocket.latest().serverClose(1008, 'policy');
      assert.equal(svc.status, 'closed');
      assert.equal(statuses.at(-1).reason, 'policy');
      assert.equal(statuses.at(-1).closeCode, 1008);
      assert.equal(errors.length, 1);
      assert.equal(errors[0].kind, 'policy');
      assert.equal(errors[0].closeCode, 1008);
      timers.tick(60_000);
      await flush();
      assert.equal(FakeWebSocket.instances.length, 1);
    });
  }
});

test('refused handshake in JWT mode (never opened): stops with auth after authFailureAttempts, fresh token each try', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses, errors } = makeService(t);
  let n = 0;
  svc.connect({ getToken: () => `tok-${++n}` });
  await flush();
  FakeWebSocket.latest().failHandshake(); // e.g. HTTP 401: the browser only sees close 1006
  assert.deepEqual([statuses.at(-1).status, statuses.at(-1).attempt, statuses.at(-1).delayMs], ['reconnecting', 1, 1000]);
  timers.tick(1000);
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('token'), 'tok-2', 'the retry uses a fresh token');
  FakeWebSocket.latest().failHandshake();
  assert.equal(svc.status, 'closed');
  assert.equal(statuses.at(-1).reason, 'auth');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].kind, 'auth');
  assert.match(errors[0].message, /401/);
  assert.match(errors[0].message, /fresh/);
  timers.tick(10 * 60_000);
  await flush();
  assert.equal(n, 2, 'getToken not called again: no loop');
  assert.equal(FakeWebSocket.instances.length, 2);
});

test('refused handshake with a static expired token: auth error names the expiry', async (t) => {
  const timers = fakeTimers(t);
  const { svc, errors } = makeService(t, { authFailureAttempts: 3 });
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const token = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: 'u1', exp: 1000 })}.sig`;
  svc.connect({ token });
  await flush();
  for (let i = 0; i < 3; i++) {
    assert.equal(FakeWebSocket.latest().params.get('token'), token);
    FakeWebSocket.latest().failHandshake();
    timers.tick(60_000);
    await flush();
  }
  assert.equal(svc.status, 'closed');
  assert.equal(FakeWebSocket.instances.length, 3);
  assert.equal(errors[0].kind, 'auth');
  assert.match(errors[0].message, /static token/);
  assert.match(errors[0].message, /1970-01-01T00:16:40.000Z/);
});

test('JWT mode after a successful open: failures are an outage, normal budget, fresh token before each attempt', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses, errors } = makeService(t);
  let n = 0;
  svc.connect({ token: 'initial', getToken: async () => `fresh-${++n}` });
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('token'), 'initial', 'the given token is used first');
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().serverClose(1006);
  for (let i = 0; i < 5; i++) {
    timers.tick(statuses.at(-1).delayMs);
    await flush();
    assert.equal(FakeWebSocket.latest().params.get('token'), `fresh-${i + 1}`);
    FakeWebSocket.latest().failHandshake();
  }
  assert.equal(svc.status, 'closed');
  assert.equal(statuses.at(-1).reason, 'reconnect_exhausted');
  assert.equal(errors[0].kind, 'reconnect_exhausted');
});

test('insecure mode never opened: no auth shortcut, the full schedule runs', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses } = makeService(t);
  svc.connect('u1');
  await flush();
  for (let i = 0; i < 5; i++) {
    FakeWebSocket.latest().failHandshake();
    timers.tick(statuses.at(-1).delayMs);
    await flush();
  }
  FakeWebSocket.latest().failHandshake();
  assert.equal(statuses.at(-1).reason, 'reconnect_exhausted');
  assert.equal(FakeWebSocket.instances.length, 6);
});

test('an attempt that does not open within connectTimeoutMs counts as failed', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses } = makeService(t, { connectTimeoutMs: 5000 });
  svc.connect('u1');
  await flush();
  const first = FakeWebSocket.latest();
  timers.tick(4999);
  assert.equal(svc.status, 'connecting');
  timers.tick(1);
  assert.ok(first.closedByClient, 'the hanging socket is closed');
  assert.deepEqual([statuses.at(-1).status, statuses.at(-1).attempt, statuses.at(-1).closeCode], ['reconnecting', 1, 1006]);
  first.open(); // late events of the abandoned socket are ignored
  assert.equal(svc.status, 'reconnecting');
  timers.tick(1000);
  await flush();
  assert.equal(FakeWebSocket.instances.length, 2);
});

test('getToken failure: reported as kind token and retried on the schedule', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses, errors } = makeService(t);
  let n = 0;
  svc.connect({
    getToken: async () => {
      if (++n === 1) throw new Error('token endpoint down');
      return 'good';
    },
  });
  await flush();
  assert.equal(FakeWebSocket.instances.length, 0);
  assert.equal(errors[0].kind, 'token');
  assert.match(errors[0].message, /token endpoint down/);
  assert.deepEqual([statuses.at(-1).status, statuses.at(-1).attempt, statuses.at(-1).delayMs], ['reconnecting', 1, 1000]);
  timers.tick(1000);
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('token'), 'good');
  FakeWebSocket.latest().open();
  assert.equal(svc.status, 'open');
});

test('disconnect() cancels a pending retry and closes with 1000', async (t) => {
  const timers = fakeTimers(t);
  const { svc, statuses } = makeService(t);
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().failHandshake();
  svc.disconnect();
  assert.equal(svc.status, 'closed');
  assert.equal(statuses.at(-1).reason, 'disconnect');
  timers.tick(60_000);
  await flush();
  assert.equal(FakeWebSocket.instances.length, 1);

  svc.connect('u1');
  await flush();
  const ws = FakeWebSocket.latest();
  ws.open();
  svc.disconnect();
  assert.deepEqual(ws.closedByClient, { code: 1000, reason: 'client disconnect' });
  ws.serverClose(1000); // the close event that follows must not trigger a reconnect
  timers.tick(60_000);
  await flush();
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.equal(svc.status, 'closed');
});

test('disconnect() while getToken is pending: no socket is created afterwards', async (t) => {
  fakeTimers(t);
  const { svc } = makeService(t);
  let resolveToken;
  svc.connect({ getToken: () => new Promise((r) => (resolveToken = r)) });
  svc.disconnect();
  resolveToken('late');
  await flush();
  assert.equal(FakeWebSocket.instances.length, 0);
});

test('maxReconnectAttempts 0: no reconnect at all', async (t) => {
  fakeTimers(t);
  const { svc, statuses } = makeService(t);
  svc.connect({ userId: 'u1', maxReconnectAttempts: 0 });
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().serverClose(1011);
  assert.equal(svc.status, 'closed');
  assert.equal(statuses.at(-1).reason, 'reconnect_exhausted');
});
