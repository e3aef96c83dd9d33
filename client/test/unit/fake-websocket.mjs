// A scripted stand-in for the browser's WebSocket, driven by the unit tests.
export class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  /** Every socket created, in order. */
  static instances = [];

  static reset() {
    FakeWebSocket.instances = [];
  }

  static latest() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url) {
    this.url = url;
    this.readyState = FakeWebSocket.CONNECTING;
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
    /** Set when the client called close(). */
    this.closedByClient = null;
    FakeWebSocket.instances.push(this);
  }

  /** The query parameters of the URL the client connected to. */
  get params() {
    return new URL(this.url).searchParams;
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= FakeWebSocket.CLOSING) return;
    this.closedByClient = { code, reason };
    this.readyState = FakeWebSocket.CLOSED;
  }

  // --- what the "server"/network does -----------------------------------------------------------

  /** The handshake succeeded. */
  open() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({ type: 'open' });
  }

  /** The handshake was refused (HTTP 401) or the server is unreachable: browsers see error + close 1006. */
  failHandshake() {
    this.readyState = FakeWebSocket.CLOSED;
    this.onerror?.({ type: 'error' });
    this.onclose?.({ type: 'close', code: 1006, reason: '', wasClean: false });
  }

  /** The server closed an open connection. */
  serverClose(code, reason = '') {
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.({ type: 'close', code, reason, wasClean: code !== 1006 });
  }

  /** The server sent a frame (objects are JSON-encoded; strings and other values are sent as they are). */
  receive(data) {
    this.onmessage?.({ type: 'message', data: typeof data === 'object' && data !== null && !(data instanceof ArrayBuffer) ? JSON.stringify(data) : data });
  }
}
