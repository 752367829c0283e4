// The `ws` package as the global WebSocket (as lib/ws.mjs), wrapped so that a test can see what the
// Zero client received on each of its sockets: every downstream frame, the rows sent in pokes
// (rowsPatch entries), `error` frames and how the socket closed.
import {WebSocket as WsWebSocket} from 'ws';

/** One record per socket opened by any client in this process, oldest first. */
export const sockets = [];

function recordFrame(rec, data) {
  let msg;
  try {
    msg = JSON.parse(String(data));
  } catch {
    rec.unparsed++;
    return;
  }
  rec.frames.push(msg);
  const [tag, body] = msg;
  if (tag === 'pokePart') rec.rowsPatched += body?.rowsPatch?.length ?? 0;
  else if (tag === 'pokeEnd') rec.pokes++;
  else if (tag === 'error') rec.errors.push(body);
  else if (tag === 'connected') rec.connected = true;
}

class SpyWebSocket extends WsWebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, options);
    const params = new URL(url).searchParams;
    const rec = {
      clientID: params.get('clientID'),
      clientGroupID: params.get('clientGroupID'),
      baseCookie: params.get('baseCookie'),
      openedAt: performance.now(),
      frames: [],
      unparsed: 0,
      rowsPatched: 0,
      pokes: 0,
      errors: [],
      connected: false,
      closed: null,
      socketErrors: [],
    };
    sockets.push(rec);
    this.addEventListener('message', e => recordFrame(rec, e.data));
    // a browser WebSocket never throws on a failed connect; the `ws` one throws an uncaught 'error'
    // when its owner has stopped listening (the client gives up on a socket to a server that is down)
    this.on('error', e => rec.socketErrors.push(String(e?.message ?? e)));
    this.addEventListener('close', e => {
      rec.closed = {code: e.code, reason: e.reason, wasClean: e.wasClean, at: performance.now()};
    });
  }
}

globalThis.WebSocket = SpyWebSocket;

/** The sockets of one client, oldest first. */
export function socketsOf(clientID) {
  return sockets.filter(s => s.clientID === clientID);
}
