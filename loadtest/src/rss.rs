//! Server memory: the RSS of a process and all its descendants, read from /proc (zero-cache
//! runs as a tree of Node processes; zcache is one process).

use std::collections::HashMap;
use std::fs;

/// `VmRSS` in KiB from the text of /proc/PID/status.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The parent pid from the text of /proc/PID/stat (the command may contain spaces and ')').
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat_ppid)
        {
            map.entry(ppid).or_default().push(pid);
        }
    }
    map
}

/// Sum of VmRSS over `pid` and its descendants, in KiB; `None` if `pid` is gone.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    let root = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(parse_vm_rss_kib)?;
    let children = children_map();
    let mut total = root;
    let mut stack: Vec<u32> = children.get(&pid).cloned().unwrap_or_default();
    let mut visited = 0usize;
    while let Some(p) = stack.pop() {
        visited += 1;
        if visited > 100_000 {
            break; // a pid cycle cannot happen, but a runaway walk must not hang the harness
        }
        if let Some(kib) = fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .as_deref()
            .and_then(parse_vm_rss_kib)
        {
            total += kib;
        }
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    Some(total)
}

/// CPU time this process has used so far (all threads), from /proc/self/task/*/schedstat,
/// whose first field is nanoseconds on a CPU. Lets a run tell whether the harness itself was
/// the bottleneck.
pub fn own_cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = entry.path().join("schedstat");
        if let Some(ns) = fs::read_to_string(path)
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Some(total)
}

/// Start, peak and end of the sampled RSS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RssTrack {
    pub start_kib: Option<u64>,
    pub peak_kib: Option<u64>,
    pub end_kib: Option<u64>,
}

impl RssTrack {
    pub fn sample(&mut self, kib: Option<u64>) {
        let Some(k) = kib else { return };
        if self.start_kib.is_none() {
            self.start_kib = Some(k);
        }
        self.peak_kib = Some(self.peak_kib.map_or(k, |p| p.max(k)));
        self.end_kib = Some(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tnode\nVmPeak:\t  1000 kB\nVmRSS:\t  123456 kB\nThreads: 7\n";
        assert_eq!(parse_vm_rss_kib(status), Some(123_456));
        assert_eq!(parse_vm_rss_kib("Name: x\n"), None);
        let stat = "4242 (node (worker) x) S 4200 4242 4242 0 -1 4194560";
        assert_eq!(parse_stat_ppid(stat), Some(4200));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn tree_sum_includes_descendants() {
        assert!(tree_rss_kib(std::process::id()).unwrap() > 0);
        // `sh` waits for its `sleep` child (the trailing `true` keeps it from exec'ing it).
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 5; true"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let kids = children_map().remove(&sh.id()).unwrap_or_default();
        assert_eq!(kids.len(), 1, "sh has one child");
        let rss_of = |pid: u32| {
            parse_vm_rss_kib(&fs::read_to_string(format!("/proc/{pid}/status")).unwrap()).unwrap()
        };
        let (own, kid) = (rss_of(sh.id()), rss_of(kids[0]));
        let tree = tree_rss_kib(sh.id()).unwrap();
        sh.kill().unwrap();
        let _ = sh.wait();
        assert_eq!(tree, own + kid);
        assert!(tree_rss_kib(u32::MAX - 1).is_none());
    }

    /// Spins until the sum has grown by 10 ms of CPU (at most 5 s): a fixed 50 ms spin failed
    /// on a loaded machine, and the other tests' threads leave the sum when they exit.
    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = own_cpu_ns().unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let grown = loop {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            if own_cpu_ns().unwrap() >= before + 10_000_000 {
                break true;
            }
            if t.elapsed() > std::time::Duration::from_secs(5) {
                break false;
            }
        };
        assert!(x > 0);
        assert!(grown, "10 ms of CPU not seen within 5 s of spinning");
    }

    #[test]
    fn track_keeps_start_peak_end() {
        let mut t = RssTrack::default();
        t.sample(None);
        t.sample(Some(10));
        t.sample(Some(30));
        t.sample(Some(20));
        assert_eq!(
            t,
            RssTrack {
                start_kib: Some(10),
                peak_kib: Some(30),
                end_kib: Some(20)
            }
        );
    }
}
