// Compile-time check of the published declarations from a consumer's point of view
// (`npm run typecheck`; never emitted or run).
import webSocketService, {
  createWebSocketService,
  WebSocketService,
  WebSocketServiceError,
  backoffDelay,
  type ConnectionStatus,
  type ConnectOptions,
  type NotificationFrame,
  type RecoveryEvent,
  type StatusDetail,
  type WebSocketConstructor,
} from '../../dist/websocketService.js';

declare const userId: string;

// The seed's snippet, unchanged.
webSocketService.connect(userId);
webSocketService.subscribe('welcome', (data) => {
  console.log('Welcome message:', data);
});
webSocketService.subscribe('balance_update', (data) => {
  console.log('Balance updated:', data);
});

// Typed handlers and the whole frame.
interface Balance { balance: number; currency: string }
const off: () => void = webSocketService.subscribe<Balance>('balance_update', (data, frame: NotificationFrame<Balance>) => {
  const n: number = data.balance;
  const id: string = frame.id;
  const user: string | undefined = frame.user_id;
  void [n, id, user, frame.timestamp, frame.type];
});
off();

// JWT mode with an async getToken, all tuning options, and the browser's own WebSocket class.
const ctor: WebSocketConstructor = WebSocket;
const options: ConnectOptions = {
  url: 'wss://notify.example.com/ws',
  getToken: async () => 'jwt',
  maxReconnectAttempts: 5,
  initialDelayMs: 1000,
  backoffFactor: 2,
  maxDelayMs: 30000,
  jitter: 0.2,
  connectTimeoutMs: 10000,
  authFailureAttempts: 2,
  onError: (e: WebSocketServiceError) => console.warn(e.kind, e.closeCode, e.message),
  WebSocket: ctor,
  recovery: true,
  persistLastId: false,
};
const svc: WebSocketService = createWebSocketService();
svc.connect(options);
svc.connect({ token: 'static.jwt' });
const stopListening = svc.onStatusChange((status: ConnectionStatus, detail: StatusDetail) => {
  if (status === 'reconnecting') console.log(detail.attempt, detail.delayMs, detail.closeCode);
  if (status === 'closed') console.log(detail.reason);
});
stopListening();
svc.onError((e) => {
  if (e.kind === 'auth') console.log('log in again');
})();
// Recovery: the outcome of each reconnect, and the id the next one resumes from.
const stopRecovery: () => void = svc.onRecovery((e: RecoveryEvent) => {
  const recovered: boolean = e.recovered;
  const missed: number = e.missed;
  const since: string | null = e.since;
  if (!recovered) console.log('reload state', missed, since);
});
stopRecovery();
const lastId: string | undefined = svc.lastId;
// @ts-expect-error: lastId is read-only
svc.lastId = 'x';
// @ts-expect-error: recovery is a boolean
svc.connect({ userId, recovery: 'yes' });
svc.onError((e) => {
  if (e.kind === 'recovery_listener') console.log(e.cause);
});
const s: ConnectionStatus = svc.status;
const d: number = backoffDelay(3, { initialDelayMs: 1000, backoffFactor: 2, maxDelayMs: 30000, jitter: 0.2 });
void [s, d, svc.isConnected, lastId];
svc.disconnect();
new WebSocketService({ url: '/ws' }).configure({ jitter: 0 });
