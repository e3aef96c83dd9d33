/**
 * wsnotify browser client: `webSocketService`.
 *
 * Connects a page to the wsnotify gateway (RabbitMQ -> WebSocket), parses each notification frame
 * once and hands it to the handlers subscribed to its `type`, and reconnects with exponential
 * backoff and jitter. No runtime dependencies; works from a plain `<script type="module">` and
 * from a bundler.
 *
 * ```ts
 * import webSocketService from './services/websocketService';
 * webSocketService.connect(userId);                       // insecure mode: ?user_id=
 * webSocketService.subscribe('welcome', (data) => console.log('Welcome message:', data));
 * ```
 *
 * The reconnection rules (close codes 1001 / 1008, refused handshakes) are documented on
 * {@link ConnectOptions} and in client/README.md.
 *
 * Recovery (contract §5): the service remembers the `id` of the last notification it handed to
 * the app (in memory, and in `sessionStorage` so that a reload of the tab recovers too) and
 * reconnects with `?since=<id>`; the gateway then replays what was missed before any live frame.
 * {@link WebSocketService.onRecovery} tells the app whether the gap was covered, i.e. when it
 * must reload its state from its backend.
 */

/** Connection status reported to {@link WebSocketService.onStatusChange} listeners. */
export type ConnectionStatus = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** One notification frame as sent by the gateway (contract section 3). */
export interface NotificationFrame<T = unknown> {
  /** Message id: the same on every replica and every recipient of one message. */
  id: string;
  /** The publisher's `message_type`. */
  type: string;
  /** The receiving user's id; absent for broadcasts. */
  user_id?: string;
  /** RFC 3339 UTC time at which the gateway took the message in. */
  timestamp: string;
  /** The publisher's `data`, unchanged (`null` when the publisher sent none). */
  data: T;
}

/** Receives the frame's `data` first (the seed's handlers take only that) and the whole frame second. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type NotificationHandler<T = any> = (data: T, frame: NotificationFrame<T>) => void;

/** What went wrong; see {@link WebSocketServiceError}. */
export type ErrorKind =
  /** A frame that is not a JSON object with a string `type` (or a binary frame). Dropped. */
  | 'malformed_frame'
  /** A subscribed handler threw. The other handlers still ran. */
  | 'handler'
  /** A status listener threw. */
  | 'status_listener'
  /** A recovery listener threw. */
  | 'recovery_listener'
  /** `getToken()` threw, rejected or returned something other than a non-empty string. Counts as a failed attempt. */
  | 'token'
  /** The handshake was refused before the first open (most likely HTTP 401). The service stopped. */
  | 'auth'
  /** The gateway closed with 1008 (policy violation) and there is no `getToken` to fetch new credentials. The service stopped. */
  | 'policy'
  /** `maxReconnectAttempts` consecutive reconnect attempts failed. The service stopped. */
  | 'reconnect_exhausted'
  /** The WebSocket could not even be constructed (bad URL, no WebSocket implementation). The service stopped. */
  | 'config';

/** Passed to error listeners. Never thrown by the service itself. */
export class WebSocketServiceError extends Error {
  /** What went wrong. */
  kind: ErrorKind;
  /** The close code that led to this error, when there was one. */
  closeCode?: number;
  /** The close reason that led to this error, when there was one. */
  closeReason?: string;
  /** The parsed frame whose handler threw (`kind === 'handler'`). */
  frame?: NotificationFrame;
  /** The raw message data (`kind === 'malformed_frame'`). */
  raw?: unknown;
  /** The underlying exception, when there was one. */
  cause?: unknown;

  constructor(
    kind: ErrorKind,
    message: string,
    extra: { closeCode?: number; closeReason?: string; frame?: NotificationFrame; raw?: unknown; cause?: unknown } = {},
  ) {
    super(message);
    this.name = 'WebSocketServiceError';
    this.kind = kind;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    if (extra.closeReason !== undefined) this.closeReason = extra.closeReason;
    if (extra.frame !== undefined) this.frame = extra.frame;
    if ('raw' in extra) this.raw = extra.raw;
    if ('cause' in extra) this.cause = extra.cause;
  }
}

export type ErrorListener = (error: WebSocketServiceError) => void;

/** Why the service reached status `closed`. */
export type ClosedReason = 'disconnect' | 'auth' | 'policy' | 'reconnect_exhausted' | 'config';

/** Second argument of status listeners. */
export interface StatusDetail {
  /**
   * `connecting`: 0. `open`: the attempt number that opened (0 = first attempt of this
   * `connect()` or the free retry after a 1001). `reconnecting`: the number of the scheduled
   * attempt, 1..maxReconnectAttempts, counted against the budget; 0 for the free immediate retry
   * after a 1001 close.
   */
  attempt: number;
  /** The configured `maxReconnectAttempts`. */
  maxAttempts: number;
  /** `reconnecting` only: milliseconds until the scheduled attempt starts (jitter included). */
  delayMs?: number;
  /** The close code of the socket whose end caused this status (1006 for a refused handshake or a lost connection). */
  closeCode?: number;
  /** The close reason of that socket. */
  closeReason?: string;
  /** Whether the socket whose end caused this status had been open. */
  wasOpen?: boolean;
  /** `closed` only: why. */
  reason?: ClosedReason;
}

