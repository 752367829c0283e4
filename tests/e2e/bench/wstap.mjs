// The `ws` package as the global WebSocket (as lib/ws.mjs), with a hook that sees every downstream
// frame of every socket as it arrives, stamped with performance.now() before the Zero client
// handles it. The benchmark uses it for the `connected` frame and the poke carrying
// lastMutationIDChanges; unlike lib/wsspy.mjs nothing is kept, so long runs do not grow memory.
import {WebSocket as WsWebSocket} from 'ws';

const listeners = new Set();

/** Calls `fn(clientID, msg, at)` for each parsed frame until the returned function is called. */
export function onFrame(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

class TapWebSocket extends WsWebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, options);
    const clientID = new URL(url).searchParams.get('clientID');
    // registered before the client's own listener, so `at` is the arrival time
    this.addEventListener('message', e => {
      const at = performance.now();
      if (listeners.size === 0) return;
      let msg;
      try {
        msg = JSON.parse(String(e.data));
      } catch {
        return;
      }
      for (const fn of [...listeners]) fn(clientID, msg, at);
    });
    // as lib/wsspy.mjs: the `ws` socket throws an uncaught 'error' when its owner stopped listening
    this.on('error', () => {});
  }
}

globalThis.WebSocket = TapWebSocket;
