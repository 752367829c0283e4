// Helpers to observe a materialized Zero view and wait for states, each wait with a timeout whose
// message says what did not arrive and what the view looked like instead.

export function plain(data) {
  return data === undefined ? undefined : JSON.parse(JSON.stringify(data));
}

export function withTimeout(promise, ms, what, context = () => '') {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => {
      const extra = context();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}${extra ? `\n${extra}` : ''}`));
    }, ms);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

function summarize(snapshot) {
  if (!snapshot) return 'no view update received at all';
  const {data, resultType, updates} = snapshot;
  if (!Array.isArray(data)) return `resultType=${resultType}, data=${JSON.stringify(data)?.slice(0, 300)}`;
  const nComments = data.reduce((a, r) => a + (r.comments?.length ?? 0), 0);
  const head = data.slice(0, 3).map(r => `${r.id}:${JSON.stringify(r.title)}`).join(', ');
  return `last view: resultType=${resultType}, ${data.length} rows, ${nComments} comments, ${updates} updates, first rows [${head}]`;
}

/**
 * Subscribes to `view`; `waitFor(pred, what, ms)` resolves with the first snapshot
 * {data, resultType} (data as plain JSON) for which `pred` holds, or rejects after `ms`.
 * `context()` adds extra lines (e.g. the server log tail) to timeout messages.
 */
export function watchView(view, label, context = () => '') {
  let latest = null;
  let updates = 0;
  const waiters = new Set();
  view.addListener((data, resultType) => {
    latest = {data: plain(data), resultType, updates: ++updates};
    for (const w of [...waiters]) w();
  });
  const test = pred => {
    try {
      return latest !== null && Boolean(pred(latest));
    } catch {
      return false; // a predicate reading a row that is not there yet
    }
  };
  return {
    get latest() {
      return latest;
    },
    waitFor(pred, what, ms = 30_000) {
      let waiter = null;
      const hit = new Promise(resolve => {
        if (test(pred)) return resolve(latest);
        waiter = () => {
          if (test(pred)) {
            waiters.delete(waiter);
            resolve(latest);
          }
        };
        waiters.add(waiter);
      });
      return withTimeout(hit, ms, `${label}: ${what}`, () => {
        waiters.delete(waiter);
        return [summarize(latest), context()].filter(Boolean).join('\n');
      });
    },
  };
}
