import { FakeWebSocket } from './fake-websocket.mjs';
import { WebSocketService } from '../../dist/websocketService.js';

/** Lets pending promise callbacks run (setImmediate is not faked by the tests' mock timers). */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/**
 * A service wired to FakeWebSocket, with every status change and error recorded.
 * `random` defaults to 0.5, i.e. no jitter offset, so delays equal their nominal values.
 */
export function makeService(t, { random = () => 0.5, ...defaults } = {}) {
  FakeWebSocket.reset();
  const svc = new WebSocketService({ url: 'ws://gateway.test/ws', WebSocket: FakeWebSocket, random, ...defaults });
  const statuses = [];
  const errors = [];
  svc.onStatusChange((status, detail) => statuses.push({ status, ...detail }));
  svc.onError((e) => errors.push(e));
  t.after(() => svc.disconnect());
  return { svc, statuses, errors };
}

/** Enables fake setTimeout/clearTimeout for this test. */
export function fakeTimers(t) {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  return t.mock.timers;
}

export { FakeWebSocket };
