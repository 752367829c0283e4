//! Identical calls in flight at once, made once: the first caller with a key runs the call,
//! later callers with the same key wait for its result and get a copy. A key is forgotten as
//! soon as its call ends, so nothing is cached: a call made after another ended runs again.
//!
//! The app server's transforms are such calls: a group's transform request is its token and
//! its queries (no group id), and groups sharing a query connect at the same moments (1,000
//! groups on one query: one request instead of 1,000, where the app server's queue was most
//! of a hydration's time).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;

/// One call in flight: its result once it ends, and the waiters' wake-up (closed at the
/// end, so every waiter wakes).
struct Flight<V> {
    result: RefCell<Option<V>>,
    done: glommio::sync::Semaphore,
}

pub struct Coalesce<K, V> {
    /// Bounded by the calls in flight: each key is removed when its call ends.
    flights: RefCell<HashMap<K, Rc<Flight<V>>>>,
}

impl<K, V> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce {
            flights: RefCell::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Coalesce<K, V> {
    /// The result of `call` for `key`, or of the call with that key already in flight.
    pub async fn run<F, Fut>(&self, key: K, call: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = V>,
    {
        let joined = self.flights.borrow().get(&key).cloned();
        if let Some(flight) = joined {
            // Closed when the call ends: the permit is never granted, only the wake-up.
            let _ = flight.done.acquire_permit(1).await;
            if let Some(v) = flight.result.borrow().as_ref() {
                return v.clone();
            }
            // The first caller was cancelled before its call ended: call anew.
            return Box::pin(self.run(key, call)).await;
        }
        let flight = Rc::new(Flight {
            result: RefCell::new(None),
            done: glommio::sync::Semaphore::new(0),
        });
        self.flights
            .borrow_mut()
            .insert(key.clone(), flight.clone());
        // Ends the flight also if this future is dropped mid-call.
        let _end = End {
            flights: &self.flights,
            key,
            flight: flight.clone(),
        };
        let v = call().await;
        *flight.result.borrow_mut() = Some(v.clone());
        v
    }

    /// Calls in flight.
    pub fn len(&self) -> usize {
        self.flights.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct End<'a, K: Hash + Eq, V> {
    flights: &'a RefCell<HashMap<K, Rc<Flight<V>>>>,
    key: K,
    flight: Rc<Flight<V>>,
}

impl<K: Hash + Eq, V> Drop for End<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.borrow_mut();
        if flights
            .get(&self.key)
            .is_some_and(|f| Rc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
        self.flight.done.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor")
            .run(f)
    }

    #[test]
    fn calls_in_flight_with_one_key_run_once_and_each_caller_gets_the_result() {
        run(async {
            let c: Rc<Coalesce<&str, u32>> = Rc::default();
            let calls = Rc::new(Cell::new(0));
            let call = |v: u32| {
                let calls = calls.clone();
                move || async move {
                    calls.set(calls.get() + 1);
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    v
                }
            };
            let tasks: Vec<_> = (0..5)
                .map(|i| {
                    let (c, call) = (c.clone(), call(if i < 4 { 7 } else { 9 }));
                    let key = if i < 4 { "a" } else { "b" };
                    glommio::spawn_local(async move { c.run(key, call).await })
                })
                .collect();
            let mut got = Vec::new();
            for t in tasks {
                got.push(t.await);
            }
            assert_eq!(got, vec![7, 7, 7, 7, 9]);
            assert_eq!(calls.get(), 2, "one call per key");
            assert!(c.is_empty(), "nothing kept after the calls");
            // After the flight ended, the same key calls again.
            assert_eq!(c.run("a", call(8)).await, 8);
            assert_eq!(calls.get(), 3);
        });
    }

    #[test]
    fn a_cancelled_first_caller_leaves_the_waiters_to_call_again() {
        run(async {
            let c: Rc<Coalesce<&str, u32>> = Rc::default();
            let first = {
                let c = c.clone();
                glommio::spawn_local(async move {
                    c.run("a", || async {
                        glommio::timer::sleep(Duration::from_secs(60)).await;
                        1
                    })
                    .await
                })
            };
            glommio::timer::sleep(Duration::from_millis(5)).await;
            let second = {
                let c = c.clone();
                glommio::spawn_local(async move { c.run("a", || async { 2 }).await })
            };
            glommio::timer::sleep(Duration::from_millis(5)).await;
            drop(first); // cancels the call in flight
            assert_eq!(second.await, 2);
            assert!(c.is_empty());
        });
    }
}