export type StatusListener = (status: ConnectionStatus, detail: StatusDetail) => void;

/**
 * Passed to {@link WebSocketService.onRecovery} listeners when a connection opens that follows an
 * earlier one: after every reconnect, and on the first connection of a `connect()` when an id is
 * remembered for that user (from before a reload of the tab, or from an earlier `connect()`).
 */
export interface RecoveryEvent {
  /**
   * `true`: every notification since `since` reaches the handlers, the `missed` ones first (in
   * their original order, as first sent), then live ones: nothing to reload. `false`: the
   * gateway could not vouch for the gap (`since` older than its recovery window, unknown to it,
   * or too much to replay), or the service had no id to ask with (`since: null`): notifications
   * may have been missed, so reload the state from the backend.
   */
  recovered: boolean;
  /** How many missed notifications are replayed before live ones (0 when not recovered). */
  missed: number;
  /**
   * The id the service reconnected with (`?since=`): the last notification the handlers got.
   * `null` when it reconnected without one (no notification received yet, or `recovery: false`).
   */
  since: string | null;
}

export type RecoveryListener = (event: RecoveryEvent) => void;

/** The subset of the browser's WebSocket that the service uses (lets tests and Node inject another implementation). */
export interface WebSocketLike {
  readonly readyState: number;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onopen: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onmessage: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onclose: ((ev: any) => any) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onerror: ((ev: any) => any) | null;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Backoff parameters, see {@link backoffDelay}. */
export interface BackoffOptions {
  initialDelayMs: number;
  backoffFactor: number;
  maxDelayMs: number;
  /** Ratio in [0, 1]: each delay is spread uniformly over ±jitter around its nominal value. */
  jitter: number;
}

/**
 * Options of {@link WebSocketService.connect}. Give `userId` (insecure mode, `?user_id=`) or
 * `token` and/or `getToken` (JWT mode, `?token=`), not both.
 *
 * Reconnection rules:
 * - An open connection that closes with **1001** (gateway going away) is retried **at once**
 *   (delay 0) — the load balancer sends it to another replica. This retry is free: it does not
 *   count against `maxReconnectAttempts`. If it fails, the normal schedule follows from attempt 1.
 * - An open connection that closes with **1008** (policy violation, e.g. token expired): with
 *   `getToken`, a new token is fetched and the connection retried on the normal schedule; without
 *   it (static `token` or `userId`) retrying the same credentials cannot help, so the service
 *   stops (status `closed`, error kind `policy`).
 * - Any other close of an open connection, and any failed attempt, is retried on the schedule
 *   `attempt n` → `min(initialDelayMs·backoffFactor^(n-1), maxDelayMs/(1+jitter))·(1 ± jitter)`,
 *   n = 1..maxReconnectAttempts (attempt 0 being the first connection). The counter resets when a
 *   connection opens. When the budget is spent the service stops (`closed`, `reconnect_exhausted`).
 * - **Refused handshake.** A browser is not told the HTTP status of a refused WebSocket handshake:
 *   a 401 and an unreachable gateway both show up as a close with code 1006 and no `open` event.
 *   The rule: in JWT mode, if the connection has **never opened since `connect()`** and
 *   `authFailureAttempts` (default 2) consecutive attempts closed without opening — each with a
 *   freshly fetched token when `getToken` is given — the credentials are taken as refused: the
 *   service stops (status `closed`, error kind `auth`) instead of retrying. Once a connection has
 *   opened, the credentials are known to have worked, so failures to reconnect are treated as an
 *   outage (the normal schedule, a fresh token before each attempt). Insecure mode (`userId`) has
 *   no credentials to be wrong, so it always follows the normal schedule.
 */
export interface ConnectOptions {
  /**
   * Gateway WebSocket URL, e.g. `wss://notify.example.com/ws`. May be relative to the page
   * (`/ws`); `http(s):` is turned into `ws(s):`. Default: `ws(s)://<location.host>/ws`.
   */
  url?: string;
  /** Insecure mode: sent as `?user_id=`. */
  userId?: string;
  /** JWT mode: a token for the first attempt (and every attempt, if there is no `getToken`). */
  token?: string;
  /** JWT mode: called before every attempt (after the first, if `token` is also given); may return a promise. */
  getToken?: () => string | Promise<string>;
  /** Reconnect attempts after a connection is lost (or the first attempt fails). Default 5. `Infinity` allowed. */
  maxReconnectAttempts?: number;
  /** Nominal delay before reconnect attempt 1. Default 1000 ms. */
  initialDelayMs?: number;
  /** Each further attempt waits this many times longer. Default 2. */
  backoffFactor?: number;
  /** Upper bound of any delay, jitter included. Default 30000 ms. */
  maxDelayMs?: number;
  /** Jitter ratio in [0, 1]. Default 0.2 (±20 %). */
  jitter?: number;
  /** An attempt that has not opened after this long is abandoned and counts as failed. Default 10000 ms. */
  connectTimeoutMs?: number;
  /** JWT mode: consecutive never-opened attempts before the first open after which the service stops with `auth`. Default 2. */
  authFailureAttempts?: number;
  /** Error listener for this connection (in addition to those added with `onError()`). */
  onError?: ErrorListener;
  /** WebSocket implementation. Default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Random source for jitter, returning [0, 1). Default `Math.random`. */
  random?: () => number;
  /**
   * Recovery (contract §5): reconnect with `?since=<id of the last notification handed to the
   * handlers>`, so that the gateway replays what was missed. Default `true`. With `false`, no
   * `since` is sent (and nothing is stored); every reconnect is reported to
   * {@link WebSocketService.onRecovery} as `recovered: false`.
   */
  recovery?: boolean;
  /**
   * Also keep that id in `sessionStorage` (per tab; key: gateway URL + user id), so that the
   * first `connect()` after a reload of the tab recovers too. Default `true`; `false` keeps it in
   * memory only. Where `sessionStorage` is unavailable or throws (privacy modes, sandboxed
   * frames, quota), the service keeps the id in memory only.
   */
  persistLastId?: boolean;
}

interface ResolvedOptions {
  baseUrl: string;
  userId?: string;
  token?: string;
  getToken?: () => string | Promise<string>;
  backoff: BackoffOptions;
  maxReconnectAttempts: number;
  connectTimeoutMs: number;
  authFailureAttempts: number;
  onError?: ErrorListener;
  WebSocket: WebSocketConstructor;
  random: () => number;
  recovery: boolean;
  persistLastId: boolean;
}

/** The last notification id handed to the app, for one gateway URL and user. */
interface Position {
  /** `sessionStorage` key: gateway URL + user id. */
  key: string;
  id: string | undefined;
}

/** What one connection attempt asks for. */
interface AttemptUrl {
  url: string;
  token?: string;
  /** The `since` sent, if any. */
  since?: string;
}

interface Subscription {
  handler: NotificationHandler;
  active: boolean;
}

const DEFAULTS = {
  maxReconnectAttempts: 5,
  initialDelayMs: 1000,
  backoffFactor: 2,
  maxDelayMs: 30000,
  jitter: 0.2,
  connectTimeoutMs: 10000,
  authFailureAttempts: 2,
};

/**
 * Delay before reconnect attempt `attempt` (1-based):
 * `min(initialDelayMs·backoffFactor^(attempt-1), maxDelayMs/(1+jitter)) · (1 - jitter + 2·jitter·random())`.
 * The nominal value is capped at `maxDelayMs/(1+jitter)` so that the jittered delay never exceeds
 * `maxDelayMs` and delays at the cap stay spread out instead of piling up on the cap.
 */
export function backoffDelay(attempt: number, options: BackoffOptions, random: () => number = Math.random): number {
  const jitter = Math.min(1, Math.max(0, Number.isFinite(options.jitter) ? options.jitter : 0));
  const maxDelay = Math.max(0, options.maxDelayMs);
  const nominal = options.initialDelayMs * Math.pow(options.backoffFactor, Math.max(0, attempt - 1));
  const base = Math.min(nominal, maxDelay / (1 + jitter));
  const r = Math.min(1, Math.max(0, random()));
  const delay = base * (1 - jitter + 2 * jitter * r);
  return Math.max(0, Math.min(maxDelay, Math.round(delay)));
}

function isNonNegativeNumber(v: unknown): v is number {
  return typeof v === 'number' && !Number.isNaN(v) && v >= 0;
}

const encoder = new TextEncoder();

function byteLength(s: string): number {
  return encoder.encode(s).length;
}

/** Longest `since` the gateway takes (contract §5); a longer id cannot be resumed from. */
const MAX_SINCE_BYTES = 64;

/** Frame types with this prefix are the gateway's own (contract §1, §5), never notifications. */
const CONTROL_PREFIX = 'wsnotify.';

function usableSince(id: unknown): id is string {
  return typeof id === 'string' && id.length > 0 && id.length <= MAX_SINCE_BYTES && byteLength(id) <= MAX_SINCE_BYTES;
}

/** `getItem`/`setItem`/`removeItem` of the Web Storage API. */
interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** The page's `sessionStorage`, or null where there is none or merely touching it throws (privacy modes, sandboxed frames). */
function sessionStore(): StorageLike | null {
  try {
    const s = (globalThis as { sessionStorage?: StorageLike }).sessionStorage;
    return s && typeof s.getItem === 'function' && typeof s.setItem === 'function' ? s : null;
  } catch {
    return null;
  }
}

/** One key per gateway URL and user: another user in the same tab must not resume from this one's id. */
function positionKey(baseUrl: string, user: string): string {
  return `wsnotify:lastId:${JSON.stringify([baseUrl, user])}`;
}

function pageLocation(): { href: string; protocol: string; host: string } | undefined {
  const loc = (globalThis as { location?: { href: string; protocol: string; host: string } }).location;
  return loc && typeof loc.href === 'string' && loc.host ? loc : undefined;
}

function resolveBaseUrl(url: string | undefined): string {
  const loc = pageLocation();
  if (url === undefined || url === '') {
    if (!loc) {
      throw new TypeError('webSocketService: no `url` given and there is no page location to derive ws(s)://<host>/ws from');
    }
    return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws`;
  }
  let u: URL;
  try {
    u = loc ? new URL(url, loc.href) : new URL(url);
  } catch {
    throw new TypeError(`webSocketService: invalid url ${JSON.stringify(url)}`);
  }
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') {
    throw new TypeError(`webSocketService: url must be ws:, wss:, http: or https:, got ${JSON.stringify(url)}`);
  }
  return u.toString();
}

function withParam(baseUrl: string, name: string, value: string): string {
  const u = new URL(baseUrl);
  u.searchParams.set(name, value);
  return u.toString();
}

/**
 * The unverified claims of a JWT, if they can be read: `exp` only makes error messages more
 * helpful, `sub` (the user id, contract §2) keys the remembered notification id. Nothing here
 * is trusted; the gateway checks the token.
 */
function jwtClaims(token: string): { exp?: unknown; sub?: unknown } {
  try {
    const part = token.split('.')[1];
    if (!part) return {};
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0));
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    return claims !== null && typeof claims === 'object' ? (claims as { exp?: unknown; sub?: unknown }) : {};
  } catch {
    return {};
  }
}

function jwtExp(token: string): number | undefined {
  const exp = jwtClaims(token).exp;
  return typeof exp === 'number' ? exp : undefined;
}

/**
 * A WebSocket notification client. The default export is one shared instance; create more with
 * `new WebSocketService()` or {@link createWebSocketService}.
 *
 * Subscriptions and listeners belong to the instance, not to a connection: they survive
 * reconnects, `disconnect()` and later `connect()` calls, and may be added before connecting.
 */
export class WebSocketService {
  private defaults: ConnectOptions;
  private readonly subscriptions = new Map<string, Set<Subscription>>();
  private readonly statusListeners = new Set<StatusListener>();
  private readonly errorListeners = new Set<ErrorListener>();
  private readonly recoveryListeners = new Set<RecoveryListener>();

  private opts: ResolvedOptions | null = null;
  private connectKey: unknown[] | null = null;
  private ws: WebSocketLike | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private openTimer: ReturnType<typeof setTimeout> | null = null;
  /** Bumped by connect()/disconnect()/stop: callbacks of an older session are ignored. */
  private session = 0;
  /** Bumped per socket: callbacks of an older socket are ignored. */
  private socketSeq = 0;
  private currentStatus: ConnectionStatus = 'closed';
  /** Reconnect attempts (counted against the budget) since the last open. */
  private attempt = 0;
  private everOpened = false;
  private neverOpenedFailures = 0;
  private tokenUsedOnce = false;
  /** The last notification id handed to the app, for the identity of the latest attempt. */
  private position: Position | null = null;
  /** Set when writing `sessionStorage` failed: from then on the id is kept in memory only. */
  private storageFailed = false;

  constructor(defaults: ConnectOptions = {}) {
    this.defaults = { ...defaults };
  }

  /** Current status (`closed` before the first `connect()`). */
  get status(): ConnectionStatus {
    return this.currentStatus;
  }

  /** True while a connection is open. */
  get isConnected(): boolean {
    return this.currentStatus === 'open';
  }

  /**
   * The `id` of the last notification handed to the handlers (for the user of the latest
   * connection attempt): what the next reconnect sends as `since`. `undefined` before any.
   */
  get lastId(): string | undefined {
    return this.position?.id;
  }

  /**
   * Sets defaults merged under the options of every later `connect()` call, e.g.
   * `webSocketService.configure({ url: 'wss://notify.example.com/ws' })` once at start-up so the
   * seed's `webSocketService.connect(userId)` works unchanged. Does not affect a live connection.
   */
  configure(defaults: ConnectOptions): void {
    this.defaults = { ...this.defaults, ...defaults };
  }

  /**
   * Connects. `connect(userId)` is the seed's insecure mode (`?user_id=`);
   * `connect({ url, token | getToken, ... })` is JWT mode. Connecting again with the same
   * arguments while not `closed` is a no-op (so a React effect that runs twice is harmless);
   * with different arguments the current connection is closed and a new one started.
   * Throws a `TypeError` only for programming errors (no credentials, both a user id and a token,
   * an invalid URL or no WebSocket implementation); everything later is reported through status
   * and error listeners.
   */
  connect(userIdOrOptions: string | ConnectOptions): void {
    const given: ConnectOptions = typeof userIdOrOptions === 'string' ? { userId: userIdOrOptions } : { ...userIdOrOptions };
    const o: ConnectOptions = { ...this.defaults, ...given };
    // Credentials given in this call replace the other kind from configure() defaults.
    if (given.userId !== undefined) {
      if (given.token === undefined) delete o.token;
      if (given.getToken === undefined) delete o.getToken;
    } else if (given.token !== undefined || given.getToken !== undefined) {
      delete o.userId;
    }

    const hasToken = o.token !== undefined || o.getToken !== undefined;
    if (o.userId !== undefined && hasToken) {
      throw new TypeError('webSocketService.connect: give either userId (insecure mode) or token/getToken (JWT mode), not both');
    }
    if (o.userId !== undefined) {
      if (typeof o.userId !== 'string' || o.userId.length === 0 || byteLength(o.userId) > 128) {
        throw new TypeError('webSocketService.connect: userId must be a string of 1-128 bytes');
      }
    } else if (!hasToken) {
      throw new TypeError('webSocketService.connect: needs a user id (insecure mode) or token/getToken (JWT mode)');
    }
    if (o.token !== undefined && (typeof o.token !== 'string' || o.token.length === 0)) {
      throw new TypeError('webSocketService.connect: token must be a non-empty string');
    }
    if (o.getToken !== undefined && typeof o.getToken !== 'function') {
      throw new TypeError('webSocketService.connect: getToken must be a function');
    }
    const WebSocketImpl = o.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (typeof WebSocketImpl !== 'function') {
      throw new TypeError('webSocketService.connect: no WebSocket implementation (pass options.WebSocket)');
    }
    const num = (name: keyof typeof DEFAULTS): number => {
      const v = (o as Record<string, unknown>)[name];
      if (v === undefined) return DEFAULTS[name];
      if (!isNonNegativeNumber(v)) throw new TypeError(`webSocketService.connect: ${name} must be a number >= 0`);
      return v;
    };
    const resolved: ResolvedOptions = {
      baseUrl: resolveBaseUrl(o.url),
      userId: o.userId,
      token: o.token,
      getToken: o.getToken,
      backoff: {
        initialDelayMs: num('initialDelayMs'),
        backoffFactor: num('backoffFactor'),
        maxDelayMs: num('maxDelayMs'),
        jitter: Math.min(1, num('jitter')),
      },
      maxReconnectAttempts: num('maxReconnectAttempts'),
      connectTimeoutMs: num('connectTimeoutMs'),
      authFailureAttempts: Math.max(1, num('authFailureAttempts')),
      onError: o.onError,
      WebSocket: WebSocketImpl,
      random: o.random ?? Math.random,
      recovery: o.recovery ?? true,
      persistLastId: o.persistLastId ?? true,
    };

    const key = [resolved.baseUrl, resolved.userId, resolved.token, resolved.getToken];
    if (
      this.currentStatus !== 'closed' &&
      this.connectKey !== null &&
      key.length === this.connectKey.length &&
      key.every((v, i) => v === this.connectKey![i])
    ) {
      this.opts = resolved; // pick up changed tuning, keep the connection
      return;
    }

    this.teardown();
    this.session++;
    this.opts = resolved;
    this.connectKey = key;
    this.attempt = 0;
    this.everOpened = false;
    this.neverOpenedFailures = 0;
    this.tokenUsedOnce = false;
    this.setStatus('connecting', { attempt: 0, maxAttempts: resolved.maxReconnectAttempts });
    this.startAttempt(this.session, 0);
  }

  /**
   * Closes the connection (code 1000) and stops reconnecting. Status becomes `closed` with reason
   * `disconnect`. Subscriptions are kept for a later `connect()`.
   */
  disconnect(): void {
    this.session++;
    this.teardown();
    this.connectKey = null;
    if (this.currentStatus !== 'closed') {
      this.setStatus('closed', { attempt: this.attempt, maxAttempts: this.opts?.maxReconnectAttempts ?? 0, reason: 'disconnect' });
    }
  }

  /**
   * Calls `handler(data, frame)` for every frame whose `type` is `type`; `'*'` receives every
   * frame. Several handlers per type are allowed (each subscription is called once per frame,
   * type-specific handlers before `'*'` ones, each in subscription order). A handler that throws
   * is reported (error kind `handler`) and does not affect the others. Returns the unsubscribe
   * function (idempotent).
   */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  subscribe<T = any>(type: string, handler: NotificationHandler<T>): () => void {
    if (typeof type !== 'string' || type.length === 0) throw new TypeError('webSocketService.subscribe: type must be a non-empty string');
    if (typeof handler !== 'function') throw new TypeError('webSocketService.subscribe: handler must be a function');
    const sub: Subscription = { handler: handler as NotificationHandler, active: true };
    let set = this.subscriptions.get(type);
    if (!set) {
      set = new Set();
      this.subscriptions.set(type, set);
    }
    set.add(sub);
    return () => {
      if (!sub.active) return;
      sub.active = false;
      const s = this.subscriptions.get(type);
      if (s) {
        s.delete(sub);
        if (s.size === 0) this.subscriptions.delete(type);
      }
    };
  }

  /**
   * Calls `listener(status, detail)` on every status change, and on every scheduled reconnect
   * attempt (`reconnecting` is reported once per attempt, with its `attempt` and `delayMs`).
   * Not called with the current status on registration; read `status` for that. Returns the
   * unsubscribe function.
   */
  onStatusChange(listener: StatusListener): () => void {
    if (typeof listener !== 'function') throw new TypeError('webSocketService.onStatusChange: listener must be a function');
    const wrapped: StatusListener = (s, d) => listener(s, d);
    this.statusListeners.add(wrapped);
    return () => {
      this.statusListeners.delete(wrapped);
    };
  }

  /**
   * Calls `listener({ recovered, missed, since })` whenever a connection opens that follows an
   * earlier one: after each reconnect (1001, a network drop, a retry, a token refresh), and on
   * the first connection of a `connect()` when an id is remembered for that user (from before a
   * reload of the tab, or from an earlier `connect()`). It runs before the
   * replayed notifications reach the handlers. When `recovered` is `false`, notifications may
   * have been missed: reload the state from the backend. Returns the unsubscribe function.
   */
  onRecovery(listener: RecoveryListener): () => void {
    if (typeof listener !== 'function') throw new TypeError('webSocketService.onRecovery: listener must be a function');
    const wrapped: RecoveryListener = (e) => listener(e);
    this.recoveryListeners.add(wrapped);
    return () => {
      this.recoveryListeners.delete(wrapped);
    };
  }

  /**
   * Adds an error listener (malformed frames, handler exceptions, and why the service stopped).
   * With no listener at all, errors go to `console.error`. Returns the unsubscribe function.
   */
  onError(listener: ErrorListener): () => void {
    if (typeof listener !== 'function') throw new TypeError('webSocketService.onError: listener must be a function');
    const wrapped: ErrorListener = (e) => listener(e);
    this.errorListeners.add(wrapped);
    return () => {
      this.errorListeners.delete(wrapped);
    };
  }

  // ---------------------------------------------------------------------------------------------

  private teardown(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    if (this.openTimer !== null) clearTimeout(this.openTimer);
    this.retryTimer = null;
    this.openTimer = null;
    const ws = this.ws;
    this.ws = null;
    this.socketSeq++;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, 'client disconnect');
      } catch {
        /* already closed */
      }
    }
  }

  private setStatus(status: ConnectionStatus, detail: StatusDetail): void {
    if (status === this.currentStatus && status !== 'reconnecting') return;
    this.currentStatus = status;
    for (const listener of Array.from(this.statusListeners)) {
      try {
        listener(status, detail);
      } catch (cause) {
        this.emitError(new WebSocketServiceError('status_listener', `status listener threw: ${String(cause)}`, { cause }));
      }
    }
  }

  private emitRecovery(event: RecoveryEvent): void {
    for (const listener of Array.from(this.recoveryListeners)) {
      try {
        listener({ ...event });
      } catch (cause) {
        this.emitError(new WebSocketServiceError('recovery_listener', `recovery listener threw: ${String(cause)}`, { cause }));
      }
    }
  }

  private emitError(error: WebSocketServiceError): void {
    const listeners: ErrorListener[] = Array.from(this.errorListeners);
    if (this.opts?.onError) listeners.unshift(this.opts.onError);
    if (listeners.length === 0) {
      console.error('[webSocketService]', error);
      return;
    }
    for (const listener of listeners) {
      try {
        listener(error);
      } catch (e) {
        console.error('[webSocketService] error listener threw', e);
      }
    }
  }

  /** Ends the session with status `closed` and reports why. */
  private stop(reason: ClosedReason, error: WebSocketServiceError, detail: Partial<StatusDetail> = {}): void {
    this.session++;
    this.teardown();
    this.connectKey = null;
    this.setStatus('closed', { attempt: this.attempt, maxAttempts: this.opts?.maxReconnectAttempts ?? 0, ...detail, reason });
    this.emitError(error);
  }

  /** The URL of the next attempt: credentials, and `since` when there is an id to resume from. */
  private async attemptUrl(o: ResolvedOptions): Promise<AttemptUrl> {
    const { url, token } = await this.credentialUrl(o);
    // The user this attempt connects as: the user id, or the token's `sub`.
    const user = o.userId ?? (token !== undefined ? jwtClaims(token).sub : undefined);
    const since = this.positionFor(o, typeof user === 'string' && user.length > 0 ? user : undefined);
    return since === undefined ? { url, token } : { url: withParam(url, 'since', since), token, since };
  }

  /**
   * Points `position` at `user` (taking the id remembered for it in memory or, after a reload,
   * in `sessionStorage`) and returns the `since` to send, if any.
   */
  private positionFor(o: ResolvedOptions, user: string | undefined): string | undefined {
    if (user === undefined) {
      this.position = null; // no identity to key it by (a JWT without `sub`): nothing to resume
      return undefined;
    }
    const key = positionKey(o.baseUrl, user);
    if (this.position?.key !== key) {
      let stored: string | null = null;
      if (o.recovery && o.persistLastId) {
        try {
          stored = sessionStore()?.getItem(key) ?? null;
        } catch {
          /* unavailable: memory only */
        }
      }
      this.position = { key, id: usableSince(stored) ? stored : undefined };
    }
    return o.recovery ? this.position.id : undefined;
  }

  /** Records `id` as the last notification handed to the app (before its handlers run). */
  private remember(id: unknown): void {
    const p = this.position;
    if (!p) return;
    // An id that cannot be sent as `since` must still replace the older one: resuming from that
    // would hand the app again what it already has.
    p.id = usableSince(id) ? id : undefined;
    const o = this.opts;
    if (!o || !o.recovery || !o.persistLastId || this.storageFailed) return;
    const store = sessionStore();
    if (!store) return;
    try {
      if (p.id === undefined) store.removeItem(p.key);
      else store.setItem(p.key, p.id);
    } catch {
      // Quota or privacy mode: a stale stored id would replay notifications already handled
      // after a reload, so drop it and keep the id in memory only.
      this.storageFailed = true;
      try {
        store.removeItem(p.key);
      } catch {
        /* nothing more to do */
      }
    }
  }

  private async credentialUrl(o: ResolvedOptions): Promise<{ url: string; token?: string }> {
    if (o.userId !== undefined) return { url: withParam(o.baseUrl, 'user_id', o.userId) };
    let token: unknown;
    if (o.getToken && (o.token === undefined || this.tokenUsedOnce)) {
      token = await o.getToken();
      if (typeof token !== 'string' || token.length === 0) {
        throw new Error(`getToken() returned ${token === '' ? 'an empty string' : typeof token}, expected a non-empty string`);
      }
    } else {
      token = o.token;
    }
    this.tokenUsedOnce = true;
    return { url: withParam(o.baseUrl, 'token', token as string), token: token as string };
  }

  private startAttempt(session: number, attemptNumber: number): void {
    const o = this.opts!;
    const seq = ++this.socketSeq;
    const current = () => session === this.session && seq === this.socketSeq;
    this.attemptUrl(o).then(
      ({ url, token, since }) => {
        if (!current()) return;
        let ws: WebSocketLike;
        try {
          ws = new o.WebSocket(url);
        } catch (cause) {
          this.stop('config', new WebSocketServiceError('config', `could not create WebSocket for ${o.baseUrl}: ${String(cause)}`, { cause }));
          return;
        }
        this.ws = ws;
        let opened = false;
        if (o.connectTimeoutMs > 0 && Number.isFinite(o.connectTimeoutMs)) {
          this.openTimer = setTimeout(() => {
            this.openTimer = null;
            if (!current() || opened) return;
            this.ws = null;
            this.socketSeq++; // ignore this socket's late events
            ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
            try {
              ws.close();
            } catch {
              /* ignore */
            }
            this.handleClose(session, 1006, `no open within ${o.connectTimeoutMs} ms`, false, token);
          }, o.connectTimeoutMs);
        }
        ws.onopen = () => {
          if (!current()) return;
          opened = true;
          if (this.openTimer !== null) clearTimeout(this.openTimer);
          this.openTimer = null;
          const reconnected = this.everOpened;
          this.everOpened = true;
          this.neverOpenedFailures = 0;
          this.attempt = 0;
          this.setStatus('open', { attempt: attemptNumber, maxAttempts: o.maxReconnectAttempts });
          // With `since`, the gateway's recovery frame reports the outcome. Without one, nobody
          // can vouch for what was sent while the previous connection was down.
          if (reconnected && since === undefined && current()) this.emitRecovery({ recovered: false, missed: 0, since: null });
        };
        ws.onmessage = (ev: { data: unknown }) => {
          if (!current()) return;
          this.dispatch(ev.data, since);
        };
        ws.onerror = () => {
          /* a close event follows; nothing to do here */
        };
        ws.onclose = (ev: { code?: number; reason?: string }) => {
          if (!current()) return;
          if (this.openTimer !== null) clearTimeout(this.openTimer);
          this.openTimer = null;
          this.ws = null;
          this.socketSeq++;
          this.handleClose(session, typeof ev?.code === 'number' ? ev.code : 1006, typeof ev?.reason === 'string' ? ev.reason : '', opened, token);
        };
      },
      (cause: unknown) => {
        if (!current()) return;
        this.emitError(new WebSocketServiceError('token', `getToken() failed: ${cause instanceof Error ? cause.message : String(cause)}`, { cause }));
        this.scheduleReconnect(session, { closeCode: undefined, closeReason: undefined, wasOpen: false, free: false });
      },
    );
  }

  private handleClose(session: number, code: number, reason: string, wasOpen: boolean, token: string | undefined): void {
    const o = this.opts!;
    const detail = { closeCode: code, closeReason: reason, wasOpen };
    if (wasOpen) {
      if (code === 1001) {
        this.scheduleReconnect(session, { ...detail, free: true });
        return;
      }
      if (code === 1008 && !o.getToken) {
        this.stop(
          'policy',
          new WebSocketServiceError(
            'policy',
            `the gateway closed the connection with 1008 (policy violation${reason ? `: ${reason}` : ''}); ` +
              'without getToken there are no new credentials to retry with',
            { closeCode: code, closeReason: reason },
          ),
          detail,
        );
        return;
      }
      // 1008 with getToken: the next attempt fetches a new token (every token-mode retry does).
      this.scheduleReconnect(session, { ...detail, free: false });
      return;
    }

    this.neverOpenedFailures++;
    const jwtMode = o.userId === undefined;
    if (jwtMode && !this.everOpened && this.neverOpenedFailures >= o.authFailureAttempts) {
      const exp = token !== undefined ? jwtExp(token) : undefined;
      const expired = exp !== undefined && exp * 1000 <= Date.now();
      this.stop(
        'auth',
        new WebSocketServiceError(
          'auth',
          `the WebSocket handshake failed ${this.neverOpenedFailures} time(s) in a row without ever opening` +
            (o.getToken ? ', with a freshly fetched token each time' : ' with the same static token') +
            ': the gateway most likely refused the credentials (HTTP 401: invalid or expired token), or it is unreachable ' +
            '(browsers do not expose which)' +
            (expired ? `; the token's exp (${new Date(exp! * 1000).toISOString()}) is in the past by this browser's clock` : ''),
          { closeCode: code, closeReason: reason },
        ),
        detail,
      );
      return;
    }
    this.scheduleReconnect(session, { ...detail, free: false });
  }

  private scheduleReconnect(
    session: number,
    d: { closeCode: number | undefined; closeReason: string | undefined; wasOpen: boolean; free: boolean },
  ): void {
    if (session !== this.session) return;
    const o = this.opts!;
    const detail: Partial<StatusDetail> = { wasOpen: d.wasOpen };
    if (d.closeCode !== undefined) detail.closeCode = d.closeCode;
    if (d.closeReason !== undefined) detail.closeReason = d.closeReason;
    let attemptNumber: number;
    let delayMs: number;
    if (d.free) {
      attemptNumber = 0;
      delayMs = 0;
    } else {
      this.attempt++;
      if (this.attempt > o.maxReconnectAttempts) {
        const tried = this.attempt - 1;
        this.attempt = tried;
        this.stop(
          'reconnect_exhausted',
          new WebSocketServiceError(
            'reconnect_exhausted',
            `gave up after ${tried} reconnect attempt(s)` + (d.closeCode !== undefined ? ` (last close code ${d.closeCode})` : ''),
            { closeCode: d.closeCode, closeReason: d.closeReason },
          ),
          detail,
        );
        return;
      }
      attemptNumber = this.attempt;
      delayMs = backoffDelay(attemptNumber, o.backoff, o.random);
    }
    this.setStatus('reconnecting', { attempt: attemptNumber, maxAttempts: o.maxReconnectAttempts, delayMs, ...detail });
    if (session !== this.session) return; // a status listener called connect()/disconnect()
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (session !== this.session) return;
      this.startAttempt(session, attemptNumber);
    }, delayMs);
  }

  private dispatch(raw: unknown, since: string | undefined): void {
    if (typeof raw !== 'string') {
      this.emitError(new WebSocketServiceError('malformed_frame', 'received a non-text frame; the gateway sends JSON text frames', { raw }));
      return;
    }
    let frame: NotificationFrame;
    try {
      frame = JSON.parse(raw) as NotificationFrame;
    } catch (cause) {
      this.emitError(new WebSocketServiceError('malformed_frame', `frame is not valid JSON: ${raw.length > 200 ? raw.slice(0, 200) + '…' : raw}`, { raw, cause }));
      return;
    }
    if (frame === null || typeof frame !== 'object' || Array.isArray(frame) || typeof frame.type !== 'string' || frame.type.length === 0) {
      this.emitError(new WebSocketServiceError('malformed_frame', 'frame is not a JSON object with a non-empty string "type"', { raw }));
      return;
    }
    if (frame.type.startsWith(CONTROL_PREFIX)) {
      // The gateway's own frames: never handed to the handlers, and no position in the stream.
      if (frame.type === 'wsnotify.recovery') {
        const f = frame as unknown as { recovered?: unknown; missed?: unknown; since?: unknown };
        this.emitRecovery({
          recovered: f.recovered === true,
          missed: f.recovered === true && typeof f.missed === 'number' && f.missed >= 0 ? f.missed : 0,
          since: typeof f.since === 'string' ? f.since : (since ?? null),
        });
      }
      return;
    }
    this.remember(frame.id);
    const typed = frame.type === '*' ? undefined : this.subscriptions.get(frame.type);
    const wildcard = this.subscriptions.get('*');
    const subs: Subscription[] = [];
    if (typed) subs.push(...typed);
    if (wildcard) subs.push(...wildcard);
    for (const sub of subs) {
      if (!sub.active) continue; // unsubscribed by an earlier handler of this frame
      try {
        sub.handler(frame.data, frame);
      } catch (cause) {
        this.emitError(
          new WebSocketServiceError('handler', `handler for "${frame.type}" threw: ${cause instanceof Error ? cause.message : String(cause)}`, {
            frame,
            cause,
          }),
        );
      }
    }
  }
}

/** Creates an independent service (own connection, subscriptions and listeners). */
export function createWebSocketService(defaults: ConnectOptions = {}): WebSocketService {
  return new WebSocketService(defaults);
}

/** The shared instance used by the seed's frontends: `import webSocketService from './services/websocketService'`. */
const webSocketService = new WebSocketService();
export default webSocketService;
